"""The OpenAI request schemas the server accepts and the OpenAI error shape it answers with.

Requests are validated by pydantic models whose bounds come from the server's limits, passed as the
validation context (``parse_request(Model, data, limits)``), so a value past a limit is rejected by the
same path as a value of the wrong type: a 422 naming the field. Unknown fields are ignored, as OpenAI
clients send options this server has no use for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, ValidationInfo, field_validator

# Upper bounds that hold whatever the command line says (OpenAI's own, where it has one).
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_PROMPTS = 64
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    """The per-request bounds a server enforces (from `lmforge serve` flags)."""

    max_tokens: int = 512
    max_n: int = 8


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or error_type_for(status)
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_type_for(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    if status == 403:
        return "permission_error"
    return "invalid_request_error"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_bytes(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_body(message, error_type_for(status), param, code)).encode("utf-8")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(body: bytes) -> dict:
    """The request body as a JSON object; malformed bodies are a 400 (never a 500).

    Strict UTF-8, no NaN/Infinity (they are not JSON), nesting deep enough to exhaust the parser refused.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers too long to convert
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def parse_request(model: type[BaseModel], data: dict, limits: RequestLimits):
    """Validate ``data`` against ``model`` under ``limits``; a violation is a 422 naming the first bad field."""
    try:
        return model.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        location = ".".join(str(part) for part in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        message = f"{location}: {first['msg']}{more}" if location else f"{first['msg']}{more}"
        raise ApiError(422, message, code="invalid_value", param=param) from None
    except RecursionError:  # pydantic's own recursion guard, for inputs nested past any schema
        raise ApiError(400, "the request is nested too deeply", code="invalid_json") from None


def _limits(info: ValidationInfo) -> RequestLimits:
    return (info.context or {}).get("limits") or RequestLimits()


Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0, allow_inf_nan=False)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(max_length=256)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    # max_completion_tokens exists on chat requests only: the same limit applies to it.
    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _max_tokens_limit(cls, value, info: ValidationInfo):
        limit = _limits(info).max_tokens
        if value is not None and value > limit:
            raise ValueError(f"must be at most {limit} (the server's --max-tokens-limit)")
        return value

    @field_validator("n")
    @classmethod
    def _n_limit(cls, value, info: ValidationInfo):
        limit = _limits(info).max_n
        if value > limit:
            raise ValueError(f"must be at most {limit} (the server's --max-n)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value):
        if value:
            raise ValueError("is not supported by this server (only 0)")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _at_least_one(cls, value):
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    # One prompt or a batch: text, token ids, or lists of either (as OpenAI's legacy endpoint takes them).
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # A completion's length defaults to 16 tokens, as OpenAI's does.
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


MAX_FEEDBACK_CONTENT = 100_000


class FeedbackMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_FEEDBACK_CONTENT)]


class FeedbackRequest(BaseModel):
    """A rating of the chat page: the conversation up to and including the rated (last) reply."""

    model_config = ConfigDict(extra="ignore")

    conversation_id: Annotated[str, Field(min_length=1, max_length=200)]
    messages: Annotated[list[FeedbackMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    rating: Literal["up", "down"]
    comment: Annotated[str, Field(max_length=5000)] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_the_rated_reply(cls, value):
        if value[-1].role != "assistant":
            raise ValueError("must end with the rated assistant reply")
        return value
