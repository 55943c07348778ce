"""One request's output ids -> the text it streams, a few tokens of work per step (runs on the engine thread).

`IncrementalDetokenizer` keeps two offsets into the output ids (vLLM's and mini-sglang's scheme):

    ids:  [ .......... released .......... | prefix_offset .. read_offset | read_offset .. end ]
                                             context, decoded again         not released yet

Each step decodes only `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]`; the difference is the new
text. The context makes tokenizers that drop a leading space at the start of a decode (SentencePiece) agree
with a full decode. New text that ends in U+FFFD (a UTF-8 character split over tokens) is held until the
character completes, so the concatenated deltas equal `tokenizer.decode(ids, skip_special_tokens=True)`
(exactly for byte-level BPE; with SentencePiece byte fallback for ids that spell valid text, since its
decoder turns a whole run of byte tokens into U+FFFDs when one byte of the run is invalid). At most
HOLD_LIMIT tokens are held (a run of undecodable bytes from a broken model is then released as is), which
bounds the work per step.

`StopStrings` cuts the released text at the earliest stop string (or after it: vLLM's
include_stop_str_in_output), also one spanning several tokens, and holds back the last `max(len(stop)) - 1`
characters, which could still begin one (vLLM's rule); only a stop string ending in the text of the tokens after
the first `min_tokens` matches (vLLM's min_tokens). `OutputText`
chains the two for one request. Knows nothing of scheduling, tensors or HTTP. A tokenizer handed to these classes must be used by the
calling thread only.
"""
from __future__ import annotations

import functools
import re

HOLD_LIMIT = 32   # tokens held at most while the text ends in an incomplete character
REPLACEMENT = "\ufffd"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # SentencePiece byte fallback


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte 0-255 as the printable character its vocabulary spells it with
    (cached: do not modify)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]   # printable bytes keep their code point; the others count up from U+0100
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of bytes_to_unicode (cached: do not modify)."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int, text: str) -> bytes:
    """The bytes of one token, `text` being the token decoded alone (what logprobs report as `bytes`).

    A token that holds part of a UTF-8 character decodes alone to U+FFFD, whose bytes are not the token's:
    those are read from its vocabulary entry instead (a byte-level BPE symbol string, or a byte-fallback piece
    <0xNN>). Any other token: the UTF-8 of its text."""
    if REPLACEMENT not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if match := BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        decoder = unicode_to_bytes()
        if piece and all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
    return text.encode()


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0         # first id of the context window
        self.read_offset = 0           # ids before this one have been released as text
        self.decoded_ids = 0           # ids passed to tokenizer.decode so far: the work done

    def add(self, token_id: int) -> str:
        """Append one id; return the text that became final (often all of it, "" while a character is split)."""
        self.ids.append(token_id)
        return self._release(force=len(self.ids) - self.read_offset > HOLD_LIMIT)

    def flush(self) -> str:
        """The output ended: release what is held (a split character stays U+FFFD, as in a full decode)."""
        return self._release(force=True)

    def _release(self, force: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        context = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.ids[self.prefix_offset:])[len(context):]
        if not force and (not new or new.endswith(REPLACEMENT)):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


class StopStrings:
    def __init__(self, stops: tuple[str, ...], include: bool = False):
        self.stops, self.include = stops, include
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tail = ""                 # released by the detokenizer, not streamed yet
        self.matched: str | None = None   # the stop string that ended the text

    def feed(self, text: str, armed: bool = True) -> str:
        """Take new text; return what may be streamed now: up to a stop string once one matched (through it with
        `include`). Only a stop string that ends in `text` matches (vLLM's window); not `armed` (up to
        min_tokens), none does, and the tail is still held back."""
        if self.matched is not None or not text:
            return ""
        buffer = self.tail + text      # a match ending in `text` starts inside the tail: the tail is long enough
        hit = find_stop(buffer, self.stops, len(self.tail)) if armed else None
        if hit is not None:
            self.matched, self.tail = hit[1], ""
            end = hit[0] + len(hit[1]) if self.include else hit[0]
            return buffer[:end]
        cut = max(0, len(buffer) - self.hold)
        self.tail = buffer[cut:]
        return buffer[:cut]

    def flush(self) -> str:
        """The output ended without a match: the held tail is plain text."""
        tail, self.tail = self.tail, ""
        return tail


def find_stop(text: str, stops: tuple[str, ...], new_from: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in `text` that ends after `text[:new_from]` (the first
    listed of those starting there), or None."""
    found = ((text.find(stop, max(0, new_from - len(stop) + 1)), n, stop) for n, stop in enumerate(stops))
    hits = [hit for hit in found if hit[0] >= 0]
    if not hits:
        return None
    index, _, stop = min(hits)
    return index, stop


class OutputText:
    """The streamed text of one request: ids in, text deltas out; `text` is all that was streamed."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False, min_tokens: int = 0):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop_strings = StopStrings(stops, include_stop)
        self.min_tokens = min_tokens   # stop strings match in the text of the tokens after this many (vLLM's)
        self._parts: list[str] = []

    @property
    def stopped(self) -> bool:
        """A stop string matched: the text ends just before it (or with it, `include_stop`)."""
        return self.stop_strings.matched is not None

    @property
    def stop_string(self) -> str | None:
        """The stop string that matched (vLLM's stop_reason), if one did."""
        return self.stop_strings.matched

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        return self._streamed(self.stop_strings.feed(self.detokenizer.add(token_id), self._armed))

    def finish(self) -> str:
        """The output ended (not by a stop string seen in `add`): everything held back, up to a stop string."""
        delta = self.stop_strings.feed(self.detokenizer.flush(), self._armed)
        if not self.stopped:
            delta += self.stop_strings.flush()
        return self._streamed(delta)

    @property
    def _armed(self) -> bool:
        return len(self.detokenizer.ids) > self.min_tokens

    def _streamed(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta

