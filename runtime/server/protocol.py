"""Request bodies of the OpenAI-compatible API, as pydantic v2 models.

Types are checked strictly (``"max_tokens": "5"`` or ``"stream": 1`` is a 400, as
with OpenAI), unknown fields are ignored (SDKs send many), and each request knows how
to turn itself into :class:`SamplingParams`. Semantic range checks that
``SamplingParams`` already performs (temperature >= 0, max_tokens >= 1, ...) are left
to it; the few checks here protect the engine thread from values it cannot survive
(seed outside 64 bits, NaN, huge ``n``).
"""

from __future__ import annotations

import json
from typing import Annotated, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..core.sampling_params import SamplingParams, StructuredOutputsParams

#: Largest ``n`` accepted (each choice is a separate engine request).
MAX_N = 128
#: Largest number of top log-probabilities per token (the engine's limit).
MAX_LOGPROBS = 20

_SEED = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
_TOKEN_ID = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk carrying ``usage``
    (vLLM's ``continuous_usage_stats``, usage in every chunk, is refused)."""

    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[Literal[False]] = False


class TextContentPart(_Strict):
    """A ``{"type": "text", "text": ...}`` content part (the only kind supported)."""

    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    """``tool_calls[].function`` of an assistant message: ``arguments`` is a JSON string."""

    name: str
    arguments: str


class ToolCallMessage(_Strict):
    """One entry of an assistant message's ``tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One conversation turn; ``content`` (required, as OpenAI requires it of every
    message without ``tool_calls``) is a string or a list of text parts. An assistant
    turn may carry ``tool_calls`` instead of content; a ``tool`` turn answers one call
    (``tool_call_id``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallMessage]] = None
    tool_call_id: Optional[str] = None
    # after role and tool_calls: its validator reads them
    content: Annotated[Union[str, list[TextContentPart], None], Field(validate_default=True)] = None

    @field_validator("content", mode="after")
    @classmethod
    def _content_required(cls, v, info):
        if v is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return v

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
        return v

    def text(self) -> str:
        """The content as one string (text parts joined with newlines; "" when absent)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)

    def to_template(self) -> dict:
        """The dict handed to ``tokenizer.apply_chat_template`` (tool call arguments
        parsed into objects, as Hugging Face chat templates expect them)."""
        d = {"role": self.role, "content": self.text()}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments)
                except ValueError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class FunctionDefinition(_Strict):
    """``tools[].function``: a name (OpenAI's pattern), a description and the JSON schema
    of its ``parameters``."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class ChatTool(_Strict):
    """One entry of ``tools`` (``type`` must be ``function``)."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


#: Request fields of OpenAI's and vLLM's APIs that this server does not implement: a request
#: using one gets a 400 naming it, never a 200 that silently ignores it (value -> allowed
#: values that mean "not used").
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "functions": ([],),
    "function_call": ("none",),
    "guided_whitespace_pattern": (), "structural_tag": (),
    "logits_processors": (), "audio": (), "prediction": (),
    # vLLM's sampling and serving extras beyond what SamplingRequest implements
    "best_of": (1,), "use_beam_search": (False,), "length_penalty": (1.0,),
    "spaces_between_special_tokens": (True,), "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,), "chat_template": (), "documents": ([],), "mm_processor_kwargs": ({},),
    "cache_salt": (), "kv_transfer_params": (), "prompt_embeds": (), "vllm_xargs": ({},),
    "reasoning_effort": (), "modalities": (["text"],), "thinking_token_budget": (),
}

#: Chat fields that a completions request may carry only at a value that means "not used".
CHAT_ONLY_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "continue_final_message", "chat_template_kwargs",
                    "add_generation_prompt")


def refuse_fields(data, harmless: dict[str, tuple], reason: Callable[[str], str]):
    """``data`` (a raw request body) unchanged, unless it sets one of ``harmless``' fields
    to a value other than null or the ones listed for it.

    Raises:
        ValueError: ``reason(name)`` for the first such field.
    """
    if isinstance(data, dict):
        for name, ok in harmless.items():
            value = data.get(name)
            if value is not None and value not in ok:
                raise ValueError(reason(name))
    return data


#: Why some of them are refused (default: "is not supported by this server").
UNSUPPORTED_REASONS = {
    "priority": "priority is not supported: this server schedules first come, first served (vLLM's "
                "--scheduling-policy fcfs); send priority 0 or leave it out",
    "best_of": "best_of is not supported (vLLM V1 dropped it too): use n and pick on the client",
    "use_beam_search": "beam search is not supported",
}


class _Forbid(_Strict):
    """Nested objects whose unknown keys are refused (a constraint must not be half-read)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class JsonSchemaFormat(_Forbid):
    """``response_format.json_schema``: OpenAI's ``{name, description, schema, strict}``."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Optional[str] = None
    schema_: Optional[dict] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Forbid):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format of type {self.type} takes no json_schema")
        return self


class StructuredOutputsRequest(_Forbid):
    """vLLM's ``structured_outputs`` request object (one constraint)."""

    json_: Union[dict, str, None] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: Optional[bool] = None


class _Truncation(_Strict):
    """vLLM's ``truncate_prompt_tokens``: keep only the last k prompt tokens (-1: as many
    as fit the context with the request's ``max_tokens``, i.e. ``max_model_len -
    max_tokens``, at least one output token); absent = no truncation (a prompt too long
    is a 400); k above ``max_model_len`` is a 400."""

    truncate_prompt_tokens: Optional[Annotated[int, Field(ge=-1)]] = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_not_zero(cls, v):
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be at least 1 (or -1 for max_model_len)")
        return v

    def truncate(self, ids: list[int], max_model_len: int, max_tokens: Optional[int] = None) -> list[int]:
        """``ids`` cut to their last ``truncate_prompt_tokens`` tokens (left truncation,
        as vLLM), unchanged without the field.

        Args:
            max_model_len: the engine's context length (tokens).
            max_tokens: the request's output budget (tokens; None: one), what -1 leaves room for.
        Raises:
            ValueError: ``truncate_prompt_tokens`` above ``max_model_len``.
        """
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k > max_model_len:
            raise ValueError(f"truncate_prompt_tokens ({k}) must not exceed max_model_len ({max_model_len})")
        if k == -1:
            k = max(1, max_model_len - max(1, max_tokens or 1))
        return ids[-k:] if len(ids) > k else ids


class SamplingRequest(_Truncation):
    """Sampling fields shared by chat and completions (OpenAI's plus vLLM's extras).

    Unknown fields are ignored (clients send ``metadata``, ``store`` and the like), except
    the features of :data:`UNSUPPORTED_FIELDS`, which are refused with a 400 naming them.
    """

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[_SEED] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[_TOKEN_ID]] = None
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    skip_special_tokens: Optional[bool] = True
    include_stop_str_in_output: Optional[bool] = False
    logit_bias: Optional[dict[str, float]] = None
    prompt_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]] = None
    allowed_token_ids: Optional[Annotated[list[_TOKEN_ID], Field(min_length=1)]] = None
    bad_words: Optional[list[Annotated[str, Field(min_length=1, pattern=r"\S")]]] = None
    priority: Optional[int] = 0
    # structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: Optional[ResponseFormat] = None
    guided_json: Union[dict, str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[Literal["auto", "xgrammar"]] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        return refuse_fields(data, UNSUPPORTED_FIELDS,
                             lambda name: UNSUPPORTED_REASONS.get(name, f"{name} is not supported by this server"))

    @field_validator("priority")
    @classmethod
    def _fcfs_only(cls, v):
        if v not in (None, 0):
            raise ValueError(UNSUPPORTED_REASONS["priority"])
        return v


    @field_validator("logit_bias", mode="before")
    @classmethod
    def _int_bias_values(cls, v):  # JSON numbers like 100 are ints; strict floats refuse them
        if isinstance(v, dict):
            return {k: float(x) if isinstance(x, int) and not isinstance(x, bool) else x for k, x in v.items()}
        return v

    def logit_bias_ids(self) -> Optional[dict[int, float]]:
        """``logit_bias`` with token-id keys.

        Raises:
            ValueError: a key that is not a non-negative integer.
        """
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            out[int(k)] = v
        return out

    def structured_outputs_params(self) -> Optional[StructuredOutputsParams]:
        """The request's output constraint, from whichever field carries it.

        Raises:
            ValueError: more than one constraint field, or an invalid one (the message
                starts with the field name).
        """
        given = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            given.append(("response_format", dict(json=rf.json_schema.schema_) if rf.type == "json_schema"
                          else dict(json_object=True)))
        for name, kw in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                         ("guided_grammar", "grammar")):
            v = getattr(self, name)
            if v is not None:
                given.append((name, {kw: v}))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            kw = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                  "json_object": bool(so.json_object)}
            given.append(("structured_outputs", {k: v for k, v in kw.items() if v not in (None, False)}))
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"{given[0][0]} cannot be combined with {given[1][0]}: give one output constraint")
        name, kw = given[0]
        if self.structured_outputs is not None and self.structured_outputs.disable_any_whitespace:
            kw["disable_any_whitespace"] = True
        try:
            return StructuredOutputsParams(**kw)
        except ValueError as e:
            msg = str(e)
            if name != "structured_outputs":
                msg = f"{name}: " + msg.removeprefix("structured_outputs.").removeprefix("structured_outputs ")
            raise ValueError(msg) from None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """True when the stream must end with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _effective_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def _num_logprobs(self) -> Optional[int]:
        return None

    def _num_prompt_logprobs(self) -> Optional[int]:
        return self.prompt_logprobs

    def to_sampling_params(self, default_max_tokens: Optional[int]) -> SamplingParams:
        """Build the engine's parameters.

        Args:
            default_max_tokens: used when the request gives none (None = up to
                ``max_model_len``).
        Raises:
            ValueError: a value out of range; the message starts with the field name.
        """
        max_tokens = self._effective_max_tokens()
        opt = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "min_tokens": self.min_tokens,
        }
        return SamplingParams(
            n=self.n,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []),
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            ignore_eos=bool(self.ignore_eos),
            logprobs=self._num_logprobs(),
            prompt_logprobs=self._num_prompt_logprobs(),
            skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            logit_bias=self.logit_bias_ids(),
            structured_outputs=self.structured_outputs_params(),
            allowed_token_ids=list(self.allowed_token_ids) if self.allowed_token_ids else None,
            **{k: v for k, v in opt.items() if v is not None},
        )


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions`` body. Default ``max_tokens``: up to ``max_model_len``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]] = None
    tools: Optional[list[ChatTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = True
    # vLLM's chat-template extras
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[dict] = None

    @model_validator(mode="before")
    @classmethod
    def _completions_only_fields(cls, data):
        return refuse_fields(data, {"echo": (False,), "add_special_tokens": (False,)}, lambda name: (
            f"{name} is not supported on /v1/chat/completions"
            + (" (the chat template places the special tokens)" if name == "add_special_tokens" else "")))

    @model_validator(mode="after")
    def _continue_or_generate(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: set "
                             "add_generation_prompt to false to continue the last message")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def _effective_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        """The conversation in the form chat templates expect."""
        return [m.to_template() for m in self.messages]

    def template_tools(self) -> Optional[list[dict]]:
        """``tools`` in the form chat templates expect (None without tools)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def template_args(self) -> dict:
        """The keyword arguments of :func:`~argosy.runtime.loader.tokenizer.chat_prompt_ids`
        besides the messages (generation prompt, tools, continuation, template variables):
        what the server renders and the router hashes."""
        return {"add_generation_prompt": self.add_generation_prompt is not False, "tools": self.template_tools(),
                "continue_final_message": bool(self.continue_final_message),
                "template_kwargs": self.chat_template_kwargs}

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        tc = self.tool_choice
        if tc is not None and tc != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(tc, NamedToolChoice) and tc.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names function {tc.function.name!r}, which is not in tools")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise ValueError("tools: function names must be unique")
        return self

    @property
    def effective_tool_choice(self):
        """``tool_choice`` with OpenAI's default: ``auto`` when tools are given, else ``none``."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` body. Default ``max_tokens``: 16 (as OpenAI).

    ``prompt`` is a string, a list of strings, a token-id list or a list of token-id
    lists; every prompt yields ``n`` choices. ``suffix`` is not supported (400).
    ``echo`` with ``logprobs`` returns the prompt tokens' log-probabilities too (the first
    token's is null, as OpenAI's), computed like ``prompt_logprobs``.
    """

    prompt: PromptInput
    max_tokens: Optional[int] = 16
    echo: Optional[bool] = False
    logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]] = None
    suffix: Optional[str] = None
    add_special_tokens: Optional[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _chat_only_fields(cls, data):
        harmless = ([], "none", False, {})
        return refuse_fields(data, dict.fromkeys(CHAT_ONLY_FIELDS, harmless),
                             lambda name: f"{name} is a chat completions field; /v1/completions does not take it")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def _num_logprobs(self) -> Optional[int]:
        return self.logprobs

    def _num_prompt_logprobs(self) -> Optional[int]:
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def prompt_list(self) -> list[Union[str, list[int]]]:
        """Normalize ``prompt`` into a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            return [[]]
        return list(p)


class EmbeddingRequest(_Truncation):
    """``POST /v1/embeddings`` body (OpenAI's): ``input`` is a string, a list of strings,
    a token-id list or a list of token-id lists (each one embedding, at most
    :data:`MAX_EMBEDDING_INPUTS`); ``encoding_format`` ``float`` or ``base64`` (little-endian
    float32, as OpenAI's SDK decodes it); ``dimensions`` only when it equals the model's
    hidden size (no Matryoshka truncation)."""

    model: Optional[str] = None
    input: Union[str, list[str], list[_TOKEN_ID], list[list[_TOKEN_ID]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[Annotated[int, Field(ge=1)]] = None
    user: Optional[str] = None

    @model_validator(mode="after")
    def _bounded(self):
        n = 1 if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)) else len(self.input)
        if n == 0 or (isinstance(self.input, list) and not self.input):
            raise ValueError("input must not be empty")
        if n > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input holds {n} items; at most {MAX_EMBEDDING_INPUTS} per request")
        return self

    def inputs(self) -> list[Union[str, list[int]]]:
        """One entry per embedding: a string or token ids."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if isinstance(x[0], int):
            return [list(x)]
        return list(x)


#: Most embeddings in one request (OpenAI's limit is 2,048 inputs).
MAX_EMBEDDING_INPUTS = 2048


class TokenizeRequest(_Strict):
    """``POST /tokenize``: either ``prompt`` (text) or ``messages`` (a chat)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    add_special_tokens: Optional[bool] = True
    add_generation_prompt: Optional[bool] = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize``: token ids back to text."""

    model: Optional[str] = None
    tokens: list[_TOKEN_ID]
