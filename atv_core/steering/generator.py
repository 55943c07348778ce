"""The ATV generator: reads a query and writes one steering vector per selected target layer.

    query (+ k demonstrations) --format_input--> text --input_template--> backbone --pool--> q [B, d_s]
    q --expansion--> v [B, L_sel, d]             full rank: Linear(d_s, L_sel*d)   (the paper)
                                                  low rank:  Linear(d_s, r) -> Linear(r, L_sel*d)
                                                  + bank (bank_size K > 0): softmax(Linear(d_s, K)(q) / t) @ B,
                                                    B [K, L_sel*d] learned task vectors (rank 0: bank only)
    out = lambda * gate(q) * v                    gate in [0, 1] (1 when no gate is configured)

Gates: "none"; "distance" (cosine to training-query centroids, fitted after training); "learned" (a linear
head on q, trained with negative kinds and generic prompts whose target is the unsteered model's answer).
Demonstrations (`format_input`) are read as text by the generator only; the target never sees them.
Every setting that must be identical in training and serving (input template, examples format, pooling,
position policy, selected layers, lambda, gate) lives in the frozen `GeneratorConfig`, which the
checkpoint stores. This module does not inject vectors (injection.py) and does not train (train.py).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
from torch import nn

from atv_core.steering import packing
from atv_core.steering.injection import POSITION_POLICIES

log = logging.getLogger("atv.generator")

POOLINGS = ("mean", "last", "cls")
GATES = ("none", "distance", "learned")
EXAMPLES_FORMAT = "{prompt}\n\nExamples:\n{examples}"
EXAMPLE_TEMPLATE = "{input} => {output}"


@dataclass(frozen=True)
class GeneratorConfig:
    backbone: str                      # HF id, local path, or "embedded:all-minilm-l6-v2"
    target: str                        # the target model it was made for (id or path; informational)
    target_layers: int                 # L of the target
    target_hidden: int                 # d of the target
    layers: tuple[int, ...] | None = None   # selected target layers; None = all
    backbone_kind: Literal["encoder", "decoder"] = "encoder"
    pooling: Literal["mean", "last", "cls"] | None = None   # None: mean for encoders, last for decoders
    rank: int | None = 64              # None = full-rank expansion; 0 = none (only with a bank)
    bank_size: int = 0                 # K > 0: add a query-weighted mixture of K learned vectors (see Expansion)
    bank_temperature: float = 0.1      # the mixture is softmax(router(q) / bank_temperature)
    scale: float = 1.0                 # lambda
    position: Literal["all", "last"] = "all"
    input_template: str = "{prompt}"   # what the generator reads; {prompt} is the request's prompt text
    max_input_tokens: int = 256
    gate: Literal["none", "distance", "learned"] = "none"
    gate_threshold: float = 0.0        # distance gate: g = sigmoid((max cos(q, centroid) - threshold) / temperature)
    gate_temperature: float = 0.05
    gate_open: float = 0.5             # serving: a gate below this adds no vector (exactly steering off)
    train_backbone: bool = False
    backbone_trainable_layers: int = 0 # >0: the top N backbone blocks are fine-tuned and stored (train_backbone=False)
    backbone_layers: int | None = None # keep only the first N backbone blocks (a cheaper generator); None = all
    max_examples: int = 0              # demonstrations the generator was trained to read; 0 = it reads none
    examples_format: str = EXAMPLES_FORMAT   # {prompt} = the query, {examples} = the demonstrations, one a line
    example_template: str = EXAMPLE_TEMPLATE # one demonstration; {input}, {output}
    recipe: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.backbone_kind not in ("encoder", "decoder"):
            raise ValueError(f"backbone_kind must be 'encoder' or 'decoder', got {self.backbone_kind!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.position not in POSITION_POLICIES:
            raise ValueError(f"position must be one of {POSITION_POLICIES}, got {self.position!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not 0 <= self.gate_open < 1:
            raise ValueError(f"gate_open must be in [0, 1) (0: no gate closes), got {self.gate_open!r}")
        if "{prompt}" not in self.input_template:
            raise ValueError(f"input_template must contain '{{prompt}}', got {self.input_template!r}")
        for name, keys in (("examples_format", ("{prompt}", "{examples}")), ("example_template", ("{input}", "{output}"))):
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise ValueError(f"{name} must contain {missing}, got {getattr(self, name)!r}")
        if self.max_examples < 0 or self.backbone_trainable_layers < 0:
            raise ValueError("max_examples and backbone_trainable_layers must be >= 0")
        if self.backbone_layers is not None and self.backbone_layers < 1:
            raise ValueError(f"backbone_layers must be a positive int or None (all), got {self.backbone_layers}")
        if self.bank_size < 0 or self.bank_temperature <= 0:
            raise ValueError(f"bank_size must be >= 0 (0: no bank) and bank_temperature > 0, got {self.bank_size} "
                             f"and {self.bank_temperature}")
        if self.rank is not None and (self.rank < 0 or (self.rank == 0 and not self.bank_size)):
            raise ValueError(f"rank must be a positive int, None (full rank), or 0 with bank_size > 0 (bank only); "
                             f"got rank={self.rank}, bank_size={self.bank_size}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
            bad = [i for i in self.layers if not 0 <= i < self.target_layers]
            if bad or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct indices in [0, {self.target_layers}), got {self.layers}")

    @property
    def selected_layers(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(self.target_layers))

    @property
    def reads_examples(self) -> bool:
        return self.max_examples > 0

    @property
    def pooling_mode(self) -> str:
        return self.pooling or ("mean" if self.backbone_kind == "encoder" else "last")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generator config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class GeneratorOutput:
    vectors: torch.Tensor   # [B, L_sel, d], already multiplied by lambda * gate
    gates: torch.Tensor     # [B]
    pooled: torch.Tensor    # [B, d_s]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, T, d_s], mask [B, T] (1 = real token) -> [B, d_s]."""
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "last":  # last real token, whatever the padding side
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "cls":
        return hidden[:, 0]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")


class Expansion(nn.Module):
    """d_s -> [L_sel, d] = direct(q) + bank(q); every output projection starts at zero, so an untrained
    generator steers nothing.

    direct: Linear(d_s, r) -> Linear(r, L_sel*d) (rank r; None: one full-rank Linear; 0: no direct term).
    bank:   softmax(router(q) / t) @ B with B [K, L_sel*d]: a convex mixture of K learned task vectors. Its
            output stays near what the vectors hold (a fixed per-task vector is a one-hot mixture), so the query
            picks and blends vectors rather than writing each one. The router starts random, which is what makes
            the K vectors (all zero at first) receive different gradients; the temperature t (0.1) makes that
            start selective. Measured with the strong recipe, seed 0, bank only (K 32, rank 0): validation loss
            after one epoch 1.35 at t = 1 and 1.41 at t = 0.1, against 0.95 for the low-rank head, and 1.20
            after two (0.90): it learns far slower, and is not the shipped head (README, Method quality).
    """

    def __init__(self, d_s: int, n_layers: int, d: int, rank: int | None, bank_size: int = 0,
                 bank_temperature: float = 0.1):
        super().__init__()
        self.n_layers, self.d = n_layers, d
        self.down = nn.Linear(d_s, rank, bias=False) if rank else None
        self.up = nn.Linear(rank or d_s, n_layers * d) if rank != 0 else None
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.router = nn.Linear(d_s, bank_size) if bank_size else None
        self.bank = nn.Parameter(torch.zeros(bank_size, n_layers * d)) if bank_size else None
        self.temperature = bank_temperature

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the head (for its device and dtype)."""
        return self.up.weight if self.up is not None else self.bank

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.up is not None:
            out = self.up(self.down(q) if self.down is not None else q)
        if self.bank is not None:
            out = out + self.mixture(q) @ self.bank
        return out.view(q.shape[0], self.n_layers, self.d)

    def mixture(self, q: torch.Tensor) -> torch.Tensor:
        """[B, d_s] -> the bank's weights [B, K] (rows sum to 1)."""
        return (self.router(q) / self.temperature).softmax(-1)


def backbone_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (BERT-style `encoder.layer`, or any decoder layout)."""
    from atv_core.steering.layers import find_decoder_layers

    encoder_layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if isinstance(encoder_layers, nn.ModuleList) and len(encoder_layers) > 0:
        return encoder_layers
    return find_decoder_layers(backbone)


class GateHead(nn.Module):
    """The learned gate: q [B, d_s] -> [B] in [0, 1]. Starts open (sigmoid(2) ~ 0.88)."""

    def __init__(self, d_s: int, hidden: int = 64):
        super().__init__()
        self.hidden = nn.Linear(d_s, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, 2.0)

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(q))).squeeze(-1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(q))


class ATVGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig, backbone: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        if config.backbone_layers is not None:
            blocks = backbone_blocks(backbone)
            if config.backbone_layers > len(blocks):
                raise ValueError(f"backbone_layers={config.backbone_layers} but the backbone has {len(blocks)} "
                                 f"blocks; use at most {len(blocks)}")
            del blocks[config.backbone_layers:]   # in place: the backbone now stops after block N-1
            backbone.config.num_hidden_layers = config.backbone_layers
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.packed_attention = packing.enable(backbone)   # per-prompt attention in packed forwards (packing.py)
        d_s = backbone.config.hidden_size
        self.expansion = Expansion(d_s, len(config.selected_layers), config.target_hidden, config.rank,
                                   config.bank_size, config.bank_temperature)
        self.register_buffer("centroids", torch.zeros(0, d_s))  # [K, d_s], unit norm, for the distance gate
        self.gate_head = GateHead(d_s) if config.gate == "learned" else None
        if not config.train_backbone:
            backbone.requires_grad_(False)
            if config.backbone_trainable_layers:
                blocks = backbone_blocks(backbone)
                if config.backbone_trainable_layers > len(blocks):
                    raise ValueError(f"backbone_trainable_layers={config.backbone_trainable_layers} but the backbone "
                                     f"has {len(blocks)} blocks; use at most {len(blocks)}")
                blocks[len(blocks) - config.backbone_trainable_layers:].requires_grad_(True)

    @property
    def trains_backbone(self) -> bool:
        return self.config.train_backbone or self.config.backbone_trainable_layers > 0

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode (no dropout), so training reads what serving reads."""
        super().train(mode)
        self.backbone.train(mode and self.trains_backbone)
        return self

    @property
    def device(self) -> torch.device:
        return self.expansion.weight.device

    def format_input(self, query: str, examples=()) -> str:
        """What the generator reads for `query` and k demonstrations (objects with .input and .output).

        The one input format of training and serving: no demonstrations -> the query unchanged; else
        `examples_format` with one `example_template` line per demonstration (newlines in them become spaces).
        Pass the result to `generator([...])`. ValueError if this generator was not trained to read examples
        or more are given than it was trained with.
        """
        examples = tuple(examples)
        if not examples:
            return query
        if not self.config.reads_examples:
            raise ValueError("this generator was not trained to read atv.examples; send the query alone "
                             "or use a generator trained with examples (atv train --examples-k K)")
        if len(examples) > self.config.max_examples:
            raise ValueError(f"{len(examples)} examples given but this generator reads at most "
                             f"{self.config.max_examples}; send at most {self.config.max_examples}")
        lines = [_fill(self.config.example_template, input=_one_line(e.input), output=_one_line(e.output))
                 for e in examples]
        return _fill(self.config.examples_format, prompt=query, examples="\n".join(lines))

    def format_inputs(self, prompts: list[str]) -> list[str]:
        return [self.config.input_template.replace("{prompt}", p) for p in prompts]

    def encode(self, prompts: list[str], pack_tokens: int = 1024) -> torch.Tensor:
        """Prompts -> pooled backbone states [B, d_s] (fp32), without padding.

        Consecutive prompts are packed into one sequence of at most `pack_tokens` tokens (a longer prompt goes
        alone) with positions restarting at 0 per prompt. Each prompt attends only to itself (causally within a
        prompt for decoder backbones): per prompt (packing.py) where the backbone uses transformers'
        AttentionInterface, else through a block-diagonal mask. So each prompt gets the same states as encoding
        it alone, to float rounding. Training and serving both read through here.
        """
        texts = self.format_inputs(prompts)
        ids = self.tokenizer(texts, truncation=True, max_length=self.config.max_input_tokens)["input_ids"]
        ids = [row or [self.tokenizer.pad_token_id] for row in ids]   # an empty text still gets one state
        grad = self.trains_backbone and self.training and torch.is_grad_enabled()
        packs, pack, n = [], [], 0
        for row in ids:
            if pack and n + len(row) > pack_tokens:
                packs.append(pack)
                pack, n = [], 0
            pack.append(row)
            n += len(row)
        packs.append(pack)
        with torch.set_grad_enabled(grad):
            return torch.cat([self._encode_packed(p) for p in packs if p]).float()

    def _encode_packed(self, rows: list[list[int]]) -> torch.Tensor:
        """One packed forward over `rows` (token id lists) -> [len(rows), d_s]."""
        device = self.device
        lengths = torch.tensor([len(r) for r in rows], device=device)
        segment = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)   # [N]
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(segment.numel(), device=device) - starts[segment]
        input_ids = torch.tensor([t for r in rows for t in r], device=device)
        hidden = None
        if self.packed_attention:
            plan = packing.Packing.build([len(r) for r in rows], self.config.backbone_kind == "decoder", device)
            try:
                hidden = self.backbone(input_ids=input_ids[None], position_ids=positions[None],
                                       atv_packing=plan).last_hidden_state[0]                   # [N, d_s]
            except packing.Unsupported as exc:
                log.info("generator backbone: %s; packed prompts use a block-diagonal mask from now on", exc)
                self.packed_attention = False
        if hidden is None:
            hidden = self._masked_forward(input_ids, segment, positions)
        hidden = hidden.float()                          # pooled in fp32 where the backbone computes in bf16
        mode = self.config.pooling_mode
        if mode == "mean":
            sums = hidden.new_zeros(len(rows), hidden.shape[-1]).index_add(0, segment, hidden)
            return sums / lengths.unsqueeze(-1).to(hidden.dtype)
        if mode == "last":
            return hidden[starts + lengths - 1]
        if mode == "cls":
            return hidden[starts]
        raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")

    def _masked_forward(self, input_ids, segment, positions) -> torch.Tensor:
        """The packed forward for a backbone without packed_attention: a block-diagonal [N, N] mask."""
        allowed = segment[:, None] == segment[None, :]                                         # [N, N]
        if self.config.backbone_kind == "decoder":
            allowed = allowed & (positions[:, None] >= positions[None, :])
        dtype = next(self.backbone.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return self.backbone(input_ids=input_ids[None], position_ids=positions[None],
                             attention_mask=mask[None, None]).last_hidden_state[0]            # [N, d_s]

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, d_s] -> [B] in [0, 1]."""
        if self.gate_head is not None:
            return self.gate_head(pooled.to(self.gate_head.out.weight.dtype)).to(pooled.dtype)
        if self.config.gate == "none" or self.centroids.shape[0] == 0:
            return pooled.new_ones(pooled.shape[0])
        q = nn.functional.normalize(pooled, dim=-1)
        nearest = (q @ self.centroids.T.to(q)).max(dim=-1).values
        return torch.sigmoid((nearest - self.config.gate_threshold) / self.config.gate_temperature)

    def forward(self, prompts: list[str], use_gate: bool = True) -> GeneratorOutput:
        pooled = self.encode(prompts)
        gates = self.gate(pooled) if use_gate else pooled.new_ones(pooled.shape[0])
        vectors = self.expansion(pooled.to(self.expansion.weight.dtype))
        vectors = vectors * (self.config.scale * gates.to(vectors.dtype)).view(-1, 1, 1)
        return GeneratorOutput(vectors=vectors, gates=gates, pooled=pooled)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: expansion, gate, and the backbone (or its fine-tuned top blocks) if trained."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        if self.config.train_backbone:
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        elif self.config.backbone_trainable_layers:
            tuned = {id(p) for p in backbone_blocks(self.backbone)[-self.config.backbone_trainable_layers:].parameters()}
            state.update({f"backbone.{k}": p for k, p in self.backbone.named_parameters() if id(p) in tuned})
        return state


def _fill(template: str, **values: str) -> str:
    """Replace {name} fields in one pass (a value holding "{prompt}" is not expanded again)."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], template)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
