"""Allowed token ids, bad words, min_tokens, logit bias and repetition / frequency / presence penalties, per
request, before sampling (vLLM's order and meaning; min_p is the sampler's, as it comes after the temperature).

For a row of logits x [V] of a request with prompt tokens P and output tokens O so far:

    x[t] = -inf                                          for t not in allowed_token_ids (when given)
    x[w_k] = -inf                                        for each bad word w = (w_1..w_k) whose w_1..w_k-1 end O
    x[t] = -inf                                          for t in EOS + stop_token_ids, while |O| < min_tokens
    x[t] += bias[t]                                      for each (t, bias) in logit_bias
    x[t] = x[t] / r if x[t] > 0 else x[t] * r            for each distinct t in P + O   (repetition_penalty r)
    x[t] -= f * count_O(t) + p                           for each distinct t in O        (frequency f, presence p)

Rows whose request asks for none of these are not touched, and when no row asks, the logits are returned as
they are (no copy). Otherwise the result is a copy: the engine reports logprobs from the model's own logits
(vLLM's default, "raw" logprobs), and samples from these. A request's allowed-ids mask, bias tensors and the
distinct ids of its prompt (for the repetition penalty) are built once, not every step, and kept until `forget`.
Rows are processed one by one: cheap for the few requests that ask, not batched across rows.

A row can be left with no token at all: allowed_token_ids whose every token a multi-token bad word bans after
some output (the cases known before any output are refused by the engine's validation). `empty_rows` names
those rows, so that the engine ends their requests with an error instead of sampling a token the request forbade.
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch

from atv_core.engine.request import Request, SamplingParams


class LogitsProcessors:
    def __init__(self, eos_ids: Collection[int] = ()):
        self.eos_ids = frozenset(eos_ids)
        self._prompt_tokens: dict[str, torch.Tensor] = {}   # request id -> its distinct prompt ids (on the device)
        self._bias: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # request id -> (ids, biases) (on the device)
        self._blocked: dict[str, torch.Tensor] = {}   # request id -> [V] bool, True where not in allowed_token_ids

    def process(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits [N, V] (fp32), one row per request -> the logits to sample from."""
        rows = [i for i, r in enumerate(requests)
                if r.params.processes_logits or len(r.output_ids) < r.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            self._row(logits[i], requests[i])
        return logits

    @staticmethod
    def empty_rows(processed: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """The rows of `process`'s result where every token is -inf, so nothing may be sampled (only a request with
        allowed_token_ids can get there; the others are not looked at)."""
        restricted = [i for i, r in enumerate(requests) if r.params.allowed_token_ids is not None]
        if not restricted:
            return []
        left = torch.isneginf(processed[restricted]).all(dim=-1).tolist()
        return [i for i, empty in zip(restricted, left) if empty]

    def end_tokens(self, params: SamplingParams) -> set[int]:
        """The tokens that end a completion, which min_tokens masks: stop_token_ids and, unless ignore_eos, EOS."""
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)

    def forget(self, request_id: str) -> None:
        self._prompt_tokens.pop(request_id, None)
        self._bias.pop(request_id, None)
        self._blocked.pop(request_id, None)

    @property
    def cached(self) -> int:
        """Requests with tensors kept here (0 once every request has been forgotten)."""
        return len(self._prompt_tokens.keys() | self._bias.keys() | self._blocked.keys())

    def _row(self, row: torch.Tensor, request: Request) -> None:
        params, device = request.params, row.device
        if params.allowed_token_ids is not None:
            blocked = self._blocked.get(request.request_id)
            if blocked is None:
                blocked = self._blocked[request.request_id] = torch.ones(row.shape[0], dtype=torch.bool, device=device)
                blocked[torch.tensor(params.allowed_token_ids, device=device)] = False
            row.masked_fill_(blocked, float("-inf"))
        if params.bad_words_ids:
            banned = completing(params.bad_words_ids, request.output_ids)
            if banned:
                row[torch.tensor(banned, device=device)] = float("-inf")
        if len(request.output_ids) < params.min_tokens:
            stops = self.end_tokens(params)
            if stops:
                row[torch.tensor(sorted(stops), device=device)] = float("-inf")
        if params.logit_bias:
            bias = self._bias.get(request.request_id)
            if bias is None:                     # up to a vocabulary of entries: built once per request
                ids, values = zip(*params.logit_bias)
                bias = self._bias[request.request_id] = (torch.tensor(ids, device=device),
                                                         torch.tensor(values, dtype=row.dtype, device=device))
            row.index_add_(0, *bias)
        repeated = params.repetition_penalty != 1
        counted = bool(params.frequency_penalty or params.presence_penalty) and bool(request.output_ids)
        if not (repeated or counted):
            return
        output = torch.tensor(request.output_ids, dtype=torch.long, device=device)
        if repeated:
            prompt = self._prompt_tokens.get(request.request_id)
            if prompt is None:
                prompt = self._prompt_tokens[request.request_id] = torch.tensor(
                    request.prompt_ids, device=device).unique()
            seen = torch.cat([prompt, output]).unique()
            values = row[seen]
            row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if counted:
            ids, counts = output.unique(return_counts=True)
            row[ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty


def completing(words: Sequence[tuple[int, ...]], output: Sequence[int]) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far (a one-token word: always), as
    vLLM's bad words: only output tokens count, so a word begun in the prompt is not blocked."""
    banned = []
    for word in words:
        k = len(word) - 1
        if k == 0 or (k <= len(output) and tuple(output[-k:]) == word[:-1]):
            banned.append(word[-1])
    return banned
