"""The inference engine: continuous batching over a slot KV cache, streamed token by token.

INTERFACE CONTRACT (filled in by the engine work; the server and chat build on exactly this):

    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=64)
    engine.start()                      # background decode thread; engine.stop(drain=True) ends it
    handle = engine.submit(prompt_ids, params, top_logprobs=0, on_event=None)
        # prompt_ids: list[int] (BOS already included by the caller); params: SamplingParams
        # raises PromptTooLong (an LmforgeError, message states prompt tokens, max_new_tokens and the context)
        # raises QueueFull when max_queue requests are already waiting or running; EngineStopped after stop()
        # on_event(event) is called from the engine thread for each TokenEvent and the final Finished event
    for event in handle.events(): ...   # blocking iterator, for synchronous callers (chat REPL, tests)
    finished = handle.wait()            # (addition) block until Finished without waking for every token
    handle.cancel()                     # frees the slot at the next step (client went away)
    completion = engine.complete(prompt_ids, params)  # submit + drain: Finished(text, token_ids, ...)
    scores = engine.score(prompt_ids, top_logprobs=0) # PromptScores: logprob of each prompt token given the
                                                      # ones before (None for the first), top-k alternatives
    engine.stats()                      # dict: running, waiting, tokens_generated, requests_finished, ...

Events:
    TokenEvent(text, token_id, logprob, top_logprobs)   # text may be "" while a UTF-8 character is incomplete;
                                                        # top_logprobs: list[(token_id, logprob)], best first
    Finished(text, token_ids, finish_reason, prompt_tokens, completion_tokens, logprobs, top_logprobs, error)
        # finish_reason: "stop" (EOS or a stop string; the stop string is not in text), "length", "cancelled", "error"

Details a caller can rely on:
- Every sampled token gets one TokenEvent, including the EOS or stop-token id that ends a request (its
  text is whatever was still held back, often ""), so ``token_ids``, ``logprobs`` and
  ``completion_tokens`` count it, as OpenAI-style servers do; ``text`` never contains it. For
  "stop" and "length" the TokenEvent texts join to exactly ``Finished.text``. Text that may be the
  start of a stop string is held back until it cannot be.
- ``logprob`` is log_softmax of the model's raw logits: before the repetition penalty, temperature,
  top-k and top-p, so it says what the model believes, whatever the sampling settings (vLLM's default).
- A request with a ``seed`` samples from its own generator: the same seed and prompt give the same
  text alone or batched with others (up to float rounding between batch sizes, which moves a
  probability by ~1e-7).
- Without ``start()`` the engine runs synchronously: ``handle.events()``, ``handle.wait()`` and
  ``complete()`` run its steps in the calling thread (this is what ``generate()`` does).
- Speed: the decode step is ``FastDecodeStep`` (fused weights, ~14 operations per layer instead of
  ~45; see ``lmforge.inference.fast_decode`` and BENCHMARKS.md); ``fast_decode=False`` uses
  ``Decoder.forward`` with per-row positions instead (no weight copies; ``generate()`` uses it).
  ``cuda_graphs=True`` (CUDA only, unmeasured) compiles the fused step with CUDA graphs.
  ``compile=True`` (opt-in, CPU) compiles the one-stream step with inductor when the engine is built
  (a few seconds, a log line on stderr; needs gcc; a warning and the eager step if it fails): ~20%
  more tokens per CPU-second at one stream, nothing at more (see BENCHMARKS.md).
  The fused step copies the weights when the engine is built: rebuild the engine if they change.
- ``on_event`` runs on the engine thread: it should be quick (hand the event to another thread or an
  asyncio loop); if it raises, that request finishes with "error" and the others go on.
- Any valid sampling settings are numerically safe (temperatures below ``GREEDY_BELOW`` = 1e-5 are
  greedy; extreme repetition penalties and tiny top_p give valid tokens). A request whose logits turn
  out NaN or inf, or whose sampling raises, finishes with "error" (``SamplingFailed``) alone: the
  other requests of the batch go on.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.inference.fast_decode import FastDecodeStep
from lmforge.inference.generate import SamplingParams, sample_tokens
from lmforge.inference.kv_cache import SlotKVCache


class PromptTooLong(LmforgeError):
    """The prompt plus max_new_tokens does not fit the model's context."""


class InvalidPrompt(LmforgeError):
    """An empty prompt, or token ids outside the vocabulary."""


class QueueFull(LmforgeError):
    """max_queue requests are already waiting or running; try again later (HTTP 429/503)."""


class EngineStopped(LmforgeError):
    """The engine was stopped and accepts no more requests."""


class SamplingFailed(RuntimeError):
    """A request's logits could not be sampled (NaN or inf); it ends with "error", the others go on."""


@dataclass
class TokenEvent:
    text: str  # new text, possibly "" (an incomplete UTF-8 character, or text that may start a stop string)
    token_id: int
    logprob: float  # log_softmax of the raw logits at the chosen token
    top_logprobs: list[tuple[int, float]]  # the top_logprobs most likely tokens, best first ([] when not asked)


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    error: str | None = None


@dataclass
class PromptScores:
    token_ids: list[int]
    logprobs: list[float | None]  # log P(token | tokens before it); None for the first token
    top_logprobs: list[list[tuple[int, float]] | None]  # best first, at each position; None for the first


class RequestHandle:
    """A submitted request: its events, its cancellation, and (once done) its ``Finished`` result."""

    def __init__(self, engine: "Engine", request: "_Request"):
        self._engine = engine
        self._request = request
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.result: Finished | None = None
        self.exception: BaseException | None = None  # what ended it with finish_reason "error"
        self._done = threading.Event()

    def events(self) -> Iterator[TokenEvent | Finished]:
        """Every event of the request, the last one ``Finished``; blocks while waiting for the engine."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                if self._engine._thread is None:  # a synchronous engine: run its steps here
                    self._engine.step()
                    continue
                event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return

    def wait(self, timeout: float | None = None) -> Finished | None:
        """The request's ``Finished`` once it ends (None after ``timeout`` seconds); events stay queued for ``events()``."""
        if self._engine._thread is None:  # a synchronous engine: run its steps here
            while self.result is None:
                self._engine.step()
        self._done.wait(timeout)
        return self.result

    def cancel(self) -> None:
        """Stop generating: the request finishes with "cancelled" at the next step and frees its slot."""
        self._request.cancelled = True
        self._engine._notify()

    @property
    def done(self) -> bool:
        return self.result is not None


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    top_logprobs: int
    on_event: Callable | None
    end_ids: frozenset[int]
    generator: torch.Generator | None
    decoder: object  # the tokenizer's StreamDecoder
    hold_back: int  # characters of text that may still grow into a stop string
    handle: RequestHandle | None = None
    cancelled: bool = False
    cached: int = 0  # tokens in the KV cache
    text: str = ""
    emitted: int = 0  # how much of text was sent in TokenEvents
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


class Engine:
    """Serves many generation requests at once from one model (see the module docstring for the contract).

    Each step admits waiting requests into free slots (one prompt forward pass each), then runs one
    batched decode step for every running request, whatever its position; requests join and leave
    between steps. ``max_batch_size`` bounds the slots (and the KV cache, allocated once).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_queue: int = 64, fast_decode: bool = True,
                 cuda_graphs: bool = False, compile: bool = False):
        if max_batch_size < 1 or max_queue < 1:
            raise LmforgeError(f"max_batch_size and max_queue must be at least 1 (got {max_batch_size}, {max_queue})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.context_length = model.config.context_length
        # Ids the tokenizer can decode; a model with spare embedding rows never samples those.
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            self.cache = SlotKVCache.for_model(model, max_batch_size)
            # The fused decode step (see fast_decode); without it, Decoder.forward with per-row positions.
            self._fast_decode = FastDecodeStep(model, self.cache) if fast_decode else None
            self._next_input = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # sampled, not yet fed
            self._seen: torch.Tensor | None = None  # (slots, V) tokens in each sequence, for repetition penalties
        if cuda_graphs:
            if self.device.type != "cuda" or not fast_decode:
                raise LmforgeError("cuda_graphs needs a CUDA device and fast_decode; on a CPU the fused decode step is the fast path")
            self._fast_decode.compile()
        self._cuda_graphs = cuda_graphs
        if compile and not cuda_graphs:
            if not fast_decode:
                raise LmforgeError("compile needs fast_decode: it compiles the fused decode step")
            print("engine: compiling the one-stream decode step (torch.compile, inductor; needs gcc) ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            problem = self._fast_decode.compile_single_stream()
            if problem is None:
                print(f"engine: compiled in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
            else:
                warnings.warn(f"the decode step could not be compiled, it stays eager: {problem}", RuntimeWarning, stacklevel=2)
        self._running: list[_Request] = []  # request i occupies KV slot i
        self._groups: list[tuple] = []  # (params, rows, generators, penalised) per sampling setting; see _plan_groups
        self._batch_changed = True  # requests joined or left since the groups were planned
        self._waiting: deque[_Request] = deque()
        self._lock = threading.Lock()  # guards _waiting, _running's length, _accepting and the counters
        self._wakeup = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # one model call at a time: decode steps and score()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._started_at = time.monotonic()
        self._counters = dict(requests_finished=0, requests_cancelled=0, requests_failed=0, tokens_generated=0,
                              prompt_tokens=0, steps=0, rejected_queue_full=0)

    # Lifecycle.

    def start(self) -> "Engine":
        """Run the decode loop in a background thread (daemon, so a crashed caller cannot hang on exit)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True) -> None:
        """Accept no more requests; finish the queued and running ones (``drain``) or cancel them; end the thread."""
        with self._lock:
            self._accepting = False
            if not drain:
                for request in [*self._waiting, *self._running]:
                    request.cancelled = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            while self.step():
                pass

    # Requests.

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0,
               on_event: Callable[[TokenEvent | Finished], None] | None = None) -> RequestHandle:
        """Queue a request; its events arrive through ``on_event`` and ``handle.events()``."""
        prompt_ids = self._checked_prompt(prompt_ids)
        params.validate()
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens and max_new_tokens is {params.max_new_tokens}: "
                                f"{len(prompt_ids) + params.max_new_tokens} tokens do not fit the model's context of "
                                f"{self.context_length}; shorten the prompt or lower max_new_tokens")
        if not 0 <= top_logprobs <= self.vocab_size:
            raise LmforgeError(f"top_logprobs must be between 0 and {self.vocab_size} (got {top_logprobs})")
        for token_id in params.stop_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise LmforgeError(f"stop token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        end_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            end_ids.add(self.tokenizer.eos_id)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = _Request(prompt_ids, params, top_logprobs, on_event, frozenset(end_ids), generator, self.tokenizer.stream_decoder(),
                           hold_back=max((len(s) for s in params.stop if s), default=1) - 1)
        request.handle = RequestHandle(self, request)
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the inference engine is stopped and accepts no new requests")
            if len(self._waiting) + len(self._running) >= self.max_queue:
                self._counters["rejected_queue_full"] += 1
                raise QueueFull(f"the inference engine already has {self.max_queue} requests waiting or running; retry later")
            self._waiting.append(request)
            self._wakeup.notify_all()
        return request.handle

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams, top_logprobs: int = 0) -> Finished:
        """Submit and wait for the result."""
        return self.submit(prompt_ids, params, top_logprobs).wait()

    def score(self, prompt_ids: Sequence[int], top_logprobs: int = 0) -> PromptScores:
        """Log-probability of each prompt token given the ones before it, as ``token_logprobs`` computes it.

        Prompts longer than the context are scored in disjoint windows (lm-eval's rolling log-likelihood).
        Runs in the calling thread, between the engine's steps.
        """
        from lmforge.evaluation.loglikelihood import sliding_windows, token_logprobs

        ids = self._checked_prompt(prompt_ids)
        if not 0 <= top_logprobs <= self.vocab_size:
            raise LmforgeError(f"top_logprobs must be between 0 and {self.vocab_size} (got {top_logprobs})")
        tops: list[list[tuple[int, float]] | None] = [None] * len(ids)
        with self._model_lock:
            chosen = token_logprobs(self.model, ids).tolist()
            if top_logprobs and len(ids) > 1:
                ids_tensor = torch.tensor(ids, device=self.device)
                with torch.inference_mode():
                    for start, end, first_scored in sliding_windows(len(ids), self.context_length, self.context_length):
                        logits = self.model(ids_tensor[None, start : end - 1])[0, :, : self.vocab_size].float()
                        values, indices = torch.log_softmax(logits, dim=-1).topk(top_logprobs, dim=-1)
                        values, indices = values.tolist(), indices.tolist()
                        for position in range(first_scored, end):
                            row = position - start - 1
                            tops[position] = list(zip(indices[row], values[row]))
        return PromptScores(ids, [None, *chosen], tops)

    def stats(self) -> dict:
        """Counters for /metrics; cheap to call at any time."""
        with self._lock:
            return dict(running=len(self._running), waiting=len(self._waiting), **self._counters,
                        max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                        uptime_seconds=round(time.monotonic() - self._started_at, 3))

    def _checked_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(token_id) for token_id in prompt_ids]
        if not ids:
            raise InvalidPrompt("the prompt has no tokens; it needs at least one (BOS)")
        bad = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
        if bad:
            raise InvalidPrompt(f"the prompt has {len(bad)} token id(s) outside the vocabulary of {self.vocab_size} tokens "
                                f"(first: {bad[0]})")
        return ids

    # The decode loop.

    def _notify(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._accepting and not self._waiting and not self._running:
                    self._wakeup.wait()
                if not self._accepting and not self._waiting and not self._running:
                    return
            self.step()

    def step(self) -> bool:
        """Admit waiting requests, then decode one token for every running one; False when there was nothing to do."""
        with self._model_lock, torch.inference_mode():
            self._drop_cancelled()
            decoding = len(self._running)  # requests with a token to feed; new ones join after their prefill
            prefill_logits = self._admit()
            if not self._running:
                return bool(prefill_logits)
            try:
                parts = [self._decode(decoding)] if decoding else []
                logits = torch.cat(parts + prefill_logits) if len(parts) + len(prefill_logits) > 1 else (parts + prefill_logits)[0]
                self._sample_and_emit(logits)
            except Exception as error:  # a failure of the batch as a whole: every request in it ends
                for request in self._running:
                    self._finish(request, "error", error)
            self._counters["steps"] += 1
            self._compact()
            return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [request for request in self._waiting if request.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        for request in cancelled:
            self._finish(request, "cancelled")
        if any(request.cancelled for request in self._running):
            for request in self._running:
                if request.cancelled:
                    self._finish(request, "cancelled")
            self._compact()

    def _admit(self) -> list[torch.Tensor]:
        """Move waiting requests into free slots, each prompt through the model once; their last logits (1, V)."""
        logits = []
        while len(self._running) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
                self._running.append(request)
                self._batch_changed = True
            slot = len(self._running) - 1
            try:
                prompt = torch.tensor([request.prompt_ids], device=self.device)
                if self._fast_decode is not None:
                    logits.append(self._fast_decode.prefill(prompt[0], slot))
                else:
                    logits.append(self.model(prompt, self.cache.prefill(slot))[:, -1])
                request.cached = len(request.prompt_ids)
                if request.params.repetition_penalty != 1.0:
                    seen = self._seen_rows()
                    seen[slot] = False
                    seen[slot, prompt[0]] = True
            except Exception as error:
                self._finish(request, "error", error)
                with self._lock:
                    self._running.pop()
            self._counters["prompt_tokens"] += len(request.prompt_ids)
        return logits

    def _decode(self, rows: int) -> torch.Tensor:
        """One token for each of the first ``rows`` requests: their (rows, V) next-token logits."""
        cached = [request.cached for request in self._running[:rows]]
        width = max(cached) + 1
        if self._cuda_graphs:  # graphs need fixed shapes: attention always spans the whole context, masked
            logits = self._fast_decode(self._next_input[:rows], rows, self.context_length)
        elif self._fast_decode is not None:
            logits = self._fast_decode(self._next_input[:rows], rows, width, same_length=min(cached) + 1 == width)
        else:
            self.cache.begin_decode(rows, width)
            logits = self.model(self._next_input[:rows, None], self.cache)[:, -1]
        for request in self._running[:rows]:
            request.cached += 1
        return logits

    def _seen_rows(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros((self.max_batch_size, self.vocab_size), dtype=torch.bool, device=self.device)
        return self._seen

    def _sample_and_emit(self, logits: torch.Tensor) -> None:
        """Sample a token for each running request from its row of ``logits`` and deliver the events.

        A row that cannot be sampled (its logits hold NaN or +inf, or sampling raised) ends only its
        own request, with "error"; the other rows get their tokens as usual.
        """
        requests = self._running
        raw = logits if logits.shape[-1] == self.vocab_size else logits[:, : self.vocab_size]
        raw = raw.float()  # a no-op for float32 logits
        failures: dict[int, BaseException] = {}
        tokens = self._sample(raw, failures)
        token_ids = tokens.tolist()
        if failures:
            tokens.clamp_(max=self.vocab_size - 1)  # a harmless id for the failed rows, which leave at this step
        self._next_input[: len(requests)] = tokens
        if self._seen is not None:
            self._seen[self.cache.slot_index[: len(requests)], tokens] = True
        log_probs = raw.log_softmax(dim=-1)  # (~3x faster on CPU than logsumexp and a subtraction)
        chosen_logprobs = log_probs.gather(1, tokens[:, None])[:, 0]
        self._counters["tokens_generated"] += len(requests) - len(failures)
        most_alternatives = max(request.top_logprobs for request in requests)
        top_ids = top_values = None
        if most_alternatives:
            top_values, top_ids = log_probs.topk(most_alternatives, dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for row, (request, token_id, logprob) in enumerate(zip(requests, token_ids, chosen_logprobs.tolist())):
            # NaN when this row's logits hold NaN or +inf (or -inf, every logit -inf): its token means nothing.
            if not logprob > float("-inf") or row in failures:
                self._finish(request, "error", failures[row] if row in failures else SamplingFailed(
                    "the model's next-token logits for this request are not finite numbers (NaN or inf)"))
                continue
            alternatives = []
            if request.top_logprobs:
                alternatives = list(zip(top_ids[row][: request.top_logprobs], top_values[row][: request.top_logprobs]))
            try:
                self._accept(request, token_id, logprob, alternatives)
            except Exception as error:  # this request's own failure (e.g. its on_event raised): only it ends
                self._finish(request, "error", error)

    def _sample(self, raw: torch.Tensor, failures: dict[int, BaseException]) -> torch.Tensor:
        """A token id per row of ``raw`` (B, V), each group of alike requests in one call; rows whose sampling
        raised are recorded in ``failures`` and get the id ``vocab_size``."""
        rows = raw.shape[0]
        if self._batch_changed:
            self._plan_groups()
        if len(self._groups) == 1:  # the usual case: every request samples alike, one batched call
            params, group_rows, generators, penalised = self._groups[0]
            return self._sample_group(raw, params, group_rows, generators, self._seen[:rows] if penalised else None, failures)
        tokens = torch.empty(rows, dtype=torch.long, device=self.device)
        for params, group_rows, generators, penalised in self._groups:
            index = torch.tensor(group_rows, device=self.device)
            tokens[index] = self._sample_group(raw[index], params, group_rows, generators,
                                               self._seen[index] if penalised else None, failures)
        return tokens

    def _sample_group(self, raw, params, group_rows, generators, seen, failures) -> torch.Tensor:
        try:
            return sample_tokens(raw, params, generators, seen)
        except Exception:  # find the row(s) at fault by sampling each alone, so only they fail
            tokens = torch.full((len(group_rows),), self.vocab_size, dtype=torch.long, device=self.device)
            for position, row in enumerate(group_rows):
                try:
                    tokens[position] = sample_tokens(raw[position : position + 1], params,
                                                     None if generators is None else [generators[position]],
                                                     None if seen is None else seen[position : position + 1])[0]
                except Exception as error:
                    failures[row] = error
            return tokens

    def _plan_groups(self) -> None:
        """Group the running requests by sampling settings; redone only when the batch changes."""
        groups: dict[tuple, list[int]] = {}
        for row, request in enumerate(self._running):
            groups.setdefault(request.params.sampling_key(), []).append(row)
        self._groups = []
        for rows in groups.values():
            params = self._running[rows[0]].params
            generators = [self._running[row].generator for row in rows]
            self._groups.append((params, rows, None if all(g is None for g in generators) else generators,
                                 params.repetition_penalty != 1.0))
        self._batch_changed = False

    def _accept(self, request: _Request, token_id: int, logprob: float, alternatives: list[tuple[int, float]]) -> None:
        """Add a sampled token to the request: update its text, send its TokenEvent, finish it if it ended."""
        request.token_ids.append(token_id)
        request.logprobs.append(logprob)
        request.top.append(alternatives)
        finish_reason = None
        if token_id in request.end_ids:
            request.text += request.decoder.flush()
            release, finish_reason = len(request.text), "stop"
        else:
            request.text += request.decoder.push(token_id)
            stops = request.params.stop
            stop_at = -1
            if stops:
                found = (request.text.find(s, max(request.emitted - len(s), 0)) for s in stops if s)
                stop_at = min((i for i in found if i >= 0), default=-1)
            if stop_at >= 0:
                request.text = request.text[:stop_at]
                release, finish_reason = stop_at, "stop"
            elif len(request.token_ids) >= request.params.max_new_tokens:
                request.text += request.decoder.flush()
                release, finish_reason = len(request.text), "length"
            else:
                release = max(len(request.text) - request.hold_back, request.emitted)
        piece = request.text[request.emitted : release]
        request.emitted = release
        self._deliver(request, TokenEvent(piece, token_id, logprob, alternatives))
        if finish_reason is not None:
            self._finish(request, finish_reason)

    def _deliver(self, request: _Request, event: TokenEvent | Finished) -> None:
        request.handle._events.put(event)
        if request.on_event is not None:
            request.on_event(event)

    def _finish(self, request: _Request, finish_reason: str, error: BaseException | None = None) -> None:
        """End a request (it leaves its slot at the next compaction) and send its Finished event."""
        handle = request.handle
        if handle.result is not None:
            return
        result = Finished(request.text, request.token_ids, finish_reason, len(request.prompt_ids), len(request.token_ids),
                          request.logprobs, request.top, None if error is None else f"{type(error).__name__}: {error}")
        handle.result, handle.exception = result, error
        with self._lock:
            self._counters["requests_finished"] += 1
            if finish_reason == "cancelled":
                self._counters["requests_cancelled"] += 1
            elif finish_reason == "error":
                self._counters["requests_failed"] += 1
        handle._events.put(result)
        handle._done.set()
        if request.on_event is not None:
            try:
                request.on_event(result)
            except Exception:  # the request is over either way; a failing callback must not stop the engine
                pass

    def _compact(self) -> None:
        """Drop finished requests; the running ones move down, in order, into the freed slots."""
        running = self._running
        if all(request.handle.result is None for request in running):
            return
        sources = [slot for slot, request in enumerate(running) if request.handle.result is None]
        # Slots only move down, in order, so no slot is overwritten before it has been moved.
        for slot, source in enumerate(sources):
            if source != slot:
                self.cache.move(source, slot, running[source].cached)
                self._next_input[slot] = self._next_input[source]
                if self._seen is not None:
                    self._seen[slot] = self._seen[source]
        with self._lock:
            self._running = [running[source] for source in sources]
            self._batch_changed = True
