"""The OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}].

A route turns the validated body into choices (prompt ids from the engine's tokenizer worker, chat through
its chat template; SamplingParams; SteeringSpec), runs them as a Job, and answers JSON (built and encoded
on a worker thread) or an SSE stream. Checks that depend on the model or the settings (model name, prompt
and max_tokens limits) are made here or by the engine; everything else was refused by the schema. The
only engine object used is the AsyncEngine (state.engine).
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from atv_core.engine.async_engine import PromptTooLong
from atv_core.engine.request import (Example, InvalidRequest, RequestOutput, SamplingParams, SteeringSpec,
                                     chat_query)

from .errors import APIError, from_engine_error
from .formatting import DONE, ChatFormat, CompletionFormat, choice_usage, sse
from .jobs import Choice, Job, JobStopped, stopped_error
from .schemas import (ChatCompletionRequest, ChatCompletionResponse, ChatTemplateFields, CompletionRequest,
                      CompletionResponse, ModelCard, ModelList, SamplingFields, VectorList)
from .state import Preset, ServingState

log = logging.getLogger("atv.server")

MAX_CHOICES = 128
COMPLETION_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions (chat: what the context leaves)
# Below this a temperature means greedy and a top_p keeps only the top token (vLLM's convention). Smaller
# values underflow to 0 in float32, and the engine's sampler then indexes token -1, killing the engine loop.
SAMPLING_EPS = 1e-5
_ERRORS = {status: {"description": text} for status, text in [
    (400, "invalid field"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "prompt does not fit the context"), (429, "waiting queue full (Retry-After)"),
    (503, "loading, draining or engine dead"), (504, "request timed out")]}


def api_router(state: ServingState) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(state.check_api_key)], responses=_ERRORS)

    def cards() -> list[ModelCard]:
        engine, base = state.engine, state.settings.model_id
        default = None if engine is None else "atv" if engine.has_generator else "off"   # (unknown while loading)
        return [ModelCard(id=p.id, created=state.started, root=state.settings.model,
                          parent=None if p.id == base else base, steering=p.mode or default, vector=p.vector,
                          max_model_len=engine.limits.max_model_len if engine else None,
                          has_generator=bool(engine and engine.has_generator)) for p in state.presets()]

    @router.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=cards())

    @router.get("/models/{model_id:path}", response_model=ModelCard)   # ids hold ':' and '/' (preset ids)
    async def model(model_id: str) -> ModelCard:
        for card in cards():
            if card.id == model_id:
                return card
        raise APIError(404, f"model {model_id!r} does not exist; GET /v1/models lists the served ids", "model",
                       "model_not_found")

    @router.post("/vectors/reload", response_model=VectorList)
    async def reload_vectors() -> VectorList:
        engine, _ = state.admit(None)
        try:
            names = await engine.reload_vectors()
        except ValueError as exc:
            log.warning("vectors reload refused, the previous set kept: %s", exc)
            raise APIError(400, str(exc), code="invalid_vectors") from None
        return VectorList(data=names)

    @router.post("/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        engine, preset = state.admit(body.model)
        steering = steering_spec(body, engine, preset)
        choices = await completion_choices(body, engine, state)
        if _default_steering(body, preset, steering):
            unsteer_unreadable(choices)
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex[:24]}", preset.id, body.logprobs, body.echo,
                               body.prompt_logprobs)
        return await respond(state, request, body, choices, steering, fmt, "completions", preset.id)

    @router.post("/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine, preset = state.admit(body.model)
        steering = steering_spec(body, engine, preset)
        choices = await chat_choices(body, engine, state)
        if _default_steering(body, preset, steering):
            unsteer_unreadable(choices)
        elif steering.mode == "atv" and steering.scale != 0 and not choices[0].prompt_text.strip():
            raise APIError(400, "atv steering reads the user messages, and they are empty; send user content "
                           "or atv.mode 'off'", "messages")
        role = "assistant" if body.add_generation_prompt else body.messages[-1].role     # as vLLM
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex[:24]}", preset.id, body.logprobs, role, body.prompt_logprobs)
        return await respond(state, request, body, choices, steering, fmt, "chat", preset.id)

    return router


# ---- requests -> choices ------------------------------------------------------------------------
async def completion_choices(body: CompletionRequest, engine, state: ServingState) -> list[Choice]:
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 samples nothing: send it with echo true (the prompt back; with logprobs "
                       "also scored)", "max_tokens")
    # echo with max_tokens 0 is the prompt back (OpenAI); the engine runs it as a prompt scoring, logprobs or not;
    # vLLM's prompt_logprobs too: the engine scores the prompt once with the larger number of alternatives
    echoed = body.echo_logprobs if body.echo_logprobs is not None or body.max_tokens != 0 else 0
    prompt_logprobs = max((k for k in (echoed, body.prompt_logprobs) if k is not None), default=None)
    _check_choice_count(len(body.prompts) * body.n, engine)
    keep, bad_words = _truncation(body, engine, state), await _bad_words(body, engine)
    choices = []
    for p, prompt in enumerate(body.prompts):
        ids, text, cut = await prompt_ids(prompt, engine, keep)
        max_tokens = _max_tokens(body.max_tokens, len(ids), engine, state, "prompt", COMPLETION_DEFAULT_MAX_TOKENS)
        # echo gives the prompt as sent; a token-id prompt's (or a truncated one's) every token, special ones too,
        # as its logprobs do
        echo = "" if not body.echo else prompt if isinstance(prompt, str) and not cut else \
            await engine.decode(ids, skip_special_tokens=False)
        choices += _choices(body, p, ids, text, max_tokens, body.logprobs, len(choices), prompt_logprobs, echo,
                            state.sampling_defaults, bad_words)
    return choices


async def chat_choices(body: ChatCompletionRequest, engine, state: ServingState) -> list[Choice]:
    _check_choice_count(body.n, engine)
    user_text = chat_query((m.role, m.text) for m in body.messages)   # what the generator reads
    keep = _truncation(body, engine, state)
    ids = await chat_ids(body, engine)
    ids = ids if keep is None else ids[-keep:]   # the template's text: its special tokens are in the text
    max_tokens = _max_tokens(body.max_new_tokens, len(ids), engine, state, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _choices(body, 0, ids, user_text, max_tokens, logprobs, 0, body.prompt_logprobs,
                    defaults=state.sampling_defaults, bad_words=await _bad_words(body, engine))


def _truncation(body: SamplingFields, engine, state: ServingState) -> int | None:
    """vLLM's truncate_prompt_tokens: how many of the prompt's last tokens to keep (-1: as many as this server
    takes: the context's length, or --max-prompt-tokens where lower)."""
    keep, context = body.truncate_prompt_tokens, engine.limits.max_model_len
    if keep is not None and keep > context:
        raise APIError(400, f"truncate_prompt_tokens is {keep}, over the context of {context} tokens: send at "
                       f"most {context}, or -1 for the context's length", "truncate_prompt_tokens")
    return min(context, state.settings.max_prompt_tokens or context) if keep == -1 else keep


async def _bad_words(body: SamplingFields, engine) -> tuple[tuple[int, ...], ...]:
    return tuple(await engine.bad_words_ids(body.bad_words)) if body.bad_words else ()


def _default_steering(body: SamplingFields, preset: Preset, steering: SteeringSpec) -> bool:
    """Whether the request gets the server's default generator steering without asking for it (no `atv` field,
    the base model id; an `atv` field, even `{}`, or the `:atv` id asks for it)."""
    return body.atv is None and preset.mode is None and steering.mode == "atv"


def unsteer_unreadable(choices: list[Choice]) -> None:
    """Default steering, prompts with no text for the generator (blank, or a chat without user content): served
    unsteered (their `atv.mode` reads "off") instead of refused; a request that asks for atv gets the 400."""
    for choice in choices:
        if not choice.prompt_text.strip():
            choice.spec = SteeringSpec("off")


async def prompt_ids(prompt: str | list[int], engine, keep: int | None = None) -> tuple[list[int], str, bool]:
    """(token ids, text the generator reads, whether they were cut) of a text prompt or a token-id prompt (checked
    against the vocab); keep: only its last `keep` tokens (truncate_prompt_tokens), whose text the generator reads."""
    if isinstance(prompt, str) and keep is not None:   # left truncation keeps the tokens the tokenizer adds (BOS)
        ids, cut = await encoded(engine.encode_last(prompt, keep), "prompt")
        return ids, await engine.decode(ids) if cut else prompt, cut
    if isinstance(prompt, str):
        return await encoded(engine.encode(prompt), "prompt"), prompt, False
    check_vocabulary(prompt, engine, "prompt")
    ids = prompt[-keep:] if keep is not None else list(prompt)   # token ids: the caller's own, cut as they are
    return ids, await engine.decode(ids), len(ids) < len(prompt)


async def chat_ids(body: ChatTemplateFields, engine) -> list[int]:
    """A request's conversation (`body.messages`) through the model's chat template with the request's options."""
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    return await encoded(engine.encode_chat(messages, body.template_options), "messages")


def check_vocabulary(ids: list[int], engine, param: str) -> None:
    bad = [t for t in ids if t >= engine.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})", param)


async def encoded(tokenization, param: str) -> list[int]:
    """Await the engine's tokenizer worker; its refusals as HTTP errors on `param`."""
    try:
        return await tokenization
    except PromptTooLong as exc:
        raise APIError(413, str(exc), param, "context_length_exceeded") from None
    except ValueError as exc:  # no chat template, or the template refused the conversation
        raise APIError(400, str(exc), param) from None


def _check_choice_count(count: int, engine) -> None:
    """Each choice is one engine request, all queued at once: more than the queue holds could never be admitted
    (a 429 would be retried forever)."""
    queue = engine.limits.max_waiting
    if count > min(MAX_CHOICES, queue):
        raise APIError(400, f"{count} choices (prompts x n) in one request; this server takes at most "
                       f"{min(MAX_CHOICES, queue)} (its waiting queue holds {queue})", "n")


def _max_tokens(requested: int | None, prompt_len: int, engine, state: ServingState, prompt_param: str,
                default: int | None = None) -> int:
    """The request's max_tokens, checked; unset: `default` (completions: 16, as OpenAI), else the generation
    config's max_new_tokens, else as many as the server allows, clamped to the room the prompt leaves in the
    context; either way at most --override-generation-config's max_new_tokens (as vLLM)."""
    limit, prompt_limit = state.settings.max_tokens, state.settings.max_prompt_tokens
    if prompt_limit is not None and prompt_len > prompt_limit:
        raise APIError(413, f"prompt has {prompt_len} tokens; this server accepts at most {prompt_limit}",
                       prompt_param, "context_length_exceeded")
    context = engine.limits.max_model_len
    if requested is None:
        requested = min(limit, context - prompt_len, default or state.default_max_tokens or limit)
        if requested < 1:
            raise APIError(413, f"prompt has {prompt_len} tokens, which fills the context of {context}",
                           prompt_param, "context_length_exceeded")
    requested = min(requested, state.max_tokens_cap or requested)   # vLLM: cut to it, not refused
    if requested > limit:
        raise APIError(400, f"max_tokens is {requested}; this server allows at most {limit}", "max_tokens")
    return requested


NEUTRAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_fields(body: SamplingFields, defaults: dict) -> dict:
    """temperature, top_p, top_k, min_p, repetition_penalty: the request's where it sets them, else the server's
    defaults (the model's generation_config), else the neutral values."""
    return {name: next(v for v in (getattr(body, name), defaults.get(name), neutral) if v is not None)
            for name, neutral in NEUTRAL_SAMPLING.items()}


def _choices(body: SamplingFields, prompt_index: int, ids: list[int], prompt_text: str, max_tokens: int,
             logprobs: int | None, first_index: int, prompt_logprobs: int | None = None,
             echo_text: str = "", defaults: dict | None = None,
             bad_words: tuple[tuple[int, ...], ...] = ()) -> list[Choice]:
    sampled = sampling_fields(body, defaults or {})
    choices = []
    for j in range(body.n):
        seed = None if body.seed is None else body.seed + j
        try:
            params = SamplingParams(max_tokens=max_tokens, top_k=max(sampled["top_k"], 0), seed=seed,
                                    temperature=sampled["temperature"] if sampled["temperature"] >= SAMPLING_EPS
                                    else 0.0, top_p=max(sampled["top_p"], SAMPLING_EPS), stop=body.stop_strings,
                                    stop_token_ids=tuple(body.stop_token_ids or ()),
                                    ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                    logit_bias=body.bias, repetition_penalty=sampled["repetition_penalty"],
                                    allowed_token_ids=None if body.allowed_token_ids is None
                                    else tuple(body.allowed_token_ids), bad_words_ids=bad_words,
                                    frequency_penalty=body.frequency_penalty or 0.0,
                                    presence_penalty=body.presence_penalty or 0.0, min_p=sampled["min_p"],
                                    min_tokens=body.min_tokens or 0,
                                    include_stop_str_in_output=bool(body.include_stop_str_in_output),
                                    skip_special_tokens=body.skip_special_tokens is not False)
        except ValueError as exc:   # InvalidRequest naming its field
            raise from_engine_error(exc) from exc
        choices.append(Choice(first_index + j, prompt_index, ids, prompt_text, params, echo_text,
                              cache_salt=body.cache_salt))
    return choices


def steering_spec(body: SamplingFields, engine, preset: Preset) -> SteeringSpec:
    """The request's `atv` field when given (it wins over the preset), else the preset the model id chose."""
    options = body.atv
    if options is None and preset.mode is not None:
        return SteeringSpec(preset.mode, vector=preset.vector)
    if options is None:
        return SteeringSpec("atv" if engine.has_generator else "off")
    mode = options.mode or ("vector" if options.vector else "atv" if engine.has_generator else "off")
    if mode == "atv" and not engine.has_generator:
        raise APIError(400, "steering mode 'atv' needs a generator, and this server has none; "
                       "send atv.mode 'off'", "atv.mode")
    examples = tuple(Example(e.input, e.output) for e in options.examples or ())
    try:
        return SteeringSpec(mode, options.scale, options.vector, options.vector_weight, examples)
    except ValueError as exc:   # InvalidRequest naming its field (atv.vector, ...)
        raise from_engine_error(exc) from exc


# ---- running and answering ----------------------------------------------------------------------
async def respond(state: ServingState, request: Request, body: SamplingFields, choices: list[Choice],
                  steering: SteeringSpec, fmt, endpoint: str, model_id: str):
    log_fields = {"endpoint": endpoint, "user": body.user, "model": model_id}
    if state.settings.log_prompts:
        log_fields["prompts"] = sorted({c.prompt_text for c in choices})
    job = Job(state.engine, state.metrics, choices, steering, fmt.id, state.settings.request_timeout, state.jobs,
              log_fields, model_id)
    prompt_param = "messages" if endpoint == "chat" else "prompt"
    try:
        job.start(request, prompt_param)
    except BaseException:
        job.close()
        raise
    if body.stream:
        include_usage, continuous = body.stream_options.usage if body.stream_options else (False, False)
        events = stream_events(job, fmt, include_usage, continuous, state.settings.request_timeout, prompt_param)
        return JobStreamingResponse(job, events)
    try:
        await collect(job, prompt_param)
        return Response(await asyncio.to_thread(render, fmt, job), media_type="application/json")
    except JobStopped as stopped:
        if stopped.reason == "disconnect":
            return Response(status_code=499)  # nobody is listening; the status is for the metrics
        raise stopped_error(stopped, state.settings.request_timeout) from None
    finally:
        job.close()


def render(fmt, job: Job) -> bytes:
    """The whole JSON body of a finished job (on a worker thread: large bodies take a while)."""
    return fmt.response(job).model_dump_json().encode()


async def collect(job: Job, prompt_param: str) -> None:
    async for choice, out in job.events():
        if out.finish_reason == "error":
            job.stop("failed")
            raise failed_error(out, prompt_param)


def failed_error(out: RequestOutput, prompt_param: str = "prompt") -> APIError:
    """A choice the engine ended with an error: a refusal on the field at fault when the request itself could not
    be served (a named vector removed by a reload after it was accepted: 400 on atv.vector), else a 500."""
    if out.error_field is not None:
        return from_engine_error(InvalidRequest(out.error, out.error_field), prompt_param)
    return APIError(500, f"generation failed: {out.error}", code="generation_failed")


async def stream_events(job: Job, fmt, include_usage: bool, continuous: bool, timeout_s: float, prompt_param: str):
    """SSE text: openings, one chunk per output, usage, [DONE]; a failure mid-stream is an error event.
    `continuous` (vLLM's continuous_usage_stats): every chunk also carries its choice's usage so far."""
    def sent(chunk: dict, choice, completion_tokens: int) -> str:   # usage as of this chunk's output
        return sse({**chunk, "usage": choice_usage(choice, completion_tokens)} if continuous else chunk)

    try:
        for choice in job.choices:
            if (opening := fmt.opening(choice)) is not None:
                yield sent(opening, choice, 0)
        async for choice, out in job.events():
            if out.finish_reason == "error":
                job.stop("failed")
                yield sse(failed_error(out, prompt_param).body())
                break
            if (chunk := fmt.chunk(choice, out)) is not None:
                yield sent(chunk, choice, out.completion_tokens)
        else:
            if include_usage:
                yield sse(fmt.usage_chunk(job))
    except JobStopped as stopped:
        if stopped.reason == "disconnect":
            return
        yield sse(stopped_error(stopped, timeout_s).body())
    except APIError as exc:
        yield sse(exc.body())
    finally:
        job.close()
    yield DONE


class JobStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its job however the response ends, even before the body started."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()

