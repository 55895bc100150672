"""Per-request sampling parameters (vLLM's ``SamplingParams`` fields and meanings)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the output, enforced while decoding (vLLM's ``StructuredOutputsParams``).

    Exactly one of the fields is set:

    Attributes:
        json: a JSON Schema (draft 2020-12 subset the grammar engine supports), as a dict
            or its JSON text; the output is one JSON value valid against it.
        json_object: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).
        regex: the output matches this regular expression (whole output).
        choice: the output is exactly one of these strings.
        grammar: a context-free grammar: GBNF/EBNF (rules written ``name ::= ...``, root
            rule ``root``) or Lark (``start: ...``).
        disable_any_whitespace: JSON without optional whitespace (compact separators).

    Raises:
        ValueError: none or several constraints, an empty choice list, a schema that is
            not JSON (the grammar engine's own errors surface when it is compiled).
    """

    json: Union[None, str, dict] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    grammar: Optional[str] = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar; got "
                             + (", ".join(kinds) or "none"))
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.regex is not None and not self.regex:
            raise ValueError("structured_outputs.regex must be non-empty")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("structured_outputs.grammar must be non-empty")

    @property
    def kind(self) -> str:
        """``"json" | "json_object" | "regex" | "choice" | "grammar"``."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def key(self) -> tuple:
        """A hashable identity for the compiled-grammar cache."""
        # property order is kept: the grammar emits properties in schema order
        spec = None if self.json is None else json.dumps(
            json.loads(self.json) if isinstance(self.json, str) else self.json)
        return (self.kind, spec, self.regex, self.choice, self.grammar, self.disable_any_whitespace)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Attributes:
        n: completions per prompt.
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus mass in (0, 1]; 1 disables.
        top_k: keep the k most likely tokens; -1 (or 0) disables.
        min_p: drop tokens whose probability is below ``min_p`` x the top probability.
        repetition_penalty: > 1 discourages tokens already in the prompt or output
            (CTRL, Keskar et al. 2019: positive logits divided, negative multiplied).
        presence_penalty / frequency_penalty: OpenAI's additive penalties over output tokens.
        seed: per-request RNG seed; the same seed gives the same tokens whatever the batch.
        stop: strings that end generation (not included in the text unless
            ``include_stop_str_in_output``).
        stop_token_ids: token ids that end generation (besides EOS).
        max_tokens: maximum generated tokens; None = up to ``max_model_len``.
        min_tokens: EOS and stop tokens are suppressed until this many tokens exist.
        ignore_eos: keep generating past EOS.
        logprobs: number of top log-probabilities to return per token (0 = only the
            sampled token's), None = none.
        prompt_logprobs: number of top log-probabilities to return for each prompt token
            (0 = only the prompt token's own), None = none. Such a request does not read
            the prefix cache (every prompt position must be computed), as in vLLM.
        skip_special_tokens: drop special tokens from the text.
        logit_bias: token id -> value in [-100, 100] added to that token's logit before
            sampling (OpenAI's ``logit_bias``; -100 effectively bans a token, +100 all but
            forces it); None = none.
        structured_outputs: a constraint on the output (JSON schema, regex, choice,
            grammar) enforced with a token mask each step; None = free text.
        allowed_token_ids: only these token ids may be sampled (vLLM's
            ``allowed_token_ids``); None = all.
        bad_words_token_ids: token-id sequences that must not appear in the output
            (vLLM's ``bad_words`` after tokenization): the last id of a sequence is banned
            whenever the output ends with the rest of it (a one-id sequence always).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    structured_outputs: Optional[StructuredOutputsParams] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words_token_ids: Optional[list[list[int]]] = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        if self.top_k == 0:
            self.top_k = -1
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        for tok, bias in (self.logit_bias or {}).items():
            if not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {tok!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
            if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be token ids (non-negative integers)")
        for seq in self.bad_words_token_ids or []:
            if not seq or any(not isinstance(t, int) or t < 0 for t in seq):
                raise ValueError("bad_words must tokenize to non-empty token-id sequences")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class PoolingParams:
    """An embedding request (``POST /v1/embeddings``): the prompt runs through the model
    like any prefill (batched by the scheduler, prefix cache included) and, instead of a
    sampled token, yields one vector pooled from the final hidden states (after the last
    RMSNorm).

    Attributes:
        pooling: ``"last"``: the last prompt token's hidden state, as vLLM's pooling runner
            does for decoder-only models (LAST pooling; the only kind supported).
        normalize: divide by the L2 norm (vLLM's default for LAST pooling).

    Raises:
        ValueError: an unsupported pooling type.
    """

    pooling: str = "last"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling != "last":
            raise ValueError(f"pooling {self.pooling!r} is not supported (supported: last)")
