"""The OpenAI API as `mot-serve` speaks it (the layout of vLLM's `entrypoints/openai/protocol.py`): the request
bodies as pydantic models and the checks that need nothing but the body ([`parse_body`]: JSON, field types and ranges,
unsupported options, `n`; `to_sampling_params`: stop strings, and the logit bias against the vocabulary size it is
given), with errors that name the bad field; the response bodies as pydantic models; and [`ApiError`], an error in
OpenAI's shape. No HTTP here, and no server state: `api.py` reads the bodies, makes the checks that need the served
model (its name, vocabulary, context length and tokenizer) and builds the answers."""

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from .engine import SamplingParams

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5

# Fields of OpenAI's API this server does not implement, with the values that mean "not used".
UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
UNSUPPORTED_CHAT = UNSUPPORTED | {"logprobs": (None, False), "tools": (None, []), "response_format": (None,)}
UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of up to 4 strings",
    "content": "a string or a list of text parts",
}


class RequestBase(BaseModel):
    """What completion and chat requests share: the model's name and the sampling fields. Strict (a number given as a
    string is an error, as in OpenAI's API); fields this server ignores (`user`, OpenAI's newer ones) are allowed,
    those it cannot honour are listed in `unsupported` and refused by [`parse_body`]."""

    model_config = ConfigDict(strict=True, extra="allow")
    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    logit_bias: dict[str, float] | None = None
    router_temperature: float | None = Field(None, ge=0)
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a chunk of token counts (`stream_options.include_usage`)."""
        return bool((self.stream_options or {}).get("include_usage"))

    def to_sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        """The engine's parameters for this request; raise [`ApiError`] 400 for stop strings or a logit bias that the
        field types let through but the model cannot take."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise ApiError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size or not -100 <= value <= 100:
                raise ApiError(400, f"'logit_bias' maps token ids < {vocab_size} to [-100, 100]", "logit_bias")
            bias[int(key)] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
            logit_bias=bias,
            router_temperature=self.router_temperature,
        )


class CompletionRequest(RequestBase):
    """`POST /v1/completions`: one or more prompts, as text or token ids, each answered as a choice of its own."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False

    def to_sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        params = super().to_sampling_params(max_tokens, vocab_size)
        return replace(params, logprobs=self.logprobs, echo=bool(self.echo))


class ChatCompletionMessageParam(BaseModel):
    """One message of a chat request: its role and its content, a string or a list of parts of which the text ones
    count."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(RequestBase):
    """`POST /v1/chat/completions`: messages that the tokenizer's chat template turns into one prompt."""

    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED_CHAT

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


RequestT = TypeVar("RequestT", bound=RequestBase)


def parse_body(raw: bytes, model_class: type[RequestT]) -> RequestT:
    """Validate a JSON request body; raise [`ApiError`] 400 naming the first bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model_class.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, *validation_message(error.errors()[0])) from error
    for name, allowed in model_class.unsupported.items():
        if data.get(name, None) not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if body.n not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one completion per prompt), got {body.n}", "n")
    return body


def validation_message(error: dict) -> tuple[str, str]:
    """A message naming the field of one pydantic error (`messages[0].content`), and the top-level field."""
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part:
            break  # pydantic's tag of a union member, not a field
        else:
            path += f".{part}" if path else part
    if error["type"] == "missing":
        return f"'{path}' is required", str(error["loc"][0])
    field_name = path.rsplit(".", 1)[-1].split("[")[0]
    hint = UNION_HINTS.get(field_name)
    problem = f"must be {hint}" if hint and error["type"].endswith("_type") else error["msg"]
    return f"invalid '{path}': {problem}", str(error["loc"][0])


# ----------------------------------------------------------------------------------------------------- responses

Grouping = Literal["isolated", "shared", "none"]


def random_id(prefix: str) -> Callable[[], str]:
    return lambda: f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIBaseModel(BaseModel):
    """A response body. Its JSON holds every field that was given, `null` included, and leaves out an optional field
    left at its default of None (as vLLM's `exclude_unset`): `mot_group_requests` before a prompt's last chunk,
    `usage` in a stream's other chunks, `role` in a chat delta. Fields that are always sent have no default."""

    @model_serializer(mode="wrap")
    def _leave_out_unset_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None or key in self.model_fields_set}


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = None  # given (even as None) in HTTP errors, left out of a stream's error events
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


class ModelCard(OpenAIBaseModel):
    """The served model in `GET /v1/models`, with this server's grouping, group size and context length."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixture-of-tokens"
    mot_grouping: Grouping
    group_size: int
    max_model_len: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Logprobs(OpenAIBaseModel):
    """OpenAI's legacy completions `logprobs`: per token its text, its logprob (None for the first prompt token), its
    top alternatives (None there too) and its offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionResponseChoice(OpenAIBaseModel):
    """One prompt's answer, with the number of requests its group held (`mot_group_requests`, the rest were fillers)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: Logprobs | None
    mot_group_requests: int


class CompletionResponse(OpenAIBaseModel):
    """`POST /v1/completions`: one choice per prompt, and the grouping mode that served them (`mot_grouping`)."""

    id: str = Field(default_factory=random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    mot_grouping: Grouping
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIBaseModel):
    """New text of one prompt; `mot_group_requests` only in the prompt's last chunk (the one with a finish reason)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: Logprobs | None
    mot_group_requests: int | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    """A server-sent chunk of `POST /v1/completions`; the last one, asked for with `stream_options.include_usage`,
    has no choices and the `usage`."""

    id: str = Field(default_factory=random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    mot_grouping: Grouping
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ChatMessage(OpenAIBaseModel):
    """The assistant's message in a chat answer."""

    role: str
    content: str


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: None  # chat logprobs are not supported (a request for them gets 400): always null
    mot_group_requests: int


class ChatCompletionResponse(OpenAIBaseModel):
    """`POST /v1/chat/completions`: the assistant's message."""

    id: str = Field(default_factory=random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    mot_grouping: Grouping
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    """What a chat chunk adds to the message: the role in the first chunk, then content (neither in a chunk that only
    finishes)."""

    role: str | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    """A chat chunk's choice. The first chunk's (the role) has no `logprobs`; the others have `logprobs: null` and,
    in the last, `mot_group_requests`."""

    index: int
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: None = None
    mot_group_requests: int | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    """A server-sent chunk of `POST /v1/chat/completions`; the last one, asked for with
    `stream_options.include_usage`, has no choices and the `usage`."""

    id: str = Field(default_factory=random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    mot_grouping: Grouping
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def to_response(self) -> ErrorResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code))
