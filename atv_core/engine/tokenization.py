"""Prompts -> token ids on one worker thread that owns its tokenizer, so the event loop never tokenizes.

`TokenizerWorker` runs every call on a single thread ("atv-tokenizer"): plain prompts, chat templates, and the
one scan of the vocabulary at start. HF fast tokenizers release the GIL while encoding, so a long prompt does
not stall the event loop either. Before any work, a prompt with more characters than any prompt that fits
can have is refused (`PromptTooLong`, HTTP 413):

    max_prompt_chars = max_model_len * (characters of the longest vocabulary entry decoded alone + 1)

(+1: SentencePiece decodes a word's leading space only in context). The bound holds when tokenization keeps
every character, which is checked once on a probe text; a tokenizer that drops characters (BERT's cleaning
and accent stripping, a fused unknown token) gets no bound, and every prompt is tokenized.
Knows nothing of the engine loop, requests or HTTP.
"""
from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from transformers import PreTrainedTokenizerBase

from atv_core.engine.llm_engine import PromptTooLong

# control and zero-width characters, a combining accent, runs of spaces, CJK, an emoji, a long rare word
PROBE = "a\u0301e\u0300 \x00\x07\u200b\ufeff\t\n   \u4e2d\u6587 \U0001f600 " + "\u2603" * 300 + " end"


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How a conversation goes through the chat template (vLLM's chat request fields)."""
    add_generation_prompt: bool = True       # end with the opening of the assistant's turn
    continue_final_message: bool = False     # end inside the last message, to be continued (an assistant prefill)
    kwargs: tuple[tuple[str, object], ...] = ()   # more variables for the template (e.g. enable_thinking)

    def __post_init__(self):   # the one place these are checked (the HTTP schema calls this too)
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt false (the prompt ends inside the "
                             "last message)")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & {k for k, _ in self.kwargs})
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)} (a parameter of the template "
                             "call, not a variable)")


# apply_chat_template's own parameters (read from the installed transformers), and the names the template is
# rendered with: not template variables
RESERVED_TEMPLATE_KWARGS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) \
    - {"kwargs"} | {"messages", "conversations"}


class TokenizerWorker:
    def __init__(self, tokenizer, max_model_len: int):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="atv-tokenizer")
        self._tokenizer = tokenizer   # used on the worker thread only, from here on
        self.max_model_len = max_model_len
        self.max_prompt_chars, self.has_chat_template = self._executor.submit(self._describe).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, e.g. BOS)."""
        self._check_chars(len(text), "prompt")
        return await self._run(self._encode, text, True)

    async def encode_last(self, text: str, keep: int) -> tuple[list[int], bool]:
        """vLLM's truncate_prompt_tokens: a prompt's ids cut to `keep` tokens from the left, the tokens the
        tokenizer adds (BOS, ...) kept, as transformers' left truncation -> (ids, whether anything was cut).
        The character bound still applies: it bounds the work of one request on this shared thread."""
        self._check_chars(len(text), "prompt")
        return await self._run(self._encode_last, text, keep)

    async def encode_chat(self, messages: list[dict[str, str]],
                          template: ChatTemplateOptions | None = None) -> list[int]:
        """Token ids of a conversation through the chat template (by default ending with the assistant's turn).
        ValueError when there is no template or it refuses the messages."""
        self._check_chars(sum(len(m["content"]) for m in messages), "conversation")
        return await self._run(self._encode_chat, messages, template or ChatTemplateOptions())

    async def bad_words_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        """vLLM's bad_words as the token sequences to block (bad_word_sequences)."""
        return await self._run(self._bad_words_ids, words)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (by default special tokens dropped: what the generator reads of a token-id
        prompt; kept: what `echo` returns of it)."""
        return await self._run(self._decode, ids, skip_special_tokens)

    async def token_texts(self, ids: list[int]) -> list[str]:
        """Each token decoded alone (special tokens kept), as logprobs report tokens."""
        return await self._run(self._token_texts, ids)

    # ---- on the worker thread -------------------------------------------------------------------
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token_texts(self, ids: list[int]) -> list[str]:
        return self._tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)

    def _encode_last(self, text: str, keep: int) -> tuple[list[int], bool]:
        full = self._encode(text, True)
        if len(full) <= keep:
            return full, False
        plain = self._encode(text, False)
        added = len(full) - len(plain)    # BOS, EOS, ...: where they sit is found, not assumed
        start = next((p for p in range(added + 1) if full[p:p + len(plain)] == plain), None)
        if start is None:
            return full[-keep:], True
        kept = max(keep - added, 0)   # (keep <= added: the added tokens alone, as transformers)
        return full[:start] + plain[len(plain) - kept:] + full[start + len(plain):], True

    def _bad_words_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        return bad_word_sequences(lambda text: self._encode(text, False), words)

    def _encode_chat(self, messages: list[dict[str, str]], template: ChatTemplateOptions) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions, or start the server with "
                             "--chat-template")
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=template.add_generation_prompt,
                continue_final_message=template.continue_final_message, **dict(template.kwargs))
        except Exception as exc:  # jinja2 errors: the template refuses this conversation (e.g. role order)
            raise ValueError(f"the chat template refused these messages: {exc}") from exc
        self._check_chars(len(text), "templated conversation")
        return self._encode(text, False)

    def _describe(self) -> tuple[int | None, bool]:
        tokenizer = self._tokenizer
        bound = self.max_model_len * (longest_token_chars(tokenizer) + 1) if keeps_characters(tokenizer) else None
        return bound, bool(getattr(tokenizer, "chat_template", None))

    def _check_chars(self, chars: int, what: str) -> None:
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise PromptTooLong(f"the {what} has {chars} characters; no text over {self.max_prompt_chars} "
                                f"characters fits the context of {self.max_model_len} tokens: shorten it")


def bad_word_sequences(encode: Callable[[str], list[int]], words: list[str]) -> list[tuple[int, ...]]:
    """vLLM's rule for bad_words: each word's tokens as written (leading spaces dropped), and also after one space
    when that gives another first token and as many tokens (the word mid-text, for tokenizers that fold the space
    into the word's token)."""
    out = []
    for word in words:
        plain, spaced = (tuple(encode(prefix + word.lstrip())) for prefix in ("", " "))
        out += [plain] if plain else []
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry decoded alone (special tokens included)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return max(map(len, texts), default=1)


def keeps_characters(tokenizer) -> bool:
    """Whether encoding then decoding PROBE gives back at least as many characters."""
    ids = tokenizer(PROBE, add_special_tokens=False).input_ids
    return len(tokenizer.decode(ids, skip_special_tokens=True)) >= len(PROBE)
