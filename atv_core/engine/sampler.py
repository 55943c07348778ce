"""Per-request sampling inside one batch: greedy, temperature, top-k, top-p, seeds, logprobs.

Each row is sampled from its own distribution with its own `torch.Generator`, so a seeded request draws
the same numbers whatever its batch neighbours are. One uniform draw per sampled row, then inverse-CDF
sampling on the sorted, filtered distribution, vectorised over rows.

The logits themselves are not batch-invariant: packed with other requests, fp32 matmuls round differently
(~1e-6), and a draw that lands that close to the boundary between two tokens' cumulative mass picks the
other one. So a seeded request repeats exactly in the same batch composition and almost always, not always,
in another (a probe found 1 of 13 seeds differ in a 20-token sample, at a token of logprob -14.7), as in vLLM.
"""
from __future__ import annotations

import torch

from atv_core.engine.request import SamplingParams, TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def filtered_sorted_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V]; per-row temperature, top_k (0 = off), top_p [N] -> (probs sorted desc, their ids)."""
    sorted_logits, ids = torch.sort(logits / temperature.unsqueeze(1), dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)               # [1, V]
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).unsqueeze(1)                          # [N, 1]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs                                     # mass strictly before each token
    probs = probs.masked_fill(before >= top_p.unsqueeze(1), 0.0)          # keeps at least the top token
    return probs / probs.sum(-1, keepdim=True), ids


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [N, V] (fp32) -> token ids [N]."""
    tokens = logits.max(dim=-1).indices     # = argmax (first maximum; NaN wins), 1.7 vs 2.9 ms for [64, 49152] on CPU
    # near-zero temperatures are greedy (1/T overflows); rows with non-finite logits fall back to argmax
    rows = [i for i, p in enumerate(params) if not p.greedy and p.temperature >= 1e-5]
    if not rows:
        return tokens                        # all greedy: no finiteness scan of the [N, V] logits
    finite = torch.isfinite(logits.index_select(0, torch.tensor(rows, device=logits.device))).all(dim=-1).tolist()
    rows = [i for i, ok in zip(rows, finite) if ok]
    if not rows:
        return tokens
    index = torch.tensor(rows, device=logits.device)
    pick = lambda f: torch.tensor([f(params[i]) for i in rows], device=logits.device)  # noqa: E731
    probs, ids = filtered_sorted_probs(logits.index_select(0, index), pick(lambda p: float(p.temperature)),
                                       pick(lambda p: int(p.top_k)), pick(lambda p: max(float(p.top_p), 1e-6)))
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(logits.device)      # [n]
    choice = torch.searchsorted(probs.cumsum(-1), u.unsqueeze(1)).clamp(max=probs.shape[-1] - 1)
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1).clamp(min=0)  # never a filtered tail
    tokens[index] = ids.gather(1, choice).squeeze(1)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens under the model ([N, V] logits) and the top_n alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = logp.topk(max(top_n, 1), dim=-1)
    out = []
    for i, token in enumerate(tokens.tolist()):
        top = list(zip(top_ids[i, :top_n].tolist(), top_values[i, :top_n].tolist()))
        out.append(TokenLogprob(token_id=token, logprob=chosen[i], top=top))
    return out
