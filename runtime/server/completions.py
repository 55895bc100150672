"""``POST /v1/completions``: text or token-id prompts (one or many), ``echo``, and
``text_completion`` objects with logprobs in the legacy form (OpenAI's Completions API)."""

from __future__ import annotations

from typing import Optional

from aiohttp import web

from ..core.engine import RequestOutput
from .choices import Choice, fan_out
from .common import (STATE, admit, check_model, log_request, parse_body, request_id, respond, sampling_params,
                     truncated)
from .formats import MIN_LOGPROB, ResponseFormat, TokenText
from .protocol import CompletionRequest


class CompletionFormat(ResponseFormat):
    """``text_completion`` objects, logprobs in the legacy format; ``echo`` prepends the prompt."""

    prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokens: TokenText, want_logprobs: bool, echo: bool, want_prompt_logprobs: bool = False,
                 num_logprobs: int = 0):
        super().__init__(tokens, want_logprobs, want_prompt_logprobs)
        self.echo = echo
        self.num_logprobs = num_logprobs

    def _logprobs(self, entries: list, offset: int) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, top in entries:
            text, _ = self.tokens.get(tok)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if lp is None:  # the prompt's first token (echo): nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            tops = {self.tokens.get(t_id)[0]: max(t_lp, MIN_LOGPROB) for t_id, t_lp in top}
            tops.setdefault(text, max(lp, MIN_LOGPROB))
            out["token_logprobs"].append(max(lp, MIN_LOGPROB))
            out["top_logprobs"].append(tops)
        return out

    def _echo_entries(self, ch: Choice) -> list:
        """The prompt as legacy logprob entries (echo + logprobs): the first token's is None;
        top alternatives cut to ``logprobs``. Empty when the prompt never finished (the
        request failed or was aborted before): the echoed text then has no entries."""
        if not ch.prompt_logprobs or len(ch.prompt_logprobs) < len(ch.prompt_ids):
            return []
        k = self.num_logprobs
        return [(ch.prompt_ids[0], None, [])] + [(tok, lp, top[:k]) for tok, lp, _, top in ch.prompt_logprobs[1:]]

    @property
    def _echo_logprobs(self) -> bool:
        return self.echo and self.want_logprobs

    def _echo_text(self, ch: Choice) -> str:
        if not self.echo:
            return ""
        if ch.prompt_text is None:
            ch.prompt_text = self.tokens.tokenizer.decode(ch.prompt_ids)
        return ch.prompt_text

    def prelude(self, ch: Choice) -> Optional[dict]:
        text = self._echo_text(ch)
        if not text or self._echo_logprobs:  # with logprobs the prompt goes out once they are known
            return None
        return {"index": ch.index, "text": text, "logprobs": None, "finish_reason": None}

    def delta(self, ch: Choice, out: RequestOutput) -> Optional[dict]:
        has_lp = self.want_logprobs and out.logprobs
        if not (out.new_text or out.finished or has_lp):
            return None
        entries, prefix = out.logprobs, ""
        if self._echo_logprobs and ch.prompt_logprobs is not None and not ch.echo_sent:
            entries, prefix = self._echo_entries(ch) + list(out.logprobs), self._echo_text(ch)
            ch.echo_sent = True
        lps = self._logprobs(entries, ch.text_offset)
        if lps:
            ch.text_offset += sum(len(t) for t in lps["tokens"])
        return {"index": ch.index, "text": prefix + out.new_text, "logprobs": lps, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def final(self, ch: Choice) -> dict:
        prefix = self._echo_text(ch)
        entries = self._echo_entries(ch) + ch.logprobs if self._echo_logprobs else ch.logprobs
        return {"index": ch.index, "text": prefix + ch.text, "logprobs": self._logprobs(entries, 0 if self._echo_logprobs
                                                                                         else len(prefix)),
                "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason}


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    state = request.app[STATE]
    req = await parse_body(request, CompletionRequest)
    check_model(state, req.model)
    params = sampling_params(state, req, 16)
    texts: list[Optional[str]] = []
    prompts: list[list[int]] = []
    for p in req.prompt_list():
        if isinstance(p, str):
            ids = list(state.tokenizer.encode(p, add_special_tokens=req.add_special_tokens is not False))
            cut = truncated(state, req, ids, params.max_tokens)
            texts.append(p if len(cut) == len(ids) else None)  # echo decodes a truncated prompt from its ids
            prompts.append(cut)
        else:
            texts.append(None)
            prompts.append(truncated(state, req, list(p), params.max_tokens))
    admit(state)
    rid = request_id("cmpl")
    choices = fan_out(state.async_llm, rid, prompts, params, texts)
    log_request(state, rid, prompts, params, texts)
    fmt = CompletionFormat(state.tokens, req.logprobs is not None, bool(req.echo), req.prompt_logprobs is not None,
                           req.logprobs or 0)
    return await respond(request, state, choices, fmt, bool(req.stream), req.include_usage, rid)
