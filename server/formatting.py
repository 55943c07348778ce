"""OpenAI response bodies and server-sent-event chunks, built from a Job's choices.

`CompletionFormat` (object "text_completion") and `ChatFormat` ("chat.completion", chunks
"chat.completion.chunk" with `delta`s) share one interface used by the routes:

    opening(choice)     first chunk of a choice (chat: the assistant role; completions: the echoed prompt)
    chunk(choice, out)  the chunk for one engine output (None when there is nothing to send yet)
    usage_chunk(job)    the final `choices: []` chunk of `stream_options.include_usage`
    response(job)       the whole non-streaming body

Every body and every finishing chunk carries an `atv` object saying what steering was applied. Token texts
(logprobs) come decoded from the engine; no tokenizer is used here. `response(...)` builds a whole body: the
routes run it, and its JSON encoding, off the event loop (large bodies take a while).
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import time

from atv_core.engine.request import RequestOutput, TokenLogprob
from atv_core.engine.request import SteeringReport as EngineSteeringReport

from .jobs import Choice, Job
from .schemas import (AssistantMessage, ChatChoice, ChatCompletionResponse, ChatLogprobs, CompletionChoice,
                      CompletionLogprobs, CompletionResponse, PromptLogprob, PromptLogprobs, SteeringReport,
                      TokenLogprobEntry, TopLogprob, Usage)

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def steering_report(report: EngineSteeringReport | None) -> SteeringReport | None:
    return SteeringReport(**dataclasses.asdict(report)) if report is not None else None


def usage(job: Job) -> Usage:
    return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
                 total_tokens=job.prompt_tokens + job.completion_tokens)


def choice_usage(choice: Choice, completion_tokens: int) -> dict:
    """One choice's usage after `completion_tokens` tokens (vLLM's `continuous_usage_stats` chunks)."""
    prompt = len(choice.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


class _Format:
    chunk_object = ""

    def __init__(self, response_id: str, model: str, logprobs: bool, prompt_top: int | None = None):
        self.id, self.model, self.want_logprobs = response_id, model, logprobs   # logprobs: the client asked for them
        self.prompt_top = prompt_top   # vLLM's prompt_logprobs: alternatives per prompt token (None: not asked)
        self.created = int(time.time())

    def prompt_logprobs(self, choice: Choice) -> PromptLogprobs | None:
        """vLLM's `prompt_logprobs` of a choice: per prompt token null (the first) or {token id: logprob, rank,
        decoded_token}, the prompt token's own entry first, then the `prompt_top` most likely."""
        if self.prompt_top is None:
            return None
        out = []
        for e in choice.prompt_logprobs:
            if e.logprob is None:
                out.append(None)
                continue
            entries = {str(e.token_id): PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=e.text)}
            for rank, ((token, logprob), text) in enumerate(zip(e.top[:self.prompt_top], e.top_text), start=1):
                entries.setdefault(str(token), PromptLogprob(logprob=logprob, rank=rank, decoded_token=text))
            out.append(entries)
        return out

    def envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage_chunk(self, job: Job) -> dict:
        return {**self.envelope(self.chunk_object, []), "usage": usage(job).model_dump()}

    def _finish_fields(self, choice: Choice, out: RequestOutput) -> dict:
        if not out.finished:
            return {"finish_reason": None}
        report = steering_report(choice.steering)
        return {"finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                "atv": report.model_dump() if report else None}


class CompletionFormat(_Format):
    chunk_object = "text_completion"

    def __init__(self, response_id: str, model: str, logprobs: int | None, echo: bool, prompt_top: int | None = None):
        super().__init__(response_id, model, logprobs is not None, prompt_top)
        self.top_n, self.echo = logprobs, echo   # (the engine may score the prompt with more: prompt_top)
        self._offsets: dict[int, TextOffsets] = {}   # choice index -> offsets of its tokens so far (streaming)

    def logprobs(self, entries: list[TokenLogprob], offsets: "TextOffsets",
                 prompt: list[TokenLogprob] = ()) -> CompletionLogprobs:
        """tokens, token_logprobs, top_logprobs, text_offset of the (echoed) `prompt` tokens, then of `entries`
        (a prompt's first token: logprob and top null). Each top_logprobs entry holds the `logprobs` most likely
        tokens and the chosen one (as vLLM)."""
        text_offset = [offsets.take(e.raw) for e in prompt]
        if prompt:
            offsets.boundary()      # the echo and the completion are decoded apart
        text_offset += [offsets.take(e.raw) for e in entries]
        entries = [*prompt, *entries]
        return CompletionLogprobs(tokens=[e.text for e in entries], token_logprobs=[e.logprob for e in entries],
                                  text_offset=text_offset,
                                  top_logprobs=[None if e.logprob is None else
                                                {text: lp for text, (_, lp) in zip(e.top_text, e.top[:self.top_n])} |
                                                {e.text: e.logprob} for e in entries])

    def _first_offset(self, choice: Choice, with_prompt: bool) -> "TextOffsets":
        """Offsets from the text's start when the prompt's tokens are listed too, else after the echoed prompt."""
        return TextOffsets(len(choice.echo_text) if self.echo and not with_prompt else 0)

    def opening(self, choice: Choice) -> dict | None:
        if not self.echo:
            return None
        return self.envelope(self.chunk_object, [{"index": choice.index, "text": choice.echo_text,
                                                  "logprobs": None, "finish_reason": None}])

    def chunk(self, choice: Choice, out: RequestOutput) -> dict | None:
        if not (out.text_delta or out.logprobs or out.prompt_logprobs or out.finished):
            return None
        logprobs = None
        prompt = out.prompt_logprobs if self.echo else None   # (streamed: vLLM's prompt_logprobs are refused)
        if self.want_logprobs and (out.logprobs or prompt):   # prompt logprobs: once, with the first output
            if prompt or choice.index not in self._offsets:
                self._offsets[choice.index] = self._first_offset(choice, bool(prompt))
            logprobs = self.logprobs(out.logprobs or [], self._offsets[choice.index], prompt or [])
        body = {"index": choice.index, "text": out.text_delta,
                "logprobs": logprobs.model_dump() if logprobs else None, **self._finish_fields(choice, out)}
        return self.envelope(self.chunk_object, [body])

    def response(self, job: Job) -> CompletionResponse:
        choices = []
        for c in job.choices:
            prefix = c.echo_text if self.echo else ""
            logprobs = None
            if self.want_logprobs:   # echo: prompt tokens, then the completion's
                prompt = c.prompt_logprobs if self.echo else []
                logprobs = self.logprobs(c.logprobs, self._first_offset(c, bool(prompt)), prompt)
            choices.append(CompletionChoice(index=c.index, text=prefix + c.text, logprobs=logprobs,
                                            prompt_logprobs=self.prompt_logprobs(c),
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                            atv=steering_report(c.steering)))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=usage(job), atv=choices[0].atv)


class TextOffsets:
    """`text_offset` of consecutive tokens: where each starts in the text, in characters. Counted from the tokens'
    bytes, so that a token holding part of a UTF-8 character (its text alone: U+FFFD) adds nothing until the
    token that completes the character, and the offsets stay those of the text (as OpenAI's)."""

    def __init__(self, start: int):
        self.next = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, raw: bytes) -> int:
        """The offset of a token with these bytes; advances past it."""
        offset = self.next
        held = self._utf8.getstate()[0]
        if held and raw and not _continues(held, raw[:1]):
            offset += 1             # the held bytes end as one U+FFFD before this token
        self.next += len(self._utf8.decode(raw))
        return offset

    def boundary(self) -> None:
        """End of a separately decoded text (the echo): bytes held become one U+FFFD, and decoding restarts."""
        self.next += len(self._utf8.decode(b"", final=True))
        self._utf8.reset()


def _continues(held: bytes, byte: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(held + byte)
        return True
    except UnicodeDecodeError:
        return False


class ChatFormat(_Format):
    chunk_object = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, logprobs: bool, role: str = "assistant",
                 prompt_top: int | None = None):
        super().__init__(response_id, model, logprobs, prompt_top)
        self.role = role   # the reply's: the assistant's, or (no generation prompt) the continued message's, as vLLM

    def logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        def top(text: str, raw: bytes, logprob: float) -> TopLogprob:
            return TopLogprob(token=text, logprob=logprob, bytes=list(raw))

        return ChatLogprobs(content=[TokenLogprobEntry(**top(e.text, e.raw, e.logprob).model_dump(),
                                                       top_logprobs=[top(text, raw, lp) for text, raw, (_, lp) in
                                                                     zip(e.top_text, e.top_raw, e.top, strict=True)])
                                     for e in entries])

    def opening(self, choice: Choice) -> dict:
        return self.envelope(self.chunk_object, [{"index": choice.index, "delta": {"role": self.role, "content": ""},
                                                  "logprobs": None, "finish_reason": None}])

    def chunk(self, choice: Choice, out: RequestOutput) -> dict | None:
        if not (out.text_delta or out.logprobs or out.finished):
            return None
        delta = {"content": out.text_delta} if out.text_delta else {}
        logprobs = self.logprobs(out.logprobs).model_dump() if out.logprobs else None
        body = {"index": choice.index, "delta": delta, "logprobs": logprobs, **self._finish_fields(choice, out)}
        return self.envelope(self.chunk_object, [body])

    def response(self, job: Job) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(role=self.role, content=c.text),
                              logprobs=self.logprobs(c.logprobs) if self.want_logprobs else None,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                              atv=steering_report(c.steering))
                   for c in job.choices]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage(job), prompt_logprobs=self.prompt_logprobs(job.choices[0]),
                                      atv=choices[0].atv)
