"""``POST /v1/chat/completions``: a conversation through the model's chat template, tool
calling (:mod:`.tools`), and ``chat.completion`` / ``chat.completion.chunk`` objects with
logprobs in the chat form (OpenAI's Chat Completions API)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from aiohttp import web

from ..core.engine import RequestOutput
from ..core.sampling_params import SamplingParams, StructuredOutputsParams
from .choices import Choice, fan_out, usage
from .common import (STATE, ServerState, admit, chat_prompt, check_model, log_request, parse_body, request_id,
                     respond, sampling_params, truncated)
from .errors import ApiError
from .formats import MIN_LOGPROB, ResponseFormat, TokenText
from .protocol import ChatCompletionRequest
from .tool_parsers import get_parser
from .tools import ToolCalls, ToolMode, named_schema, required_schema


def tool_mode(state: ServerState, req: ChatCompletionRequest, params: SamplingParams
               ) -> tuple[Optional[ToolMode], SamplingParams]:
    """How the request uses its tools, and its sampling parameters with the output
    constraint that ``required`` or a named ``tool_choice`` implies.

    Raises:
        ApiError(400): ``auto`` without ``--enable-auto-tool-choice`` and
            ``--tool-call-parser`` (vLLM's rule), or a forced tool call combined with
            another output constraint.
    """
    choice = req.effective_tool_choice
    if choice == "none":
        return None, params
    if choice == "auto":
        if not (state.enable_auto_tool_choice and state.tool_call_parser):
            raise ApiError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                                'set (or send tool_choice "none", "required" or a named function)', "tool_choice")
        names = frozenset(t.function.name for t in req.tools)
        # tool-call markers such as Hermes' <tool_call> are special tokens in some vocabularies:
        # keep them in the text the parser reads (vLLM does the same)
        return ToolMode("auto", parser=get_parser(state.tool_call_parser), names=names), \
            dataclasses.replace(params, skip_special_tokens=False)
    if params.structured_outputs is not None:
        raise ApiError(400, "tool_choice required or a named function cannot be combined with response_format, "
                            "guided_* or structured_outputs", "tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "required":
        mode, schema = ToolMode("required"), required_schema(tools, req.parallel_tool_calls is not False)
    else:
        tool = next(t for t in tools if t["function"]["name"] == choice.function.name)
        mode, schema = ToolMode("named", function=choice.function.name), named_schema(tool)
    return mode, dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))


class ChatFormat(ResponseFormat):
    """``chat.completion`` objects, logprobs in the chat format."""

    prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, entries: list) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        content = []
        for tok, lp, top in entries:
            text, raw = self.tokens.get(tok)
            tops = []
            for t_id, t_lp in top:
                t_text, t_raw = self.tokens.get(t_id)
                tops.append({"token": t_text, "logprob": max(t_lp, MIN_LOGPROB), "bytes": t_raw})
            content.append({"token": text, "logprob": max(lp, MIN_LOGPROB), "bytes": raw, "top_logprobs": tops})
        return {"content": content}

    def __init__(self, tokens: TokenText, want_logprobs: bool, tools: Optional[ToolCalls] = None,
                 want_prompt_logprobs: bool = False):
        super().__init__(tokens, want_logprobs, want_prompt_logprobs)
        self.tools = tools

    def prelude(self, ch: Choice) -> dict:
        return {"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, ch: Choice, out: RequestOutput) -> Optional[dict]:
        has_lp = self.want_logprobs and out.logprobs
        if self.tools is not None:
            d, finish = self.tools.delta(ch.index, ch.text, out.finished, out.finish_reason)
            if not (d or out.finished or has_lp):
                return None
            return {"index": ch.index, "delta": d, "logprobs": self._logprobs(out.logprobs), "finish_reason": finish,
                    "stop_reason": out.stop_reason}
        if not (out.new_text or out.finished or has_lp):
            return None
        return {"index": ch.index, "delta": {"content": out.new_text} if out.new_text or has_lp else {},
                "logprobs": self._logprobs(out.logprobs), "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def body(self, header: dict, choices: list[Choice]) -> dict:
        """The full response; ``prompt_logprobs`` once, at the top level, as vLLM's chat
        response carries them."""
        body = {**header, "choices": [self.final(ch) for ch in choices], "usage": usage(choices)}
        if self.want_prompt_logprobs:
            body["prompt_logprobs"] = self.prompt_logprobs(choices[0], False)
        return body

    def final(self, ch: Choice) -> dict:
        message, finish = {"role": "assistant", "content": ch.text}, ch.finish_reason
        if self.tools is not None:
            message, finish = self.tools.message(ch.text, ch.finish_reason)
        return {"index": ch.index, "message": message, "logprobs": self._logprobs(ch.logprobs),
                "finish_reason": finish, "stop_reason": ch.stop_reason}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    state = request.app[STATE]
    req = await parse_body(request, ChatCompletionRequest)
    check_model(state, req.model)
    params = sampling_params(state, req, None)
    mode, params = tool_mode(state, req, params)
    prompt = chat_prompt(state, req.template_messages(), **req.template_args())
    prompt = truncated(state, req, prompt, params.max_tokens)
    admit(state)
    rid = request_id("chatcmpl")
    choices = fan_out(state.async_llm, rid, [prompt], params)
    log_request(state, rid, [prompt], params)
    fmt = ChatFormat(state.tokens, bool(req.logprobs), ToolCalls(mode) if mode else None,
                     req.prompt_logprobs is not None)
    return await respond(request, state, choices, fmt, bool(req.stream), req.include_usage, rid)
