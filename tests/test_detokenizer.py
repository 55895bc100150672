"""Incremental detokenization: UTF-8 safety and stop-string hold-back."""

from __future__ import annotations

import pytest

from argosy.runtime.core.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(checkpoint):
    return checkpoint.tokenizer.backend_tokenizer


def _stream(tok, ids, stop=(), include=False):
    d = IncrementalDetokenizer(tok, [], list(stop), include)
    pieces = []
    hit = None
    for t in ids:
        hit = d.append(t)
        pieces.append(d.take(finished=hit is not None))
        if hit:
            break
    pieces.append(d.take(finished=True))
    return pieces, hit, d.output_text


def test_multibyte_characters_never_split(tok):
    text = "naïve café — 日本語のテキスト 🚀🚀 done"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, _, full = _stream(tok, ids)
    assert "".join(pieces) == full == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(len(tok.decode([i])) and "\ufffd" in tok.decode([i]) for i in ids), "test needs split characters"


def test_stop_string_across_tokens_is_held_back_and_cut(tok):
    text = "alpha beta gamma STOP delta"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, hit, full = _stream(tok, ids, stop=["STOP"])
    assert hit == "STOP"
    assert "".join(pieces) == full == "alpha beta gamma "
    assert not any("ST" in p for p in pieces)


def test_stop_string_included_when_asked(tok):
    ids = tok.encode("one two three", add_special_tokens=False).ids
    pieces, hit, full = _stream(tok, ids, stop=["two"], include=True)
    assert hit == "two" and full == "one two" and "".join(pieces) == full


def test_partial_stop_prefix_is_released_at_the_end(tok):
    ids = tok.encode("the end is ST", add_special_tokens=False).ids
    pieces, hit, full = _stream(tok, ids, stop=["STOP"])
    assert hit is None and "".join(pieces) == "the end is ST"
