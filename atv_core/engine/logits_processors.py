"""min_tokens, logit bias and repetition / frequency / presence penalties, per request, before sampling (vLLM's
order and meaning; min_p is the sampler's, as it comes after the temperature).

For a row of logits x [V] of a request with prompt tokens P and output tokens O so far:

    x[t] = -inf                                          for t in EOS + stop_token_ids, while |O| < min_tokens
    x[t] += bias[t]                                      for each (t, bias) in logit_bias
    x[t] = x[t] / r if x[t] > 0 else x[t] * r            for each distinct t in P + O   (repetition_penalty r)
    x[t] -= f * count_O(t) + p                           for each distinct t in O        (frequency f, presence p)

Rows whose request asks for none of these are not touched, and when no row asks, the logits are returned as
they are (no copy). Otherwise the result is a copy: the engine reports logprobs from the model's own logits
(vLLM's default, "raw" logprobs), and samples from these.
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch

from atv_core.engine.request import Request


def process(logits: torch.Tensor, requests: Sequence[Request], eos_ids: Collection[int] = ()) -> torch.Tensor:
    """logits [N, V] (fp32), one row per request -> the logits to sample from."""
    rows = [i for i, r in enumerate(requests) if r.params.processes_logits]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        request, row = requests[i], logits[i]
        params = request.params
        if len(request.output_ids) < params.min_tokens:
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
            if stops:
                row[torch.tensor(sorted(stops), device=row.device)] = float("-inf")
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias)
            row.index_add_(0, torch.tensor(ids, device=row.device),
                           torch.tensor(biases, dtype=row.dtype, device=row.device))
        if params.repetition_penalty != 1:
            seen = torch.tensor(request.prompt_ids + request.output_ids, device=row.device).unique()
            values = row[seen]
            row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if (params.frequency_penalty or params.presence_penalty) and request.output_ids:
            ids, counts = torch.tensor(request.output_ids, device=row.device).unique(return_counts=True)
            row[ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty
    return logits
