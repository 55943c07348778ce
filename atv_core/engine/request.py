"""The life of one request, as plain data (no torch).

`Request` is the single object the scheduler, the runner and the engine pass around: prompt ids, sampling
parameters, steering spec, its KV blocks and vector slot, what it has produced, and the two timestamps that
metrics read. Its token sequence is prompt + output; `num_computed_tokens` of them have their K/V in the
cache (the last output token is computed by the next step, and a preempted request recomputes from 0).
`RequestOutput` is what the engine emits to the caller after each step, with a `SteeringReport` saying what
steering was applied.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    from atv_core.engine.detokenizer import OutputText
    from atv_core.engine.vector_worker import VectorJob

SteeringMode = Literal["atv", "vector", "off"]
FinishReason = Literal["stop", "length", "abort", "error"]


class InvalidRequest(ValueError):
    """A request the engine refuses. `field` is the request field at fault as the HTTP body names it: "prompt"
    (the prompt, or a chat's messages), "atv.mode", "atv.vector", "atv.examples", or a sampling field such as
    "max_tokens", "logit_bias" or "min_tokens"."""

    def __init__(self, message: str, field: str = "prompt"):
        super().__init__(message)
        self.field = field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top alternatives to report per token (0..20)
    prompt_logprobs: int | None = None  # also score the prompt: logprob of each prompt token + top alternatives
    # logit processing (logits_processors.py), in vLLM's order and meaning: allowed ids, min_tokens, bias, then
    # penalties, then min_p
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be sampled (None: any)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences that may not be completed in the output
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit); a dict is taken too
    repetition_penalty: float = 1.0   # > 1 discourages every token of prompt + output (divides a positive logit)
    frequency_penalty: float = 0.0    # subtracted per occurrence in the output
    presence_penalty: float = 0.0     # subtracted once if in the output
    min_p: float = 0.0                # drop tokens below min_p x the most likely token's probability
    min_tokens: int = 0               # the first this many tokens: not EOS nor stop_token_ids, no stop string ends
    # the text (detokenizer.py)
    include_stop_str_in_output: bool = False   # the matched stop string (or stop token's text) ends the text
    skip_special_tokens: bool = True

    def __post_init__(self):
        try:
            bias = dict(self.logit_bias)   # pairs or a dict; a repeated id: its last bias, as in a JSON object
        except (TypeError, ValueError):
            raise InvalidRequest("logit_bias must be {token id: bias} or (token id, bias) pairs",
                                 "logit_bias") from None
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias.items() if b != 0))
        try:
            object.__setattr__(self, "bad_words_ids", tuple(tuple(word) for word in self.bad_words_ids))
        except TypeError:
            raise InvalidRequest("bad_words_ids must be sequences of token ids", "bad_words") from None
        checks = [   # (holds, field at fault, message)
            (self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None), "max_tokens",
             f"max_tokens must be >= 1 (0 only to score the prompt, with prompt_logprobs), got {self.max_tokens}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"top_k must be an int >= 0, got {self.top_k!r}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            (0 < self.repetition_penalty < float("inf"), "repetition_penalty",
             f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= max(self.max_tokens, 0), "min_tokens",
             f"min_tokens must be an int in [0, max_tokens ({self.max_tokens})], got {self.min_tokens!r}"),
            (self.allowed_token_ids is None or (len(self.allowed_token_ids) > 0 and all(
                isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)), "allowed_token_ids",
             "allowed_token_ids must be a non-empty list of token ids >= 0 (leave it out to allow every token)"),
            (all(word and all(isinstance(t, int) and t >= 0 for t in word) for word in self.bad_words_ids),
             "bad_words", "bad_words_ids must be non-empty sequences of token ids >= 0"),
            (all(isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
                 for t, b in self.logit_bias), "logit_bias",
             "logit_bias must map token ids >= 0 to biases in [-100, 100]"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidRequest(message, name)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))

    @property
    def processes_logits(self) -> bool:
        """Whether the logits need the allowed-ids mask, bad words, a bias or penalties (min_tokens' mask: while
        the output is shorter; min_p: the sampler's)."""
        return self.allowed_token_ids is not None or bool(self.bad_words_ids) or bool(self.logit_bias) \
            or self.repetition_penalty != 1 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_default_problem(name: str, value) -> str | None:
    """Why `value` cannot be the default of `name`, a generation_config field that requests leaving the matching
    field out get (max_new_tokens: max_tokens), or None when it can: a default no request could send would make
    every request that leaves the field out fail."""
    if name not in GENERATION_DEFAULT_FIELDS:
        return f"{name!r} is not one of {', '.join(GENERATION_DEFAULT_FIELDS)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if name == "max_new_tokens":
        return None if isinstance(value, int) and value >= 1 else f"max_new_tokens must be an int >= 1, got {value!r}"
    try:
        SamplingParams(**{name: max(value, 0) if name == "top_k" else value})   # top_k -1 is "off" in requests
    except ValueError as exc:
        return str(exc)
    return None


def chat_query(messages) -> str:
    """What the generator reads of a chat conversation (a request's `prompt_text`): its user messages' text joined
    by newlines, without the chat template, whatever the template options. `messages`: (role, text) pairs. The
    one definition for serving, training (the gate's negatives) and evaluation (the generic prompts)."""
    return "\n".join(text for role, text in messages if role == "user")


@dataclass(frozen=True)
class Example:
    """One demonstration (input -> output) that shapes a generated vector; never put in the target's prompt."""
    input: str
    output: str


@dataclass(frozen=True)
class SteeringSpec:
    """What to steer one request with: the `atv` object of the HTTP API, and of a model-id preset.

    The delta added to every steered layer is `scale * (G + vector_weight * N)`, where
      G = the generator's vector (mode "atv"; read from the query, or from `examples` when given), else 0,
      N = the named vector `vector` (a saved task vector), else 0.
    mode "vector" = the named vector alone (no generator run); "off" = no steering at all.
    """
    mode: SteeringMode = "atv"
    scale: float = 1.0
    vector: str | None = None                 # a named vector (the server's --vectors folder)
    vector_weight: float = 1.0                # weight of the named vector in the sum
    examples: tuple[Example, ...] = ()        # k demonstrations for the generator (mode "atv" only)

    def __post_init__(self):
        if self.mode not in ("atv", "vector", "off"):
            raise InvalidRequest(f"steering mode must be 'atv', 'vector' or 'off', got {self.mode!r}", "atv.mode")
        if self.mode == "vector" and not self.vector:
            raise InvalidRequest("steering mode 'vector' needs a named vector: set atv.vector to its name",
                                 "atv.vector")
        if self.vector_weight != 1.0 and not self.vector:
            raise InvalidRequest("atv.vector_weight weighs a named vector, and none is given: set atv.vector, or "
                                 "leave vector_weight out", "atv.vector_weight")
        if self.examples and self.mode != "atv":
            raise InvalidRequest(f"atv.examples shape the generated vector, so they need mode 'atv', not "
                                 f"{self.mode!r}", "atv.examples")
        object.__setattr__(self, "examples", tuple(self.examples))

    @property
    def uses_generator(self) -> bool:
        return self.mode == "atv"

    @property
    def uses_named_vector(self) -> bool:
        return self.mode != "off" and self.vector is not None

    @property
    def steers(self) -> bool:
        """Whether a delta is added at all (mode off or scale 0 leave the target's hidden states alone)."""
        return self.mode != "off" and self.scale != 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None             # None only for a prompt's first token (nothing predicts it)
    top: list[tuple[int, float]]      # (token id, logprob), best first
    rank: int | None = None           # 1 + how many tokens are more likely (vLLM's prompt_logprobs report it)
    text: str = ""                    # the token decoded alone (filled in by the engine)
    top_text: list[str] = field(default_factory=list)  # the same for each entry of `top`
    raw: bytes = b""                  # the token's own bytes (U+FFFD in `text` for part of a UTF-8 character)
    top_raw: list[bytes] = field(default_factory=list)  # the same for each entry of `top`


@dataclass(frozen=True)
class SteeringReport:
    """What steering was applied to one request: mode, scale, the named vector; for an applied delta its norm,
    the generator's gate and the generator time of the batch that made the generated part."""
    mode: SteeringMode
    scale: float
    vector: str | None = None         # the named vector applied, if any
    vector_norm: float | None = None
    gate: float | None = None
    generator_s: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    text_delta: str
    token_ids: list[int]              # tokens produced this step
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_field: str | None = None    # with an error: the request's part at fault (as InvalidRequest.field), when
                                      # the request itself was unservable (HTTP 400), else None (a server failure)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steering: SteeringReport | None = None  # what was applied (set once the request reached a prefill)
    queue_time_s: float | None = None # arrival -> admission into a prefill batch
    prompt_logprobs: list[TokenLogprob] | None = None  # every prompt token's, once, with the first output
    stop_reason: int | str | None = None  # vLLM's: the stop_token_ids token or stop string that ended it (EOS: None)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    steering: SteeringSpec = field(default_factory=SteeringSpec)
    prompt_text: str = ""             # what the generator reads (through its input template)
    vector: object | None = None      # optional precomputed [L_sel, d] tensor used instead of the generator's
    cache_salt: str | None = None     # prefix cache: blocks are shared only between requests with the same salt
    on_output: Callable[[RequestOutput], None] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    output: OutputText | None = None  # the streamed text (detokenizer and stop strings), made by the engine
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # see RequestOutput.stop_reason
    error: str | None = None
    error_field: str | None = None    # see RequestOutput.error_field
    vector_slot: int = 0              # 0 = unsteered; kept while preempted, so recompute steers the same
    steering_key: bytes | None = None # digest of the delta in its slot (set with the slot): prefix-cache identity
    block_table: list[int] = field(default_factory=list)   # KV blocks: token p lives in block_table[p // size]
    num_computed_tokens: int = 0      # tokens of prompt + output whose K/V are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of its first full blocks (prefix cache)
    num_preemptions: int = 0          # times its blocks were taken back (it then recomputes from its tokens)
    steering_report: SteeringReport | None = None
    scheduled_time: float | None = None   # first admission into a batch (queue time)
    first_token_time: float | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per prompt token scored so far
    prompt_logprobs_sent: bool = False
    vector_job: VectorJob | None = None   # its generator vector while being made off the engine thread

    @property
    def output_text(self) -> str:
        """The text streamed so far (stop strings removed once matched)."""
        return self.output.text if self.output is not None else ""

    @property
    def ready(self) -> bool:
        """Whether the scheduler may admit it: nothing it needs is still being made (its generator vector)."""
        return self.vector_job is None or self.vector_job.done

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(start - n, 0): end - n]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: FinishReason, error: str | None = None, error_field: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error, self.error_field = error, error_field
