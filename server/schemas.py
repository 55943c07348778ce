"""Pydantic models of the HTTP API: OpenAI completions and chat requests plus the `atv` steering extension,
and the non-streaming response bodies.

Bad input is refused by the schema itself (bounds, Literal, strict types: a float `top_k` or a string
`temperature` is a 400), never by hand-written checks; the only checks left to the routes are the ones
that depend on the loaded model or the settings (model name, prompt length, max_tokens limit). Unknown
fields are ignored, as OpenAI clients send fields this server does not use; OpenAI fields it does not implement
(best_of, suffix, response_format, tools, tool_choice, functions, function_call) and vLLM's extensions it does not
implement (guided_*, structured_outputs, use_beam_search, ...) pass only with their neutral
values, and anything else is a 400 rather than silently dropped. Streaming chunks are plain
dicts built in server/formatting.py, in OpenAI's chunk shape.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator,
                      model_validator)

from atv_core.engine.tokenization import ChatTemplateOptions

INT64_MAX = 2**63 - 1
MAX_PROMPTS = 64

# strict: a JSON int is accepted as a float, a string is not; NaN and Infinity are refused
Scale = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100.0, le=100.0)]
Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=2.0)]
TopP = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100.0, le=100.0)]


def valid_unicode(text: str) -> str:
    """JSON can carry an unpaired surrogate ("\\ud800"), which no tokenizer can encode: refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"character {exc.start} is an unpaired surrogate ({text[exc.start]!r}); "
                         "send valid Unicode text") from None
    return text


Text = Annotated[StrictStr, AfterValidator(valid_unicode)]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1), AfterValidator(valid_unicode)]


def neutral_only(*neutral):
    """An OpenAI field this server does not implement: its neutral values pass, anything else is a 400 (never
    silently dropped: a client asking for a penalty or a JSON format must learn it did not get one)."""
    def check(value):
        # strict, like every other field: `false` is not 0, nor `1.0` the integer 1
        if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
            shown = " or send " + " or ".join(json.dumps(v) for v in neutral) if neutral else ""
            raise ValueError(f"not supported by this server; leave it out{shown}")
        return value
    return AfterValidator(check)


def has_text(word: str) -> str:
    if not word.strip():
        raise ValueError("a bad word must have a character other than whitespace")
    return word


def token_id_key(key: str) -> str:
    """logit_bias keys are token ids written as JSON strings ("50256"), as OpenAI's."""
    if not (key.isascii() and key.isdigit()):
        raise ValueError(f"keys are token ids, e.g. \"42\"; got {key!r}")
    return key


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
StopStrings = NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=4)]


class ExampleOption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Text
    output: Text


class SteeringOptions(BaseModel):
    """The `atv` extension: which steering to apply to this request (engine: `SteeringSpec`).

    delta = scale * (generated + vector_weight * named): mode atv = the generator's vector (read from the
    prompt, or from `examples`), plus the named `vector` when one is given; mode vector = the named vector
    alone; off = none."""
    model_config = ConfigDict(extra="forbid")

    mode: Literal["atv", "vector", "off"] | None = Field(
        None, description="atv: the generator's vector for this prompt; vector: the named vector alone; off: the "
        "plain target. Default: vector when `vector` is given, else atv when a generator is loaded, else off")
    scale: Scale = Field(1.0, description="multiplies the whole steering delta (after the checkpoint's "
                                          "lambda and gate); 0 applies none")
    vector: NonEmptyStr | None = Field(None, description="a named vector from the server's vectors folder")
    vector_weight: Scale = Field(1.0, description="weight of the named vector when added to the generated one")
    examples: list[ExampleOption] | None = Field(None, max_length=64, description=(
        "demonstrations (input -> output) from which the generator builds the vector; the target's prompt "
        "holds the query alone"))


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = Field(None, description="a last chunk with the request's usage (null: as "
                                             "continuous_usage_stats)")
    continuous_usage_stats: StrictBool | None = Field(None, description="vLLM's extension: every chunk also carries "
                                                      "its choice's usage so far (and, unless include_usage is false, "
                                                      "the last chunk the request's)")

    @property
    def usage(self) -> tuple[bool, bool]:
        """(a last usage chunk, usage in every chunk); continuous_usage_stats alone implies both, as in vLLM."""
        last = self.include_usage if self.include_usage is not None else bool(self.continuous_usage_stats)
        return last, last and bool(self.continuous_usage_stats)


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""
    model: Text | None = Field(None, description="a model id of GET /v1/models: the served base id, or a "
                                    "steering preset <base>:off | :atv | :vector/<name>")
    # temperature, top_p, top_k, min_p, repetition_penalty left out (or null): the model's generation_config
    # where it sets them (--generation-config auto, as vLLM), else 1, 1, none, 0, 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=2**31 - 1)] | None = Field(None, description="-1 or 0: no top-k")
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: StopStrings | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=INT64_MAX)] | None = Field(
        None, description="choice i of n uses seed + i")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    ignore_eos: StrictBool = Field(False, description="extension: keep generating past end-of-sequence")
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=64)] | None = Field(
        None, description="vLLM's extension: token ids that end the completion (not part of the text)")
    atv: SteeringOptions | None = None
    # logit processing (atv_core/engine/logits_processors.py; min_p in the sampler); null: none
    frequency_penalty: Penalty | None = Field(None, description="subtracted from a token's logit per occurrence in "
                                              "the output so far")
    presence_penalty: Penalty | None = Field(None, description="subtracted once from the logit of a token that "
                                             "is in the output so far")
    logit_bias: dict[Annotated[str, AfterValidator(token_id_key)], Bias] | None = Field(
        None, description="token id (a JSON string key) -> bias added to its logit, -100..100")
    cache_salt: NonEmptyStr | None = Field(None, description="vLLM's extension: prefix-cache blocks are shared only "
                                           "between requests with the same salt (none: with unsalted requests)")
    allowed_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] | None = Field(
        None, description="vLLM's extension: only these token ids may be sampled (e.g. a classifier's labels)")
    repetition_penalty: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=100.0)] | None = Field(
        None, description="vLLM's extension: a logit of a token in the prompt or the output is divided by it when "
        "positive, multiplied when negative (1: none)")
    min_p: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)] | None = Field(
        None, description="vLLM's extension: after the temperature, drop tokens less likely than min_p times the "
        "most likely one")
    min_tokens: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] | None = Field(
        None, description="vLLM's extension: before this many tokens, EOS and stop_token_ids cannot be sampled and "
        "stop strings are not matched")
    include_stop_str_in_output: StrictBool | None = Field(
        None, description="vLLM's extension: the text ends with the stop string (or stop token) that ended it")
    skip_special_tokens: StrictBool | None = Field(None, description="vLLM's extension: false keeps special "
                                                   "tokens' text in the output")
    bad_words: Annotated[list[Annotated[NonEmptyStr, AfterValidator(has_text)]], Field(max_length=256)] | None = \
        Field(None, description="vLLM's extension: words the output may not contain (each as written and, as a "
              "word mid-text, after a space); only output tokens count")
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = Field(
        None, description="vLLM's extension: each prompt token's logprob and rank, and that many most likely "
        "alternatives (a completion choice's `prompt_logprobs`; chat: the response's); not with stream")
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = Field(
        None, description="vLLM's extension: keep only the prompt's last k tokens (left truncation; -1: the "
        "context's length); the generator then reads the kept tokens' text (chat: the user messages, as always)")
    # vLLM's sampling extensions not implemented here: only their neutral values are accepted
    spaces_between_special_tokens: Annotated[object, neutral_only(True)] = None
    use_beam_search: Annotated[object, neutral_only(False)] = None
    guided_json: Annotated[object, neutral_only()] = None
    guided_regex: Annotated[object, neutral_only()] = None
    guided_choice: Annotated[object, neutral_only()] = None
    guided_grammar: Annotated[object, neutral_only()] = None
    guided_whitespace_pattern: Annotated[object, neutral_only()] = None
    response_format: Annotated[object, neutral_only({"type": "text"})] = None   # vLLM's on completions too
    structured_outputs: Annotated[object, neutral_only()] = None
    logprob_token_ids: Annotated[object, neutral_only()] = None
    return_tokens_as_token_ids: Annotated[object, neutral_only(False)] = None
    return_token_ids: Annotated[object, neutral_only(False)] = None
    length_penalty: Annotated[object, neutral_only(1.0, 1)] = None     # beam search's
    priority: Annotated[object, neutral_only(0)] = None
    thinking_token_budget: Annotated[object, neutral_only(-1)] = None
    repetition_detection: Annotated[object, neutral_only()] = None
    vllm_xargs: Annotated[object, neutral_only()] = None
    kv_transfer_params: Annotated[object, neutral_only()] = None

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value, info):
        if value is not None and info.data.get("stream"):
            raise ValueError("not available with stream true (as vLLM); send stream false, or echo with logprobs")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value):
        if value == 0:
            raise ValueError("0 keeps no prompt token: send k >= 1 (the last k tokens) or -1 (the context's length)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value, info):
        if value is not None and value.model_fields_set and info.data.get("stream") is False:   # {}: as vLLM
            raise ValueError("only allowed with stream true (as vLLM); leave it out or send stream true")
        return value

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]) = Field(
        description="one string, a list of strings, one list of token ids, or a list of such lists (n choices each)")
    max_tokens: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] | None = Field(
        None, description="omitted or null: 16 (the server's limit if lower), at most what the context leaves after "
        "the prompt; 0 only with echo: the prompt back, "
        "scored with logprobs, nothing sampled")
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool = Field(False, description="prepend the prompt; with logprobs, also the prompt tokens' logprobs "
                             "(the first one null), computed with this request's steering")
    best_of: StrictInt | None = Field(None, description="only equal to n: every candidate is returned, as nothing "
                                      "ranks candidates here")
    suffix: Annotated[object, neutral_only("")] = None
    # vLLM's completions extensions not implemented here
    add_special_tokens: Annotated[object, neutral_only(True)] = None    # special tokens are added, as vLLM's default
    prompt_embeds: Annotated[object, neutral_only()] = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info):
        if value is not None and "n" in info.data and value != info.data["n"]:   # (a bad n: its own error)
            n = info.data["n"]
            raise ValueError(f"not supported by this server unless equal to n ({n}); leave it out or send {n}")
        return value

    @property
    def echo_logprobs(self) -> int | None:
        """Alternatives per prompt token: echo with logprobs scores the prompt."""
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatTemplateFields(BaseModel):
    """vLLM's chat-template options (chat completions and /tokenize with messages)."""
    add_generation_prompt: StrictBool = Field(True, description="end the prompt with the opening of the "
                                              "assistant's turn")
    continue_final_message: StrictBool = Field(False, description="end the prompt inside the last message, which "
                                               "the completion continues (e.g. an assistant prefill); needs "
                                               "add_generation_prompt false")
    chat_template_kwargs: dict[str, object] | None = Field(None, description="more variables for the chat "
                                                           "template, e.g. {\"enable_thinking\": false}")
    chat_template: Annotated[object, neutral_only()] = None     # vLLM's, not implemented here (a template per request)

    # ChatTemplateOptions checks both (a ValueError with the fix), here so that the error names its field
    @field_validator("continue_final_message")
    @classmethod
    def _not_both(cls, value, info):
        ChatTemplateOptions(bool(info.data.get("add_generation_prompt")), value)
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _variables_only(cls, value):
        ChatTemplateOptions(kwargs=tuple((value or {}).items()))
        return value

    @property
    def template_options(self) -> ChatTemplateOptions:
        return ChatTemplateOptions(self.add_generation_prompt, self.continue_final_message,
                                   tuple((self.chat_template_kwargs or {}).items()))


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | None = Field(
        None, description="null: up to the server's limit and the context")
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None        # OpenAI's chat range (completions: 5)
    tools: Annotated[object, neutral_only([])] = None
    tool_choice: Annotated[object, neutral_only("none", "auto")] = None
    functions: Annotated[object, neutral_only([])] = None          # the deprecated form of tools
    function_call: Annotated[object, neutral_only("none", "auto")] = None
    modalities: Annotated[object, neutral_only(["text"])] = None   # audio output
    audio: Annotated[object, neutral_only()] = None
    prediction: Annotated[object, neutral_only()] = None           # predicted outputs
    web_search_options: Annotated[object, neutral_only()] = None
    # accepted and ignored, as vLLM: service_tier, reasoning_effort (no reasoning model is served here)
    # vLLM's chat extensions not implemented here
    documents: Annotated[object, neutral_only([])] = None
    echo: Annotated[object, neutral_only(False)] = None
    add_special_tokens: Annotated[object, neutral_only(False)] = None   # the template writes the special tokens
    mm_processor_kwargs: Annotated[object, neutral_only({})] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value and "logprobs" in info.data and not info.data["logprobs"]:   # (a bad logprobs: its own error)
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(ChatTemplateFields):
    """vLLM's POST /tokenize: a prompt, or chat messages (through the chat template with the chat options, by
    default ending with the opening of the assistant's turn), tokenized exactly as generation tokenizes them."""
    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    return_token_strs: StrictBool = Field(False, description="also each token decoded alone")
    # vLLM's option, at the value generation uses (a prompt: special tokens added; messages: the template's own)
    add_special_tokens: StrictBool | None = None
    tools: Annotated[object, neutral_only([])] = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send either prompt or messages (exactly one)")
        if self.prompt is not None and self.template_options != ChatTemplateOptions():
            raise ValueError("add_generation_prompt, continue_final_message and chat_template_kwargs apply to "
                             "messages only")
        return self

    @field_validator("add_special_tokens")
    @classmethod
    def _as_generation(cls, value, info):
        chat = info.data.get("messages") is not None
        if value is not None and value == chat:   # a prompt: true; messages: false
            raise ValueError(f"only {str(not chat).lower()} here, as generation tokenizes "
                             f"{'messages' if chat else 'a prompt'}; leave it out")
        return value


class DetokenizeRequest(BaseModel):
    model: Text | None = None
    tokens: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=1 << 20)]


# ---- responses ----------------------------------------------------------------------------------
class SteeringReport(BaseModel):
    """What was applied to a request: mode, scale and the named vector; for an applied delta also its norm,
    the generator's gate, and the generator time of the batch that made the generated part."""
    mode: str
    scale: float
    vector: str | None = None
    vector_norm: float | None = None
    gate: float | None = None
    generator_s: float | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]            # None: a prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's entry of `prompt_logprobs` (keyed by token id)."""
    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]   # per prompt token; the first null (nothing predicts it)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = Field(None, description="vLLM's: the stop_token_ids token or stop string that "
                                          "ended the choice (null: EOS, length, or not finished)")
    atv: SteeringReport | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    atv: SteeringReport | None = Field(None, description="the first choice's steering (each choice has its own)")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class AssistantMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = "assistant"   # not the assistant's: a message
    content: str                                                               # continued without generation prompt


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = Field(None, description="vLLM's: the stop_token_ids token or stop string that "
                                          "ended the choice (null: EOS, length, or not finished)")
    atv: SteeringReport | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None
    atv: SteeringReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "atv"
    root: str
    parent: str | None = Field(None, description="the base model id, for a steering preset")
    steering: str | None = Field(None, description="the steering mode a request without an `atv` field gets with "
                                 "this id (the base id: the server's default, atv with a generator, else off)")
    vector: str | None = Field(None, description="the preset's named vector")
    max_model_len: int | None = None
    has_generator: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str] = Field(description="names of the named vectors now served")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
