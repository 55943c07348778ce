"""Packed generator inputs: many prompts in one backbone forward, each attending only to itself.

The generator reads a batch of short prompts. Its backbone is small (MiniLM: d_s = 384), so its matmuls are
efficient only over many tokens at once: every prompt's tokens go through the linear layers as one sequence
[1, N] (positions restart at 0 per prompt). Attention must still stay within each prompt. A block-diagonal
[N, N] mask does that at the cost of attention over all N^2 pairs (N = 513 for 32 suite prompts: 27 % of the
generator's time); `packed_attention` instead runs it per prompt, at sum(n_i^2):

    tokens [1, H, N, dh] --gather--> per length class c: [b_c, H, n_c, dh] (right-padded to the class's longest)
        --SDPA (padded keys masked; causal within the prompt for decoder backbones)--> [b_c, H, n_c, dh]
        --scatter back (padding rows dropped)--> [1, N, H, dh]

Length classes are powers of two, so a class pads at most ~2x. `Packing` is built once per forward (plain
index tensors, shared by every layer) and reaches the attention function through the backbone's forward
kwargs (transformers passes them down to `AttentionInterface` functions); without one, the function is plain
SDPA. `enable(backbone)` registers the function and switches the backbone to it; a backbone whose class does
not use the AttentionInterface keeps its own attention and the caller falls back to the block-diagonal mask.
A backbone whose attention needs more than a mask (a sliding window, a position bias, soft-capping) makes the
function raise `Unsupported` on the first packed forward; the caller then switches to the mask for good.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("atv.generator")

ATTENTION = "atv_packed"
UNSUPPORTED = ("sliding_window", "position_bias", "softcap", "s_aux", "sinks")   # attention kwargs it cannot honour


class Unsupported(RuntimeError):
    """This backbone's attention needs what per-prompt SDPA does not do: use the block-diagonal mask."""


@dataclass(frozen=True)
class Group:
    gather: torch.Tensor          # [b * n] indices into the N packed tokens (padding -> the row's first token)
    keys: torch.Tensor | None     # [b, 1, 1, n] bool, True for a real key (None: no padding, or causal)
    shape: tuple[int, int]        # (b, n)
    keep: torch.Tensor | None     # indices into the b * n padded rows of the group's real tokens (None: all)


@dataclass(frozen=True)
class Packing:
    """Which of the N packed tokens belong to which prompt, grouped for attention."""
    groups: tuple[Group, ...]
    order: torch.Tensor           # [N]: each packed token's row in cat(real rows of every group)
    causal: bool

    @classmethod
    def build(cls, lengths: list[int], causal: bool, device: torch.device | str = "cpu") -> "Packing":
        starts, at = [], 0
        for n in lengths:
            starts.append(at)
            at += n
        classes: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            classes.setdefault(max(n - 1, 0).bit_length(), []).append(i)
        groups, order = [], []
        for _, members in sorted(classes.items()):
            width = max(lengths[i] for i in members)
            gather, valid = [], []
            for i in members:
                n, s = lengths[i], starts[i]
                gather += list(range(s, s + n)) + [s] * (width - n)
                valid += [True] * n + [False] * (width - n)
                order += range(s, s + n)
            valid_t = torch.tensor(valid, device=device)
            padded = not all(valid)
            groups.append(Group(gather=torch.tensor(gather, device=device),
                                # right padding: under is_causal a real query never reaches it, so no mask
                                keys=valid_t.view(len(members), 1, 1, width) if padded and not causal else None,
                                shape=(len(members), width),
                                keep=valid_t.nonzero().flatten() if padded else None))
        order_t = torch.tensor(order, device=device)
        inverse = torch.empty_like(order_t)
        inverse[order_t] = torch.arange(len(order), device=device)
        return cls(tuple(groups), inverse, causal)

    def attend(self, query, key, value, scale: float | None, dropout: float) -> torch.Tensor:
        """query [1, H, N, dh], key/value [1, Hkv, N, dh] -> [1, N, H, dh]."""
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))   # [N, heads, dh]
        rows = []
        for g in self.groups:
            b, n = g.shape
            qg, kg, vg = (t.index_select(0, g.gather).view(b, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.keys, dropout_p=dropout,
                                                 is_causal=self.causal, scale=scale,
                                                 enable_gqa=kg.shape[1] != qg.shape[1])
            out = out.transpose(1, 2).reshape(b * n, out.shape[1], out.shape[3])
            rows.append(out if g.keep is None else out.index_select(0, g.keep))
        return torch.cat(rows).index_select(0, self.order)[None]


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     atv_packing: Packing | None = None, **kwargs):
    """An AttentionInterface function: per-prompt attention when the forward carries a `Packing`, else SDPA."""
    if atv_packing is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    needs = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if needs:
        raise Unsupported(f"{type(module).__name__} attention uses {needs}")
    return atv_packing.attend(query, key, value, scaling, dropout), None


def enable(backbone) -> bool:
    """Switch `backbone` to `packed_attention`. -> False (backbone unchanged) if its class cannot use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    can = getattr(backbone, "_can_set_attn_implementation", None)
    if can is None or not can():
        return False
    try:
        backbone.set_attn_implementation(ATTENTION)
    except (ValueError, KeyError, ImportError) as exc:
        log.info("generator backbone keeps its attention (%s): packed prompts use a block-diagonal mask", exc)
        return False
    return backbone.config._attn_implementation == ATTENTION
