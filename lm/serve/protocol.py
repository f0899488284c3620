"""The OpenAI-compatible wire format of `lm serve`: request bodies, limits, the chat template, errors.

What this file does:
- `CompletionRequest` / `ChatRequest` / `FeedbackRequest`: pydantic bodies of the endpoints, with
  the range checks of the OpenAI API (temperature in [0, 2], top_p in (0, 1], n = 1, <= 4 stops).
  No field is ignored without a word: an unknown one (`max_token`, a typo) is a 400 naming it, as
  OpenAI's API answers; an OpenAI field this server does not implement (`logprobs`, `echo`, penalties,
  `logit_bias`, `suffix`, `best_of`, `response_format`, tools: `UNSUPPORTED`) is accepted only at the
  value that asks for nothing (null, false, 0, empty: what some clients send by default) and otherwise a
  400 naming it (`refuse_unsupported`). `max_completion_tokens` (the newer name) is `max_tokens`;
  `stream_options`, `metadata`, `store`, `service_tier`, `parallel_tool_calls` and a message's `name` are
  bookkeeping that changes no output, accepted and unused (the last chunk of a stream always has `usage`).
- `Limits.sampling_options`: a request's fields on top of the server's `SamplingOptions` (the one
  place sampling defaults live), checked against the prompt-length and `max_tokens` caps.
- `render_chat`: the chat template (below), so instruction-tuned checkpoints answer chat requests.
- `ApiError` / `error_body`: every 4xx/5xx carries OpenAI's `{"error": {message, type, param, code}}`.

Chat template (Alpaca's, the instruction format that `POST /v1/feedback` writes and the
instruction-tuning DataModule reads). A `system` message replaces the first line; each `user`
message is an instruction, each `assistant` message a response; the prompt ends with an open
response, and generation stops at the next `### ` heading:

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {user}

    ### Response:
    {assistant, for earlier turns}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lm.model.sampling import SamplingOptions

CHAT_PREAMBLE = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
CHAT_STOP = "\n### "  # the next heading: the model has finished its response


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body (`error_body`) and `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def json_value(value: Any) -> str:
    """A value as the client wrote it in JSON (true, null, {"type": "json_object"})."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: 0 and 0.0 are, false and 0 are not (Python's `False == 0` would let
    `"frequency_penalty": false` through where the schema's enum, [null, 0], refuses it)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx (`error_body`), declared in the OpenAPI schema so clients and fuzzers can check it."""

    error: ErrorDetail


# ------------------------------------------------------------------------------------- bodies
_WHAT = "x-lm-unsupported"  # the schema key that marks such a field (and says what it would ask for)


def _unsupported(what: str, *off: Any) -> Any:
    """An OpenAI field this server does not implement: accepted only at a value in `off` (what asks for nothing,
    as some clients send by default), else refused naming `what` it would ask for (`refuse_unsupported`). The
    OpenAPI schema lists `off` as the field's only values; `UNSUPPORTED` is read back from these fields."""
    return Field(None, description=f"Not supported here: {what}.", json_schema_extra={"enum": list(off), _WHAT: what})


class _SamplingFields(BaseModel):
    """Fields shared by both generation endpoints. None means "the server's default"."""

    # strict: a JSON value must have the schema's type (pydantic's lax mode took `"top_p": true` as 1.0 and
    # `"temperature": "0.5"` as 0.5, which the schema, and so any client generated from it, says are errors)
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1)  # not in OpenAI's API; accepted as an extension
    seed: Optional[int] = Field(None, ge=0, lt=2**63)  # torch generators take 64-bit seeds (larger was a 500)
    stop: Union[str, list[str], None] = Field(None)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request: send several requests for more
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name of max_tokens
    user: Optional[str] = None
    # accepted, unused: bookkeeping that changes no output (a stream's last chunk always carries usage)
    stream_options: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    # OpenAI fields not implemented here: refused unless at a value that asks for nothing (refuse_unsupported)
    logprobs: Any = _unsupported("token log-probabilities, which this server does not return", None, False, 0)
    top_logprobs: Any = _unsupported("token log-probabilities, which this server does not return", None, 0)
    echo: Any = _unsupported("the prompt echoed before the completion", None, False)
    suffix: Any = _unsupported("text after the insertion point (insertion is not supported)", None, "")
    best_of: Any = _unsupported("several completions ranked server-side (send several requests)", None, 1)
    logit_bias: Any = _unsupported("a per-token bias (the server's sampling has none)", None, {})
    presence_penalty: Any = _unsupported("OpenAI's presence penalty (the server applies its own repetition penalty)",
                                         None, 0)
    frequency_penalty: Any = _unsupported("OpenAI's frequency penalty (the server applies its own repetition "
                                          "penalty)", None, 0)
    response_format: Any = _unsupported("a structured output format", None, {"type": "text"})
    tools: Any = _unsupported("tool calls", None, [])
    tool_choice: Any = _unsupported("tool calls", None, "none")
    functions: Any = _unsupported("function calls", None, [])
    function_call: Any = _unsupported("function calls", None, "none")

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "_SamplingFields":
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError(f"max_tokens={self.max_tokens} and max_completion_tokens="
                                 f"{self.max_completion_tokens} disagree: send one of them")
            self.max_tokens = self.max_completion_tokens
        return self

    def refuse_unsupported(self) -> None:
        """ApiError(400) naming the first OpenAI field set to ask for something this server does not do."""
        for name, (what, off) in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and not any(_same_json(value, v) for v in off if v is not None):
                allowed = ", ".join("null" if v is None else json_value(v) for v in off)
                raise ApiError(400, f"{name}={json_value(value)} asks for {what}: lm serve does not support it. Leave "
                                    f"{name} out (or send {allowed}).", name, code="unsupported_parameter")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"At most 4 stop sequences are allowed, got {len(stops)}.", "stop")
        return [s for s in stops if s]


# OpenAI fields this server does not implement: field -> (what it would ask for, the values that ask for nothing)
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    name: (info.json_schema_extra[_WHAT], tuple(info.json_schema_extra["enum"]))
    for name, info in _SamplingFields.model_fields.items()
    if isinstance(info.json_schema_extra, dict) and _WHAT in info.json_schema_extra}


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str]]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, f"Send one prompt per request (got a list of {len(self.prompt)}); "
                                    "concurrent requests are batched by the server anyway.", "prompt")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None  # a participant's name: the chat template has no place for it (accepted, unused)


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class FeedbackRequest(BaseModel):
    """A rating and/or a corrected answer for a response id returned by this server."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=100)
    rating: Optional[Literal["up", "down"]] = None
    correction: Optional[str] = Field(None, max_length=20_000)


# ------------------------------------------------------------------------------------- limits
@dataclass
class Limits:
    """What a request may ask for. `context` is the model's; the rest are server settings."""

    context: int
    max_tokens_cap: int = 512
    max_prompt_tokens: Optional[int] = None  # default: context - 1
    max_body_bytes: int = 1_000_000
    max_token_bytes: Optional[int] = None  # the tokenizer's longest token, in UTF-8 bytes (None: no early check)

    def __post_init__(self) -> None:
        self.max_prompt_tokens = min(self.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_tokens_cap = min(self.max_tokens_cap, self.context - 1)

    def check_prompt_size(self, prompt: str, param: str = "prompt") -> None:
        """Refuse, before tokenizing it, a prompt too long to fit whatever its tokens: each token covers at most
        `max_token_bytes` bytes, so more than max_prompt_tokens x that many bytes is surely too many tokens.
        Tokenizing a huge prompt only to refuse it costs memory the tokenizer keeps (its word cache).
        `param` names the field the prompt came from (a chat's is rendered from `messages`)."""
        try:
            size = len(prompt.encode("utf-8"))
        except UnicodeEncodeError as error:  # a lone UTF-16 surrogate (JSON "\ud800"): no UTF-8 text to tokenize
            # (an offset into the chat template would point nowhere in what the client sent)
            where = f"the prompt, at character {error.start}" if param == "prompt" else "a message's content"
            raise ApiError(400, f"The request holds text that is not valid Unicode: {error.reason}, in {where} "
                                f"({json_value(prompt[error.start])}: a lone UTF-16 surrogate). Send UTF-8 text.",
                           param) from error
        if self.max_token_bytes is not None and size > self.max_prompt_tokens * self.max_token_bytes:
            raise ApiError(400, f"The prompt is {size} bytes: far more than the {self.max_prompt_tokens} tokens this "
                                f"server accepts. Shorten it.", "prompt", code="context_length_exceeded")

    def sampling_options(self, body: _SamplingFields, prompt_tokens: int, defaults: SamplingOptions,
                         extra_stop: Optional[list[str]] = None) -> SamplingOptions:
        """The request's `SamplingOptions`: its fields over `defaults`; ApiError(400) if out of limits."""
        if prompt_tokens == 0:
            raise ApiError(400, "The prompt is empty: send at least one character.", "prompt")
        if prompt_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"The prompt has {prompt_tokens} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}. Shorten it.", "prompt", code="context_length_exceeded")
        room = self.context - prompt_tokens
        if body.max_tokens is not None and body.max_tokens > self.max_tokens_cap:
            raise ApiError(400, f"max_tokens={body.max_tokens} is above this server's cap of "
                                f"{self.max_tokens_cap}.", "max_tokens")
        if body.max_tokens is not None and body.max_tokens > room:
            raise ApiError(400, f"The prompt has {prompt_tokens} tokens; with max_tokens={body.max_tokens} that "
                                f"exceeds the model's context of {self.context} tokens. Ask for at most {room}.",
                           "max_tokens", code="context_length_exceeded")
        given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed}
        values = {k: v for k, v in given.items() if v is not None}
        values["max_new_tokens"] = body.max_tokens or min(defaults.max_new_tokens, self.max_tokens_cap, room)
        stops = body.stops() + list(extra_stop or [])
        values["stop"] = stops or defaults.stop
        if body.top_p is not None and body.top_k is None:
            values["top_k"] = None  # an OpenAI client that sets top_p means nucleus sampling alone
        return dataclasses.replace(defaults, **values)


# ---------------------------------------------------------------------------------------- chat
def render_chat(messages: list[ChatMessage]) -> tuple[str, str]:
    """(prompt text for the model, the last user message: the feedback record's instruction)."""
    preamble = CHAT_PREAMBLE
    parts: list[str] = []
    for message in messages:
        if message.role == "system":
            preamble = message.content
        elif message.role == "user":
            parts.append(f"### Instruction:\n{message.content}\n\n")
        else:
            parts.append(f"### Response:\n{message.content}\n\n")
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    return preamble + "\n\n" + "".join(parts) + "### Response:\n", last_user
