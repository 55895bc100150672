"""Incremental detokenization with stop-string handling.

Text is produced by decoding a short window of recent tokens twice (with and without
the newest tokens) and emitting the difference, the "prefix/read offset" scheme used
by vLLM and TGI. While the window's text ends in U+FFFD (an incomplete UTF-8 sequence
split across byte-level BPE tokens) nothing is emitted, so output never contains
broken characters. Text that could still turn into a stop string is held back until
it cannot.
"""

from __future__ import annotations

from typing import Optional


class IncrementalDetokenizer:
    """Per-request detokenization state.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (fast backend) with ``decode``.
        prompt_token_ids: the prompt; its last few tokens seed the window so the first
            output token's leading space is decoded correctly.
        stop: stop strings.
        include_stop_str_in_output: keep the matched stop string in the text.
        skip_special_tokens: drop special tokens from the text.
    """

    _CONTEXT = 5  # prompt tokens used as left context

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(prompt_token_ids[-self._CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.output_text = ""
        self.emitted = 0  # characters of output_text already returned
        self.stopped_by: Optional[str] = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def append(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Add one generated token; returns the stop string if one matched (text is
        truncated there), else None. With ``check_stop=False`` (the request has fewer
        than ``min_tokens`` outputs, as vLLM: stop strings are ignored until then) the
        text is extended and never searched; later calls search only the new text and
        the held-back tail before it."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            before = len(self.output_text)
            self.output_text += new
            if self.stop and check_stop:
                return self._check_stop(before, len(new))
        return None

    def _check_stop(self, before: int, added: int) -> Optional[str]:
        text = self.output_text
        start_floor = max(0, before - self.hold)
        best = None
        for s in self.stop:
            idx = text.find(s, start_floor)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.output_text = text[: idx + len(s)] if self.include_stop else text[:idx]
        self.stopped_by = s
        return s

    def take(self, finished: bool) -> str:
        """New text since the last call. Until ``finished``, the last ``max(len(stop))-1``
        characters are held back in case they start a stop string."""
        end = len(self.output_text) if (finished or self.stopped_by) else max(self.emitted, len(self.output_text) - self.hold)
        out = self.output_text[self.emitted : end]
        self.emitted = end
        return out
