"""How the endpoints render their choices: :class:`ResponseFormat` (full response and stream
chunks; :mod:`.chat` and :mod:`.completions` subclass it) and :class:`TokenText`, the
text and bytes of single tokens for log-probability responses."""

from __future__ import annotations

import abc
from typing import Optional

from ..core.engine import RequestOutput
from .choices import Choice, usage

#: Floor for log-probabilities in responses (JSON has no -inf).
MIN_LOGPROB = -9999.0


def _byte_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable Latin-1 bytes stand for
    themselves, the other byte values are shifted to code points 256 and up, in order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shift = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shift)] = b
            shift += 1
    return out


class TokenText:
    """Text and UTF-8 bytes of single tokens, for log-probability responses (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._alphabet = _byte_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, utf8_bytes)`` of one token (text has U+FFFD for partial characters)."""
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw = None
        if self._alphabet is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in self._alphabet for c in piece):
                raw = bytes(self._alphabet[c] for c in piece)
        if raw is None:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        hit = (raw.decode("utf-8", errors="replace"), list(raw))
        self._cache[token_id] = hit
        return hit


class ResponseFormat(abc.ABC):
    """How one endpoint renders choices (full response and stream chunks)."""

    prefix = ""
    object = ""
    chunk_object = ""

    def __init__(self, tokens: TokenText, want_logprobs: bool, want_prompt_logprobs: bool = False):
        self.tokens = tokens
        self.want_logprobs = want_logprobs
        self.want_prompt_logprobs = want_prompt_logprobs

    def prompt_logprobs(self, ch: Choice, stream: bool) -> Optional[list]:
        """vLLM's ``prompt_logprobs`` of a choice: per prompt token None (the first) or
        ``{token_id: {"logprob", "rank", "decoded_token"}}`` holding the token itself and
        the top alternatives; in a stream only once, in the first chunk after the prompt."""
        if not self.want_prompt_logprobs or ch.prompt_logprobs is None or (stream and ch.prompt_logprobs_sent):
            return None
        ch.prompt_logprobs_sent = True
        out: list = []
        for e in ch.prompt_logprobs:
            if e is None:
                out.append(None)
                continue
            tok, lp, rank, top = e
            d = {}
            for r, (t_id, t_lp) in enumerate(top, start=1):
                d[str(t_id)] = {"logprob": max(t_lp, MIN_LOGPROB), "rank": r, "decoded_token": self.tokens.get(t_id)[0]}
            d[str(tok)] = {"logprob": max(lp, MIN_LOGPROB), "rank": rank, "decoded_token": self.tokens.get(tok)[0]}
            out.append(d)
        return out

    def with_prompt_logprobs(self, part: Optional[dict], ch: Choice, stream: bool) -> Optional[dict]:
        """``part`` with ``prompt_logprobs`` added when the request asked for them."""
        if part is not None and self.want_prompt_logprobs:
            plp = self.prompt_logprobs(ch, stream)
            if plp is not None or not stream:
                part["prompt_logprobs"] = plp
        return part

    def prelude(self, ch: Choice) -> Optional[dict]:
        """A choice sent before any output (stream only), or None."""
        return None

    @abc.abstractmethod
    def delta(self, ch: Choice, out: RequestOutput) -> Optional[dict]:
        """The stream choice for one output, or None when there is nothing to send."""

    @abc.abstractmethod
    def final(self, ch: Choice) -> dict:
        """The choice of the full (non-streamed) response."""

    def body(self, header: dict, choices: list[Choice]) -> dict:
        """The full (non-streamed) response: ``header``, the choices and ``usage``; each
        choice carries its ``prompt_logprobs`` (the completions form)."""
        return {**header, "choices": [self.with_prompt_logprobs(self.final(ch), ch, False) for ch in choices],
                "usage": usage(choices)}
