"""Incremental detokenization and stop strings (atv_core/engine/detokenizer.py), without a model.

Tokenizers: the tiny byte-level one (one token per UTF-8 byte, so every multi-byte character is split), a
SentencePiece-style one built here (Metaspace, byte fallback: leading spaces are dropped at the start of a
decode), and, marked slow, the real SmolLM2 tokenizer.
"""
from __future__ import annotations

import random

import pytest

from atv_core.engine.detokenizer import (HOLD_LIMIT, REPLACEMENT, IncrementalDetokenizer, OutputText, StopStrings,
                                        bytes_to_unicode, token_bytes)
from tests.tiny import make_tokenizer

TEXT = "Grüße, 世界! Emoji 😀 ok. naïve café — fin"


@pytest.fixture(scope="module")
def byte_tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def sp_tok():
    """SentencePiece-like (as Llama 2): words carry a leading '▁', any other character falls back to its UTF-8
    bytes, and a decode drops the leading space of its first token."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in ["▁hello", "▁world", "▁the", "▁café", "▁ok"]:
        for ch in word:
            vocab.setdefault(ch, len(vocab))
        for i in range(2, len(word) + 1):
            if word[:i] not in vocab:
                vocab[word[:i]] = len(vocab)
                merges.append((word[: i - 1], word[i - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def stream(tokenizer, ids: list[int]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(token) for token in ids]
    deltas.append(detok.flush())
    return deltas, detok


def full(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---- text equals a full decode ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["byte_tok", "sp_tok"])
def test_incremental_text_equals_a_full_decode(which, request):
    tok = request.getfixturevalue(which)
    ids = tok(TEXT + " hello world the cafe", add_special_tokens=False).input_ids
    assert len(ids) > 40
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == full(tok, ids)
    assert not any("\ufffd" in d for d in deltas)  # a split character is held until it completes


def test_multibyte_characters_are_held_until_complete(byte_tok):
    ids = byte_tok("a😀b", add_special_tokens=False).input_ids      # a, 4 bytes of the emoji, b
    assert len(ids) == 6
    deltas, _ = stream(byte_tok, ids)
    assert deltas == ["a", "", "", "", "😀", "b", ""]


def test_special_tokens_are_skipped_and_do_not_break_the_text(byte_tok):
    special = byte_tok.convert_tokens_to_ids(["<|im_start|>", "</s>"])
    body = byte_tok("é世", add_special_tokens=False).input_ids
    ids = body[:1] + special[:1] + body[1:3] + special + body[3:]   # specials inside split characters
    deltas, _ = stream(byte_tok, ids)
    assert "".join(deltas) == full(byte_tok, ids) == "é世"


@pytest.mark.parametrize("seed", range(20))
def test_random_ids_equal_a_full_decode(byte_tok, seed):
    """Any ids, invalid UTF-8 and specials included: byte-level decoding is a streaming UTF-8 decode."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(byte_tok)) for _ in range(rng.randrange(1, 300))]
    deltas, _ = stream(byte_tok, ids)
    assert "".join(deltas) == full(byte_tok, ids), (seed, ids)


@pytest.mark.parametrize("seed", range(10))
def test_random_texts_equal_a_full_decode_with_byte_fallback(sp_tok, seed):
    """Byte fallback decodes a run of byte tokens as a whole (one invalid byte spoils the run), so only ids
    that spell text are compared: random words and characters of 1-4 UTF-8 bytes."""
    rng = random.Random(seed)
    pieces = ["hello", "world", "the", "café", "ok", " ", "  ", "é", "世界", "😀", "ß", "x", "\n", ".", "€"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 80)))
    ids = sp_tok(text, add_special_tokens=False).input_ids
    deltas, _ = stream(sp_tok, ids)
    assert "".join(deltas) == full(sp_tok, ids), (seed, text)


def test_an_undecodable_run_is_released_after_the_hold_limit(byte_tok):
    continuation = byte_tok("é", add_special_tokens=False).input_ids[1]   # a lone continuation byte: never valid
    ids = [continuation] * (HOLD_LIMIT + 5)
    detok = IncrementalDetokenizer(byte_tok)
    deltas = [detok.add(token) for token in ids]
    assert next(i for i, d in enumerate(deltas) if d) == HOLD_LIMIT   # HOLD_LIMIT + 1 ids held, then let go
    assert "".join(deltas) + detok.flush() == full(byte_tok, ids)


# ---- work per step ------------------------------------------------------------------------------
def test_decode_work_per_step_does_not_grow_with_output_length(byte_tok):
    ids = byte_tok(TEXT * 40, add_special_tokens=False).input_ids      # ~2,000 tokens, multi-byte characters
    detok = IncrementalDetokenizer(byte_tok)
    work = []
    for token in ids:
        before = detok.decoded_ids
        detok.add(token)
        work.append(detok.decoded_ids - before)
    assert len(ids) > 1500
    # each step decodes the context (one released chunk) plus the held ids: at most 2 x 4 UTF-8 bytes + 1
    assert max(work) <= 9
    assert max(work[-500:]) <= max(work[:500])   # late steps cost no more than early ones


# ---- stop strings -------------------------------------------------------------------------------
def test_stop_string_spanning_tokens_cuts_the_text(byte_tok):
    ids = byte_tok("hello world, and more", add_special_tokens=False).input_ids
    out = OutputText(byte_tok, ("o w", "more"))
    deltas = []
    for token in ids:
        deltas.append(out.add(token))
        if out.stopped:
            break
    assert out.stopped and out.text == "hell" and "".join(deltas) == "hell"
    assert out.text == full(byte_tok, ids)[: full(byte_tok, ids).find("o w")]


def test_stop_string_after_a_split_character(byte_tok):
    ids = byte_tok("a世界b", add_special_tokens=False).input_ids
    out = OutputText(byte_tok, ("界",))
    for token in ids:
        out.add(token)
        if out.stopped:
            break
    assert out.stopped and out.text == "a世"


def test_partial_stop_strings_are_held_back_and_released_when_they_do_not_complete(byte_tok):
    out = OutputText(byte_tok, ("xyz",))
    streamed = ""
    seen = []
    for token in byte_tok("abxyq", add_special_tokens=False).input_ids:
        streamed += out.add(token)
        seen.append(streamed)
    assert "xy" not in seen[3]                    # "abxy": "xy" could still become "xyz"
    assert streamed + out.finish() == "abxyq" and not out.stopped


def test_finish_releases_everything_held(byte_tok):
    ids = byte_tok("tail é", add_special_tokens=False).input_ids[:-1]    # ends in half of "é"
    out = OutputText(byte_tok, ("zzzz",))
    streamed = "".join(out.add(token) for token in ids)
    streamed += out.finish()
    assert streamed == out.text == full(byte_tok, ids) == "tail \ufffd"


def test_stop_strings_unit():
    stops = StopStrings(("END", "!"))
    assert stops.feed("hello E") == "hello"       # "E" and the char before could start "END"
    assert stops.feed("N") == " "
    assert stops.feed("D and more") == "" and stops.matched == "END"   # which one matched: vLLM's stop_reason
    other = StopStrings(("ab",))
    assert other.feed("xa") + other.feed("c") + other.flush() == "xac" and other.matched is None


def test_include_stop_str_in_output_ends_the_text_with_the_earliest_stop(byte_tok):
    ids = byte_tok("hello world, and more", add_special_tokens=False).input_ids
    out = OutputText(byte_tok, ("more", "o w", "o wo"), include_stop=True)
    deltas = [out.add(token) for token in ids]
    assert out.stopped and "".join(deltas) == out.text == "hello w"    # earliest start; of those the first listed
    assert StopStrings(("!",), include=True).feed("hi! there") == "hi!"


def test_stop_strings_match_only_in_the_text_after_min_tokens(byte_tok):
    """vLLM's min_tokens: a stop string counts only when it ends in the text of a token after the first min_tokens
    (the same tokens EOS cannot be): one completed earlier is streamed as text, also while it still sits in the
    held-back tail; one begun earlier and ending after still cuts."""
    ids = byte_tok("ab!cd!ef", add_special_tokens=False).input_ids     # one token per character
    for min_tokens, want in ((0, "ab"), (2, "ab"), (3, "ab!cd"), (5, "ab!cd"), (6, "ab!cd!ef")):
        assert streamed(OutputText(byte_tok, ("!",), min_tokens=min_tokens), ids) == want, min_tokens
    assert streamed(OutputText(byte_tok, ("d!e",), min_tokens=6), ids) == "ab!c"
    tail = byte_tok("a!bcd", add_special_tokens=False).input_ids        # "!" done at token 2, held for "xyz"
    for min_tokens, want in ((0, "a"), (1, "a"), (2, "a!bcd"), (3, "a!bcd"), (4, "a!bcd")):
        assert streamed(OutputText(byte_tok, ("!", "xyz"), min_tokens=min_tokens), tail) == want, min_tokens


def streamed(out: OutputText, ids: list[int]) -> str:
    text = ""
    for token in ids:
        text += out.add(token)
        if out.stopped:
            return text
    return text + out.finish()


def test_special_tokens_are_kept_in_the_text_when_asked(byte_tok):
    eos = byte_tok.eos_token_id
    ids = byte_tok("ok", add_special_tokens=False).input_ids + [eos]
    ids += byte_tok("go", add_special_tokens=False).input_ids
    kept = OutputText(byte_tok, skip_special_tokens=False)
    skipped = OutputText(byte_tok)
    assert "".join(kept.add(t) for t in ids) + kept.finish() == "ok" + byte_tok.eos_token + "go"
    assert "".join(skipped.add(t) for t in ids) + skipped.finish() == "okgo"


def test_token_bytes_spell_characters_split_over_byte_level_tokens(byte_tok):
    """Chat logprobs' `bytes`: a token holding part of a UTF-8 character decodes alone to U+FFFD; its bytes come
    from its vocabulary entry, so a character's tokens' bytes join into the character again."""
    text = "añ🤖 ✓ ok"
    ids = byte_tok(text, add_special_tokens=False).input_ids
    texts = [byte_tok.decode([i]) for i in ids]
    assert REPLACEMENT in texts   # the case this is for (every non-ASCII byte is a token of its own here)
    assert b"".join(token_bytes(byte_tok, i, t) for i, t in zip(ids, texts)) == text.encode()
    assert token_bytes(byte_tok, byte_tok.eos_token_id, "</s>") == b"</s>"   # a special token: its text
    table = bytes_to_unicode()   # GPT-2's table (tests/tiny builds its vocabulary from it too)
    assert len(set(table.values())) == 256 and (table[32], table[10], table[65], table[0]) == ("Ġ", "Ċ", "A", "Ā")


def test_token_bytes_of_byte_fallback_pieces(sp_tok):
    ids = sp_tok("ok 🤖", add_special_tokens=False).input_ids
    pieces = sp_tok.convert_ids_to_tokens(ids)
    fallback = [i for i, p in zip(ids, pieces) if p.startswith("<0x")]
    assert len(fallback) == 4
    assert b"".join(token_bytes(sp_tok, i, sp_tok.decode([i])) for i in fallback) == "🤖".encode()


# ---- the real tokenizer -------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_tokenizer_equals_a_full_decode():
    from atv_core.models import EMBEDDED_TARGET, load_tokenizer

    tok = load_tokenizer(EMBEDDED_TARGET)
    ids = tok(TEXT * 3 + " 🇫🇷 ∑ x² ✓", add_special_tokens=False).input_ids
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == full(tok, ids)
    rng = random.Random(0)
    noise = [rng.randrange(len(tok)) for _ in range(500)]
    assert "".join(stream(tok, noise)[0]) == full(tok, noise)
    emoji = tok("🇫🇷 ∑ x² ✓ 🤖", add_special_tokens=False).input_ids
    assert REPLACEMENT in tok.batch_decode([[i] for i in emoji])
    assert b"".join(token_bytes(tok, i, tok.decode([i])) for i in emoji) == "🇫🇷 ∑ x² ✓ 🤖".encode()
