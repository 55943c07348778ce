"""Per-request sampling inside one batch: greedy, temperature, min-p, top-k, top-p, seeds, logprobs.
(Logit bias and penalties come before, in logits_processors.py.)

Each row is sampled from its own distribution with its own `torch.Generator`, so a seeded request draws
the same numbers whatever its batch neighbours are. One uniform draw per sampled row, then inverse-CDF
sampling, vectorised over rows: over the vocabulary in its own order for plain temperature sampling (no
sort: a full sort of [64, 49152] logits took ~140 ms on the project's CPU, as long as a decode step), and
over the top candidates, sorted, for top-k / top-p.

The logits themselves are not batch-invariant: packed with other requests, matmuls round differently. In
fp32 that is ~1e-6, and only a draw that lands that close to the boundary between two tokens' cumulative mass
picks the other one: a seeded request repeats exactly in the same batch composition and almost always, not
always, in another (a probe found 1 of 13 seeds differ in a 20-token sample, at a token of logprob -14.7). In
bf16 (`dtype auto` on CUDA and on CPUs with AVX512-BF16 or AMX) logits move by up to ~0.1 with the batch, so
seeded and greedy requests alike often diverge after some tokens in another batch composition (a probe on the
AMX VM: 0 of 8 of each repeated their solo 20-token output beside 8 other requests). As in vLLM; serve in fp32
for repeatability.
"""
from __future__ import annotations

import math

import torch

from atv_core.engine.request import SamplingParams, TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


CANDIDATES = 1024   # top-p rows look for their nucleus among this many most likely tokens first (_draw_filtered)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [N, V] (fp32) -> token ids [N]."""
    tokens = logits.max(dim=-1).indices     # = argmax (first maximum; NaN wins), 1.7 vs 2.9 ms for [64, 49152] on CPU
    # near-zero temperatures are greedy (1/T overflows); rows with a NaN or +inf logit, or nothing above -inf,
    # fall back to argmax (-inf alone is a masked token: min_tokens, a bias of -100 cannot reach it)
    rows = [i for i, p in enumerate(params) if not p.greedy and p.temperature >= 1e-5]
    if not rows:
        return tokens                        # all greedy: no finiteness scan of the [N, V] logits
    device = logits.device
    scaled = logits.index_select(0, torch.tensor(rows, device=device))   # a copy, scaled in place
    finite = torch.isfinite(scaled.amax(dim=-1)).tolist()   # the max: NaN if any is NaN, +inf if any is
    keep = [j for j, ok in enumerate(finite) if ok]
    if len(keep) < len(rows):
        rows, scaled = [rows[j] for j in keep], scaled[keep]
    if not rows:
        return tokens
    pick = lambda f, group: torch.tensor([f(params[rows[j]]) for j in group], device=device)  # noqa: E731
    scaled.div_(pick(lambda p: float(p.temperature), range(len(rows))).unsqueeze(1))
    min_p = [j for j in range(len(rows)) if params[rows[j]].min_p > 0]
    if min_p:        # after the temperature, as vLLM: p < min_p * p_max  <=>  x < x_max + log(min_p)
        part = scaled[min_p]
        floor = part.max(dim=-1, keepdim=True).values + pick(lambda p: math.log(p.min_p), min_p).unsqueeze(1)
        scaled[min_p] = part.masked_fill_(part < floor, float("-inf"))
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(device)           # one draw per row
    filtered = [params[i].top_k > 0 or params[i].top_p < 1 for i in rows]
    plain = [j for j, f in enumerate(filtered) if not f]
    if plain:        # neither top-k nor top-p: inverse CDF over the vocabulary in its own order (no sort)
        part = scaled if len(plain) == len(rows) else scaled[plain]
        part = part.sub_(part.max(dim=-1, keepdim=True).values).exp_()               # unnormalised is fine
        tokens[torch.tensor([rows[j] for j in plain], device=device)] = _inverse_cdf(part, u[plain])
    group = [j for j, f in enumerate(filtered) if f]
    if group:
        part = scaled if len(group) == len(rows) else scaled[group]
        tokens[torch.tensor([rows[j] for j in group], device=device)] = _draw_filtered(
            part, pick(lambda p: int(p.top_k), group), pick(lambda p: max(float(p.top_p), 1e-6), group), u[group])
    return tokens


def _draw_filtered(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k and/or top-p: the tokens a full sort (descending, ties by token id) keeps, the top k
    renormalised, then the shortest prefix whose mass reaches top_p; sampled by inverse CDF in that order.

    Computed among the most likely tokens only (the largest k + 1, or CANDIDATES): a row's result is that of the
    full sort whenever the candidates' last value is below that of the row's last kept token (then every token
    tied with a kept one is a candidate too); other rows are sorted in full. Either way the same tokens, so a
    row's draw does not depend on its neighbours' settings."""
    vocab = scaled.shape[-1]
    most_k = int(top_k.max())
    width = min(vocab, most_k + 1 if bool((top_k > 0).all()) else max(CANDIDATES, most_k + 1))
    # the whole row's normaliser (top-p rows); top-k rows renormalise over their k
    lse = torch.logsumexp(scaled, dim=-1) if bool((top_k <= 0).any()) else scaled.new_zeros(scaled.shape[0])
    values, ids = _by_value_then_id(*scaled.topk(width, dim=-1))
    probs = _kept(values, lse, top_k, top_p)
    last_kept = values.gather(1, ((probs > 0).sum(-1, keepdim=True) - 1))              # kept tokens are a prefix
    exact = (values[:, -1:] < last_kept).squeeze(1) | (width == vocab)
    tokens = ids.gather(1, _inverse_cdf(probs, u).unsqueeze(1)).squeeze(1)
    if not bool(exact.all()):
        rest = (~exact).nonzero().squeeze(1)
        full_values, full_ids = torch.sort(scaled[rest], dim=-1, descending=True, stable=True)   # ties by id
        full_probs = _kept(full_values, lse[rest], top_k[rest], top_p[rest])
        tokens[rest] = full_ids.gather(1, _inverse_cdf(full_probs, u[rest]).unsqueeze(1)).squeeze(1)
    return tokens


def _by_value_then_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates in the full stable sort's order: value descending, ties by token id (topk's order of ties
    depends on how many it returns)."""
    ids, order = ids.sort(dim=-1)
    values, order = values.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def _kept(values: torch.Tensor, lse: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """values [n, W]: scaled logits in sorted order (the W most likely, or all); lse: each whole row's
    log-normaliser -> the kept tokens' probabilities (top-k rows renormalised over their k), 0 elsewhere."""
    rank = torch.arange(values.shape[-1], device=values.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, values.shape[-1]).unsqueeze(1)
    values = values.masked_fill(rank >= k, float("-inf"))
    norm = torch.where(top_k > 0, torch.logsumexp(values, dim=-1), lse)
    probs = (values - norm.unsqueeze(1)).exp()
    before = probs.cumsum(-1) - probs                                     # mass strictly before each token
    return probs.masked_fill(before >= top_p.unsqueeze(1), 0.0)           # keeps at least the top token


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i - 1] <= u * total < cdf[i]: never a token of zero probability."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    choice = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
    last = torch.searchsorted(cdf, total)               # where the cdf reaches its total: the last token with mass
    return torch.minimum(choice, last).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens under the model ([N, V] logits), their ranks and the top_n
    alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1))                                          # [N, 1]
    ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
    chosen = chosen.squeeze(1).tolist()
    top_values, top_ids = logp.topk(max(top_n, 1), dim=-1)
    top_ids, top_values = top_ids[:, :top_n].tolist(), top_values[:, :top_n].tolist()   # one copy each, not per row
    return [TokenLogprob(token_id=token, logprob=chosen[i], top=list(zip(top_ids[i], top_values[i])), rank=ranks[i])
            for i, token in enumerate(tokens.tolist())]
