"""The FastAPI application: OpenAI-compatible routes over one shared inference ``Engine``.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events or
not), ``GET /v1/models``, ``POST /v1/feedback`` (the chat page's ratings), ``GET /health``, ``GET /metrics``
(Prometheus text), and the chat page at ``/`` with its files under ``/static/``. Every error, whatever
raised it, is answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

The engine decodes on its own thread; each request's events cross to the event loop through
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``, so no request holds a thread while it waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, EngineStopped, Finished, InvalidPrompt, PromptTooLong, QueueFull, TokenEvent
from lmforge.inference.generate import GREEDY_BELOW, SamplingParams
from lmforge.serving.cache import ResponseCache
from lmforge.serving.guard import GuardMiddleware, ServerState
from lmforge.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, FeedbackRequest, SamplingRequest,
                                      error_body, parse_json_body, parse_request)
from lmforge.serving.security import escape_for_log
from lmforge.serving.settings import ServeSettings
from lmforge.tokenizer.bpe import END

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default

log = logging.getLogger("lmforge.serving")


@dataclass(frozen=True)
class ServedModel:
    """What the server serves: the model, its tokenizer, its public id and where it came from."""

    model: object
    tokenizer: object
    run_dir: Path
    checkpoint: Path
    finetuned: bool  # a chat fine-tuned checkpoint (else a base model, which continues text)

    @property
    def model_id(self) -> str:
        return self.run_dir.name


def create_app(served: ServedModel, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The application; its lifespan starts the engine and stops it (draining) at shutdown."""
    state = ServerState(settings)
    service = _Service(served, settings, state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine = Engine(served.model, served.tokenizer, settings.max_batch_size, settings.max_queue,
                                compile=settings.compile).start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.engine.stop, True)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.server = state
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service, settings)
    state.routes = frozenset(route.path for route in app.routes)
    app.add_middleware(GuardMiddleware, state=state)
    if settings.cors_origins:
        # Outside the guard: a browser's preflight carries no key. The real request still needs one.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: ("not found", "not_found"), 405: ("method not allowed on this route", "method_not_allowed")}
        message, code = codes.get(exc.status_code, (str(exc.detail), None))
        error = ApiError(exc.status_code, message, code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        location = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse(ApiError(422, f"{location}: {first.get('msg')}", code="invalid_value").body(), status_code=422)

    async def internal_error(request: Request, exc: Exception):
        details = "".join(traceback.format_exception(exc))
        log.error("internal error on %s %s: %s", request.method, escape_for_log(request.url.path), escape_for_log(details, 4000))
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def _add_routes(app: FastAPI, service: "_Service", settings: ServeSettings) -> None:
    static_dir = Path(settings.static_dir or STATIC_DIR)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.render_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        service.check_model(model)
        return service.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_json_body(await request.body())
        return await service.chat(parse_request(ChatCompletionRequest, body, settings.limits))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_json_body(await request.body())
        return await service.completions(parse_request(CompletionRequest, body, settings.limits))

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = parse_json_body(await request.body())
        return service.save_feedback(parse_request(FeedbackRequest, body, settings.limits))

    @app.get("/")
    async def chat_page():
        index = static_dir / "index.html"
        if not index.is_file():
            raise ApiError(404, "the chat page is not installed (lmforge/serving/static/index.html is missing)", code="not_found")
        return FileResponse(index, headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")


class _EventPipe:
    """Engine events of several requests (the choices of one HTTP request) as ``(choice, event)`` on the loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def callback(self, choice: int):
        def on_event(event):
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, event))
            except RuntimeError:  # the loop is closed: nobody is waiting for this request any more
                pass
        return on_event


@dataclass
class _Job:
    """One HTTP request's generation: every choice's prompt, the choices' handles and their events."""

    prompts: list[list[int]]  # per choice, BOS included
    handles: list
    pipe: _EventPipe
    deadline: float

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    async def next_event(self) -> tuple[int, TokenEvent | Finished]:
        remaining = self.deadline - self.pipe.loop.time()
        try:
            return await asyncio.wait_for(self.pipe.queue.get(), timeout=max(remaining, 0.0))
        except TimeoutError:
            self.cancel()
            raise ApiError(504, "the request took longer than the server's request timeout; it was cancelled",
                           code="request_timeout") from None

    async def results(self) -> list[Finished]:
        finished: list[Finished | None] = [None] * len(self.handles)
        try:
            while any(result is None for result in finished):
                choice, event = await self.next_event()
                if isinstance(event, Finished):
                    finished[choice] = event
        finally:
            self.cancel()  # on a timeout or when the client went away; a finished request ignores it
        for result in finished:
            if result.finish_reason == "error":
                log.error("generation failed: %s", escape_for_log(result.error or "unknown error"))
                raise ApiError(500, "generation failed inside the inference engine", code="engine_error")
        return finished


class _Service:
    """The routes' logic: requests to engine submissions, engine results to OpenAI responses."""

    def __init__(self, served: ServedModel, settings: ServeSettings, state: ServerState):
        self.served, self.settings, self.state = served, settings, state
        self.tokenizer = served.tokenizer
        self.context_length = served.model.config.context_length
        self.max_prompt_tokens = min(settings.max_prompt_tokens or self.context_length, self.context_length)
        self.end_id = self.tokenizer.token_id(END)
        self.end_ids = {self.end_id, self.tokenizer.eos_id}
        self.vocab_size = min(self.tokenizer.vocab_size, served.model.config.vocab_size)
        self.cache = ResponseCache(settings.cache_size)
        self.created = int(served.checkpoint.stat().st_mtime) if served.checkpoint.exists() else int(time.time())
        self.engine: Engine | None = None
        self.scoring = 0  # prompt scorings in flight (they run beside the engine's queue)
        self.feedback_path = Path(settings.feedback_file or served.run_dir / "feedback" / "feedback.jsonl")

    # Models.

    def model_card(self) -> dict:
        return {"id": self.served.model_id, "object": "model", "created": self.created, "owned_by": "lmforge"}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served.model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.served.model_id!r}",
                           code="model_not_found", param="model")

    # Chat completions.

    async def chat(self, request: ChatCompletionRequest):
        self.check_model(request.model)
        messages = [{"role": message.template_role(), "content": message.text()} for message in request.messages]
        prompt = await _off_loop(sum(len(message["content"]) for message in messages), chat_prompt_ids, self.tokenizer, messages)
        max_tokens = self._max_tokens(len(prompt), request.requested_max_tokens(), "messages")
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else 0
        params = self._params(request, max_tokens, stop_token_ids=[self.end_id])
        if request.stream:
            job = self._submit([prompt] * request.n, params, top_logprobs)
            return _event_stream(self._chat_chunks(job, request, top_logprobs))
        cache_key = self._cache_key("chat", request, max_tokens, params)
        if (cached := self._cached(cache_key)) is not None:
            return cached
        results = await self._submit([prompt] * request.n, params, top_logprobs).results()
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.served.model_id, "system_fingerprint": None,
            "choices": [{"index": index, "message": {"role": "assistant", "content": result.text},
                         "logprobs": self._chat_logprobs(result.token_ids, result.logprobs, result.top_logprobs)
                         if request.logprobs else None,
                         "finish_reason": result.finish_reason} for index, result in enumerate(results)],
            "usage": self._usage(len(prompt), results),
        }
        return self._respond(cache_key, response)

    async def _chat_chunks(self, job: _Job, request: ChatCompletionRequest, top_logprobs: int) -> AsyncIterator[dict]:
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.served.model_id, "system_fingerprint": None}
        for index in range(len(job.handles)):
            yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]}
        results = []
        async for index, event in _job_events(job):
            if isinstance(event, list):
                text = "".join(token.text for token in event)
                logprobs = None
                if request.logprobs:
                    logprobs = self._chat_logprobs(*_columns(event))
                if text or logprobs:
                    yield {**base, "choices": [{"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}]}
            else:
                results.append(event)
                yield {**base, "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}]}
        if request.stream_options and request.stream_options.include_usage:
            yield {**base, "choices": [], "usage": self._usage(len(job.prompts[0]), results)}

    def _chat_logprobs(self, token_ids, logprobs, tops) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            raw = self.tokenizer.token_bytes(token_id)
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return {"content": [{**entry(token_id, logprob), "top_logprobs": [entry(*alternative) for alternative in top]}
                            for token_id, logprob, top in zip(token_ids, logprobs, tops)]}

    # Text completions.

    async def completions(self, request: CompletionRequest):
        self.check_model(request.model)
        text_size = sum(len(prompt) for prompt in request.prompts() if isinstance(prompt, str))
        prompts = await _off_loop(text_size, self._completion_prompts, request.prompts())
        choices = len(prompts) * request.n
        if choices > self.settings.max_queue:
            raise ApiError(422, f"{len(prompts)} prompts x n={request.n} is {choices} completions, more than the server's queue "
                           f"of {self.settings.max_queue}", code="invalid_value", param="prompt")
        # 0 only scores the prompt (with echo and logprobs); null means as many as fit the shortest room.
        budgets = [self._max_tokens(len(prompt), request.max_tokens, "prompt") for _, prompt in prompts]
        max_tokens = request.max_tokens if request.max_tokens is not None else min(budgets)
        params = self._params(request, max(max_tokens, 1), stop_token_ids=[])
        top_logprobs = request.logprobs or 0
        cache_key = None if request.stream else self._cache_key("completions", request, max_tokens, params)
        if (cached := self._cached(cache_key)) is not None:
            return cached
        scores = await self._echo_scores(request, prompts, top_logprobs)
        choice_prompts = [(user_ids, prompt, score) for (user_ids, prompt), score in zip(prompts, scores) for _ in range(request.n)]
        job = self._submit([prompt for _, prompt, _ in choice_prompts], params, top_logprobs) if max_tokens > 0 else None
        if request.stream:
            return _event_stream(self._completion_chunks(request, choice_prompts, job, top_logprobs))
        results = await job.results() if job else [None] * choices
        response_choices = []
        for index, ((user_ids, _, score), result) in enumerate(zip(choice_prompts, results)):
            text, logprobs = self._completion_choice(request, user_ids, score, result, top_logprobs)
            response_choices.append({"text": text, "index": index, "logprobs": logprobs,
                                     "finish_reason": result.finish_reason if result else "length"})
        response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": self.served.model_id, "system_fingerprint": None, "choices": response_choices,
                    "usage": self._usage(sum(len(prompt) for _, prompt in prompts), [r for r in results if r is not None])}
        return self._respond(cache_key, response)

    def _completion_prompts(self, prompts: list[str | list[int]]) -> list[tuple[list[int], list[int]]]:
        """(the ids the user gave or their text encodes to, the ids given to the model: BOS first)."""
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
            else:
                ids = list(prompt)
                bad = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
                if bad:
                    raise ApiError(400, f"the prompt has token id {bad[0]}, outside the vocabulary (ids 0 to {self.vocab_size - 1})",
                                   code="invalid_token_id", param="prompt")
            model_ids = ids if ids[:1] == [self.tokenizer.bos_id] else [self.tokenizer.bos_id, *ids]
            encoded.append((ids, model_ids))
        return encoded

    async def _echo_scores(self, request: CompletionRequest, prompts, top_logprobs: int) -> list:
        """The prompts' own token log-probabilities, for echo with logprobs (lm-eval's scoring call)."""
        if not (request.echo and request.logprobs is not None):
            return [None] * len(prompts)
        if self.scoring + len(prompts) > self.settings.max_queue:
            raise ApiError(429, "the server is busy scoring other prompts; retry shortly", code="queue_full",
                           headers={"retry-after": "1"})
        self.scoring += len(prompts)
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                return [await asyncio.to_thread(self.engine.score, prompt, top_logprobs) for _, prompt in prompts]
        except TimeoutError:
            raise ApiError(504, "scoring the prompt took longer than the server's request timeout", code="request_timeout") from None
        finally:
            self.scoring -= len(prompts)

    def _completion_choice(self, request: CompletionRequest, user_ids: list[int], scores, result: Finished | None,
                           top_logprobs: int) -> tuple[str, dict | None]:
        prompt_text = self.tokenizer.decode(user_ids) if request.echo else ""
        text = prompt_text + (result.text if result else "")
        if request.logprobs is None:
            return text, None
        token_ids, logprobs, tops = [], [], []
        if request.echo:
            hidden_bos = len(scores.token_ids) - len(user_ids)  # the BOS the server put first, not the user's
            token_ids += user_ids
            logprobs += scores.logprobs[hidden_bos:]
            tops += scores.top_logprobs[hidden_bos:]
        if result is not None:
            token_ids += result.token_ids
            logprobs += result.logprobs
            tops += result.top_logprobs
        return text, self._legacy_logprobs(token_ids, logprobs, tops, top_logprobs, text_length=len(text))

    def _legacy_logprobs(self, token_ids, logprobs, tops, top_logprobs: int, text_length: int) -> dict:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs (token -> logprob) and text_offset."""
        decoder, offset, offsets = self.tokenizer.stream_decoder(), 0, []
        for token_id in token_ids:
            offsets.append(min(offset, text_length))
            if token_id not in self.end_ids:
                offset += len(decoder.push(token_id))
        return {
            "tokens": [self._token_text(token_id) for token_id in token_ids],
            "token_logprobs": list(logprobs),
            "top_logprobs": [None if top is None else {self._token_text(t): value for t, value in top} if top_logprobs else None
                             for top in tops],
            "text_offset": offsets,
        }

    def _token_text(self, token_id: int) -> str:
        """A token as text; one holding part of a UTF-8 character is written ``bytes:\\xNN`` as OpenAI does."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)

    async def _completion_chunks(self, request: CompletionRequest, choice_prompts, job: _Job | None,
                                 top_logprobs: int) -> AsyncIterator[dict]:
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.served.model_id, "system_fingerprint": None}
        if request.echo:
            for index, (user_ids, _, score) in enumerate(choice_prompts):
                text, logprobs = self._completion_choice(request, user_ids, score, None, top_logprobs)
                yield {**base, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": None}]}
        results = []
        if job is None:
            for index in range(len(choice_prompts)):
                yield {**base, "choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": "length"}]}
        else:
            async for index, event in _job_events(job):
                if isinstance(event, list):
                    text = "".join(token.text for token in event)
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self._legacy_logprobs(*_columns(event), top_logprobs, len(text))
                    if text or logprobs:
                        yield {**base, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": None}]}
                else:
                    results.append(event)
                    yield {**base, "choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": event.finish_reason}]}
        if request.stream_options and request.stream_options.include_usage:
            prompt_tokens = sum(len(prompt) for _, prompt, _ in choice_prompts[:: request.n])
            yield {**base, "choices": [], "usage": self._usage(prompt_tokens, results)}

    # Shared by both endpoints.

    def _max_tokens(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """The completion length to generate; a prompt or a total past the limits is a 400 stating the numbers."""
        if prompt_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this server takes prompts of at most "
                           f"{self.max_prompt_tokens} tokens (the model's context is {self.context_length})",
                           code="context_length_exceeded", param=param)
        room = self.context_length - prompt_tokens
        if requested is None:
            if room < 1:
                raise ApiError(400, f"the prompt is {prompt_tokens} tokens, which fills the model's context of "
                               f"{self.context_length} tokens and leaves no room for a completion", code="context_length_exceeded",
                               param=param)
            return min(room, self.settings.max_tokens_limit)
        if requested > room:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {requested}: {prompt_tokens + requested} "
                           f"tokens do not fit the model's context of {self.context_length} tokens; shorten the prompt or lower "
                           "max_tokens", code="context_length_exceeded", param=param)
        return requested

    def _params(self, request: SamplingRequest, max_tokens: int, stop_token_ids: list[int]) -> SamplingParams:
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        top_p = request.top_p
        if temperature < GREEDY_BELOW or (top_p is not None and top_p < GREEDY_BELOW):
            temperature, top_p = 0.0, None
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=request.stop_list(),
                              seed=request.seed, stop_token_ids=stop_token_ids)

    def _submit(self, prompts: list[list[int]], params: SamplingParams, top_logprobs: int) -> _Job:
        """Queue one engine request per choice (a seed gives choice i the seed + i); all or none."""
        pipe = _EventPipe()
        job = _Job(prompts, [], pipe, pipe.loop.time() + self.settings.request_timeout)
        try:
            for choice, prompt in enumerate(prompts):
                choice_params = params
                if params.seed is not None and choice:
                    choice_params = replace(params, seed=params.seed + choice)
                job.handles.append(self.engine.submit(prompt, choice_params, top_logprobs, on_event=pipe.callback(choice)))
        except BaseException as exc:
            job.cancel()
            raise _engine_error(exc) from None
        return job

    def _usage(self, prompt_tokens: int, results: list[Finished]) -> dict:
        completion_tokens = sum(result.completion_tokens for result in results)
        self.state.metrics.add("prompt_tokens", prompt_tokens)
        self.state.metrics.add("completion_tokens", completion_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def _cache_key(self, endpoint: str, request: SamplingRequest, max_tokens: int, params: SamplingParams) -> str | None:
        """Greedy requests only: their answer is a function of the request (the seed plays no part)."""
        if params.temperature != 0 or self.cache.capacity <= 0:
            return None
        fields = request.model_dump(mode="json", exclude={"stream", "stream_options", "user", "seed"})
        return self.cache.key(endpoint, {**fields, "max_tokens": max_tokens, "model": self.served.model_id})

    def _cached(self, key: str | None) -> Response | None:
        if key is None:
            return None
        found = self.cache.get(key)
        self.state.metrics.add("cache_hits" if found is not None else "cache_misses")
        if found is None:
            return None
        found["id"] = found["id"].split("-", 1)[0] + f"-{uuid.uuid4().hex}"
        found["created"] = int(time.time())
        return JSONResponse(found, headers={"x-lmforge-cache": "hit"})

    def _respond(self, cache_key: str | None, response: dict) -> JSONResponse:
        if cache_key is not None:
            self.cache.put(cache_key, response)
        return JSONResponse(response, headers={"x-lmforge-cache": "miss" if cache_key else "off"})

    # Feedback and metrics.

    def save_feedback(self, request: FeedbackRequest) -> dict:
        """Append the rating as one JSON line (the chat preference format alignment training reads)."""
        record_id = str(uuid.uuid4())
        record = {"id": record_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                  "model": self.served.model_id, "checkpoint": str(self.served.checkpoint),
                  "conversation_id": request.conversation_id, "messages": [message.model_dump() for message in request.messages],
                  "rating": request.rating, "comment": request.comment}
        path = self.feedback_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as out:  # one write of one line: lines never interleave
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as exc:
            log.error("cannot save feedback to %s: %s", escape_for_log(str(path)), escape_for_log(str(exc)))
            raise ApiError(500, "the server could not save the feedback", code="feedback_not_saved") from None
        return {"saved": True, "id": record_id}

    def render_metrics(self) -> str:
        gauges = {f"engine_{name}": value for name, value in (self.engine.stats() if self.engine else {}).items()
                  if isinstance(value, (int, float))}
        gauges["cache_entries"] = len(self.cache)
        gauges["draining"] = int(self.state.draining)
        return self.state.metrics.render(gauges)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """``[BOS] + encode_chat(messages)`` with the assistant turn opened: control tokens come only from roles.

    The tokenizer encodes control strings inside content (``<|end|>``, ``<|system|>``) as plain text, so a
    message cannot forge a turn of another role.
    """
    return [tokenizer.bos_id, *tokenizer.encode_chat(messages, add_generation_prompt=True)]


async def _off_loop(characters: int, function, *args):
    """``function(*args)`` (tokenizing): in a worker thread for long texts, so the event loop never stalls on
    one; short ones inline, where a thread hop would cost more than the work."""
    if characters > 20_000:
        return await asyncio.to_thread(function, *args)
    return function(*args)


def _engine_error(exc: BaseException) -> BaseException:
    if isinstance(exc, QueueFull):
        return ApiError(429, "the server's request queue is full; retry shortly", code="queue_full", headers={"retry-after": "1"})
    if isinstance(exc, EngineStopped):
        return ApiError(503, "the server is shutting down and accepts no new requests", code="server_shutting_down")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), code="context_length_exceeded", param="prompt")
    if isinstance(exc, InvalidPrompt):
        return ApiError(400, str(exc), code="invalid_prompt", param="prompt")
    if isinstance(exc, LmforgeError):
        return ApiError(400, str(exc), code="invalid_value")
    return exc


async def _job_events(job: _Job) -> AsyncIterator[tuple[int, list[TokenEvent] | Finished]]:
    """The job's events until every choice finished: a choice's tokens as a list, then its ``Finished``.

    Tokens already waiting are handed over together, so when the server falls behind under load a
    stream sends one chunk carrying several tokens rather than one chunk per token. Cancels the job when
    the consumer stops early (the client went away) or the time runs out.
    """
    remaining = len(job.handles)
    try:
        while remaining:
            pending = [await job.next_event()]
            while not job.pipe.queue.empty():
                pending.append(job.pipe.queue.get_nowait())
            tokens: dict[int, list[TokenEvent]] = {}
            for choice, event in pending:
                if isinstance(event, TokenEvent):
                    tokens.setdefault(choice, []).append(event)
                    continue
                if choice in tokens:
                    yield choice, tokens.pop(choice)
                if event.finish_reason == "error":
                    log.error("generation failed: %s", escape_for_log(event.error or "unknown error"))
                    raise ApiError(500, "generation failed inside the inference engine", code="engine_error")
                remaining -= 1
                yield choice, event
            for choice, events in tokens.items():
                yield choice, events
    finally:
        job.cancel()


def _columns(tokens: list[TokenEvent]) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """(token ids, logprobs, top alternatives) of a run of token events."""
    return [t.token_id for t in tokens], [t.logprob for t in tokens], [t.top_logprobs for t in tokens]


def _event_stream(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per chunk, ``data: [DONE]`` at the end; an error mid-stream is an
    ``{"error": ...}`` event (the status line has already gone out)."""

    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
