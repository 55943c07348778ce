"""Per-request steering of a frozen HF causal LM through forward hooks.

The op, applied to the output of each selected decoder block l (the residual stream after attention+MLP):

    h[..., t, :] += V[j(l), slot[..., t], :]

    h     : block output, [B, T, d] (padded batch) or [1, N, d] (packed sequences)
    slot  : long index of the same leading shape as h ([B, T] or [1, N]), built once per step on the host
    V     : vector table [L_sel, S + 1, d]; row 0 of every layer is all zeros, row s holds
            scale_s * v_s for the request in slot s (scale_s = lambda * request scale * gate)
    j(l)  : position of layer l among the selected layers

Padding, unsteered requests and positions the position policy excludes point at slot 0 and so receive
exactly +0. The hooks are registered for the duration of one forward (`steering(...)` context manager)
and removed in `finally`, so the user's model keeps its classes, its state dict and no stale hooks.

This module does not generate vectors (see generator.py) and knows nothing of requests or scheduling.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from atv_core.steering.layers import find_decoder_layers

PositionPolicy = Literal["all", "last"]
POSITION_POLICIES = ("all", "last")


def make_table(vectors: torch.Tensor) -> torch.Tensor:
    """[S, L_sel, d] per-request vectors (already scaled) -> table [L_sel, S + 1, d] with a zero row 0."""
    zeros = vectors.new_zeros(1, *vectors.shape[1:])
    return torch.cat([zeros, vectors], dim=0).transpose(0, 1).contiguous()


def prompt_slots(row_slots: Sequence[int], lengths: Sequence[int], policy: PositionPolicy, width: int | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Slot index [B, width] for right-padded prompts: row b has lengths[b] real tokens.

    policy "all": every real token gets row_slots[b]; "last": only the last real token. Padding gets 0.
    """
    if policy not in POSITION_POLICIES:
        raise ValueError(f"position policy must be one of {POSITION_POLICIES}, got {policy!r}")
    width = width if width is not None else max(lengths)
    out = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, (slot, n) in enumerate(zip(row_slots, lengths)):
        if policy == "all":
            out[b, :n] = slot
        else:
            out[b, n - 1] = slot
    return out.to(device)


def _add_to_output(output, delta: torch.Tensor):
    """Add delta to a block output that is a tensor or a tuple whose first element is the hidden state."""
    if isinstance(output, tuple):
        return (output[0] + delta, *output[1:])
    return output + delta


def _make_hook(rows: torch.Tensor, index: torch.Tensor):
    """rows [U, d]: this layer's V[j, s] for the U distinct slots of the step; index [N]: each token's row.
    The [N, d] delta exists for one layer at a time (a 512-token step would hold L_sel x N x d otherwise)."""
    def hook(_module: nn.Module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if index.shape[0] != hidden.shape[:-1].numel():
            raise ValueError(f"slot index has {index.shape[0]} tokens but hidden states are "
                             f"{tuple(hidden.shape)}; build it for this step's [B, T] layout")
        delta = rows.index_select(0, index)                                                      # [N, d]
        delta = delta if delta.device == hidden.device else delta.to(hidden.device)  # layers spread by device_map
        return _add_to_output(output, delta.view_as(hidden).to(hidden.dtype))
    return hook


@contextmanager
def steering(model: nn.Module, table: torch.Tensor | None, slots: torch.Tensor | None,
             layers: Sequence[int] | None = None, layers_path: str | None = None) -> Iterator[None]:
    """Within the block, every forward of `model` adds V[j, slot] to the output of layer layers[j].

    table: [L_sel, S + 1, d] (see make_table); slots: long [B, T] matching the forward's hidden states.
    layers: indices of the selected decoder layers (default all). table=None steers nothing.
    """
    if table is None:
        yield
        return
    blocks = find_decoder_layers(model, layers_path)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    if table.shape[0] != len(layers):
        raise ValueError(f"vector table has {table.shape[0]} layers but {len(layers)} layers are selected")
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model with {len(blocks)} decoder layers")
    used, index = torch.unique(slots.reshape(-1).to(table.device), return_inverse=True)  # [U], [N]
    rows = table.index_select(1, used)                                  # [L_sel, U, d], once per step
    handles = []
    try:
        for j, layer in enumerate(layers):
            handles.append(blocks[layer].register_forward_hook(_make_hook(rows[j], index)))
        yield
    finally:
        for handle in handles:
            handle.remove()
