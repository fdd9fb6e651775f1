"""A request queue feeding the jitted prefill / decode programs of `glm_jax.generation`, in batches.

Why a thread: JAX calls block, while the HTTP server's event loop must keep accepting requests and
streaming bytes. One engine thread owns the device. It takes the oldest waiting request plus the
waiting requests that can share its compiled programs (same sampling plan and stop tokens), runs
their prompts through one prefill, then decodes in chunks of `decode_chunk` steps and hands every
request its new tokens after each chunk. Between chunks it retires rows that reached their own
token limit or whose client went away: their `done` flag is set on the device, so they stop choosing
tokens, and the while-loop ends as soon as every row is done, which frees the batch for the
requests that wait.

Batching is static (no continuous batching): the rows of a batch share one cache index (left
padding, exactly as `generate` lays out a ragged batch), so a request that arrives while a batch
runs waits for it to end. Batch sizes are bucketed (`batch_buckets`) so that a few compiled
programs serve every load; unused rows repeat the first prompt and are done from the start.

Per-row sampling values (temperature, top-p, repetition penalty) are `[B, 1]` arrays, which the
sampling code broadcasts row by row; a single request therefore runs the very programs that
`glm_jax.generate` runs and produces the same tokens. Sampling draws use one key per batch (the
first request's seed), so a seed reproduces a sampled answer only when its request runs alone.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.generation import PROGRAMS, DecodePlan, bucket_length
from glm_jax.modeling.layer_stack import model_for_params
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.sampling import SamplingParams, SamplingValues

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # a stop token was produced (it ends the tokens)
FINISH_LENGTH = "length"  # the request's max_new_tokens was reached
FINISH_CANCELLED = "cancelled"  # the caller cancelled (its client went away)


class EngineBusy(RuntimeError):
    """The queue holds `max_queue` waiting requests already."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and accepts nothing."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue: token ids (ending with `[gMASK] <sop>` for GLM), limits, sampling."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """What the engine tells a request: new token ids, and at the end why it finished (or an error)."""

    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestHandle:
    """The submitter's side of a request: `await next_event()` until an event is `final`; `cancel()`
    when the answer is no longer wanted (safe to call at any time, from any thread)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._answered = False  # a final event was emitted (engine thread only)

    async def next_event(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event: Event) -> None:
        """Called by the engine thread."""
        self._answered = self._answered or event.final
        if self._loop is None:  # nobody listens (warm-up rows)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring and tests (read with `Engine.stats()`)."""

    queued: int = 0
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    batches: int = 0
    generated_tokens: int = 0
    largest_batch: int = 0


def _power_of_two_buckets(max_batch: int) -> tuple[int, ...]:
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(sizes[-1] * 2, max_batch))
    return tuple(sizes)


class Engine:
    """Batches submitted `GenerationRequest`s onto the device (see the module docstring).

    `max_batch`: most requests decoded together. `batch_buckets`: the batch sizes programs are
    compiled for (default: powers of two up to `max_batch`). `decode_chunk`: decode steps between
    host reads (1 streams every token; more steps cost fewer host round trips). `batch_window_s`:
    how long the first request of a batch waits for company. `max_queue`: waiting requests
    accepted before `submit` raises `EngineBusy`. `prompt_buckets`: as in `generate`.
    """

    def __init__(
        self,
        model: GLMForCausalLM,
        params: Any,
        *,
        max_batch: int = 8,
        batch_buckets: tuple[int, ...] | None = None,
        decode_chunk: int = 4,
        batch_window_s: float = 0.002,
        max_queue: int = 256,
        prompt_buckets: tuple[int, ...] | None = None,
    ) -> None:
        if max_batch < 1 or decode_chunk < 1 or max_queue < 1 or batch_window_s < 0:
            raise ValueError("max_batch, decode_chunk and max_queue must be >= 1 and batch_window_s >= 0")
        buckets = tuple(sorted(set(batch_buckets or _power_of_two_buckets(max_batch))))
        if buckets[-1] < max_batch:
            raise ValueError(f"batch_buckets {buckets} cannot hold max_batch={max_batch} requests")
        self._params = nn.unbox(params)
        self.model = model_for_params(model, self._params)
        self._max_batch = max_batch
        self._batch_buckets = buckets
        self._decode_chunk = decode_chunk
        self._batch_window_s = batch_window_s
        self._max_queue = max_queue
        self._prompt_buckets = prompt_buckets
        self._pad_id = model.config.pad_token_id or 0
        cfg = model.config
        self.stop_ids = (() if cfg.eos_token_id is None else (cfg.eos_token_id,)) + tuple(cfg.extra_stop_token_ids)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._running: list[RequestHandle] = []  # the rows of the batch on the device
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()

    # ------------------------------------------------------------------------------ public API

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + new) a request may span: the model's `max_sequence_length`."""
        return self.model.config.max_sequence_length

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve_forever, name="glm-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stops taking requests, fails the waiting ones, cancels the running batch (it ends at its
        next chunk) and joins the thread."""
        with self._wakeup:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            running = list(self._running)
            self._wakeup.notify_all()
        for handle in waiting:
            handle._emit(Event(error="the server is shutting down"))
        for handle in running:
            handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues `request`; call from the event loop that will await its events."""
        self.check(request)
        handle = RequestHandle(request, asyncio.get_running_loop())
        with self._wakeup:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self._max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting already (max_queue={self._max_queue})")
            self._waiting.append(handle)
            self._wakeup.notify_all()
        return handle

    def check(self, request: GenerationRequest) -> None:
        """Raises `ValueError` naming the problem if `request` cannot run on this model."""
        cfg = self.model.config
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if len(request.prompt) + request.max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt has {len(request.prompt)} tokens and {request.max_new_tokens} new tokens are asked for; "
                f"the model's context holds {self.context_length}"
            )
        bad = [t for t in request.prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")

    def warmup(self, prompt_tokens: int, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids: tuple[int, ...] | None = None) -> float:
        """Compiles the programs of every batch bucket for prompts of `prompt_tokens` tokens and
        `max_new_tokens` new ones with `sampling` and `stop_ids` (default: the model's, which the app
        uses), so that the first requests of that shape do not wait for compilation. Call before
        `start`; returns the seconds it took."""
        if self._thread is not None:
            raise RuntimeError("warmup() must run before start()")
        cfg = self.model.config
        prompt = [self._pad_id] * (prompt_tokens - 2) + [cfg.gmask_token_id or 0, cfg.bos_token_id or 0]
        request = GenerationRequest(tuple(prompt[-prompt_tokens:]), max_new_tokens, sampling,
                                    stop_ids=self.stop_ids if stop_ids is None else tuple(stop_ids))
        self.check(request)
        begin = time.perf_counter()
        for size in self._batch_buckets:
            self._run_batch([RequestHandle(request, None) for _ in range(size)])
        self._stats = EngineStats()
        return time.perf_counter() - begin

    def stats(self) -> EngineStats:
        with self._wakeup:
            return dataclasses.replace(self._stats, queued=len(self._waiting))

    # --------------------------------------------------------------------------- engine thread

    def _serve_forever(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception as e:  # a failed batch must not take the server down
                log.exception("batch of %d requests failed", len(batch))
                self._finish_rows(batch, error=f"generation failed: {type(e).__name__}: {e}")

    def _take_batch(self) -> list[RequestHandle] | None:
        """The oldest waiting request and the compatible ones behind it; None once closing."""
        with self._wakeup:
            while not self._waiting and not self._closing:
                self._wakeup.wait()
            if self._closing:
                return None
            if self._batch_window_s and len(self._waiting) < self._max_batch:
                self._wakeup.wait(self._batch_window_s)
                if self._closing:
                    return None
            first = self._waiting[0]
            key = self._program_key(first.request)
            batch = [h for h in self._waiting if self._program_key(h.request) == key][: self._max_batch]
            chosen = {id(h) for h in batch}
            self._waiting = collections.deque(h for h in self._waiting if id(h) not in chosen)
            cancelled = [h for h in batch if h.cancelled]
            batch = [h for h in batch if not h.cancelled]
            self._stats.cancelled += len(cancelled)
            self._stats.active = len(batch)
            self._running = batch
        for handle in cancelled:
            handle._emit(Event(finish_reason=FINISH_CANCELLED))
        return batch

    def _program_key(self, request: GenerationRequest) -> tuple:
        return request.sampling.plan(self.model.config.vocab_size), request.stop_ids

    def _run_batch(self, rows: list[RequestHandle]) -> None:
        requests = [h.request for h in rows]
        batch = next(b for b in self._batch_buckets if b >= len(rows))
        padded = requests + [requests[0]] * (batch - len(rows))
        prompt_len = bucket_length(max(len(r.prompt) for r in requests), self._prompt_buckets)
        limits = [r.max_new_tokens for r in requests]
        plan = DecodePlan(
            model=self.model, batch=batch, prompt_len=prompt_len, max_new=bucket_length(max(limits)),
            sampling=requests[0].sampling.plan(self.model.config.vocab_size), stop_ids=requests[0].stop_ids,
            pad_id=self._pad_id,
        )
        ids = np.full((batch, prompt_len), self._pad_id, np.int32)
        for row, request in enumerate(padded):
            ids[row, prompt_len - len(request.prompt):] = request.prompt
        valid = np.arange(prompt_len)[None, :] >= prompt_len - np.array([len(r.prompt) for r in padded])[:, None]
        per_row = [r.sampling.values() for r in padded]
        values = SamplingValues(*(np.array([[float(v[i])] for v in per_row], np.float32) for i in range(3)))
        args = (self._params, ids, valid, values, jax.random.key(requests[0].seed))
        prefill, _ = PROGRAMS.get("prefill", plan, args)
        state = prefill(*args)
        with self._wakeup:
            self._stats.batches += 1
            self._stats.largest_batch = max(self._stats.largest_batch, len(rows))

        emitted = [0] * len(rows)
        finished = [False] * len(rows)
        stop_ids = set(plan.stop_ids)
        while True:
            step, done, tokens = jax.device_get((state.step, state.done, state.tokens))
            step = int(step)
            for row, handle in enumerate(rows):
                if finished[row]:
                    continue
                new = [int(t) for t in tokens[row, emitted[row]:min(step, limits[row])]]
                stop_at = next((i for i, t in enumerate(new) if t in stop_ids), None)
                if stop_at is not None:
                    new = new[: stop_at + 1]
                emitted[row] += len(new)
                reason = (FINISH_STOP if stop_at is not None else FINISH_LENGTH if emitted[row] >= limits[row]
                          else FINISH_CANCELLED if handle.cancelled else None)
                if new or reason:
                    handle._emit(Event(tokens=tuple(new), finish_reason=reason))
                if reason:
                    finished[row] = True
                    self._record_finish(reason, len(new))
                elif new:
                    self._record_finish(None, len(new))
            if all(finished):
                break
            retire = np.array([row >= len(rows) or finished[row] for row in range(batch)])
            if np.any(retire & ~done):
                state = state._replace(done=jnp.asarray(done | retire))
            target = min(step + self._decode_chunk, max(limits[r] for r in range(len(rows)) if not finished[r]))
            if target <= step:  # cannot happen: an unfinished row has tokens left to choose
                raise RuntimeError(f"decode made no progress at step {step}")
            args = (self._params, state, values, np.int32(target))
            decode, _ = PROGRAMS.get("decode_until", plan, args)
            state = decode(*args)
        with self._wakeup:
            self._stats.active = 0
            self._running = []

    def _record_finish(self, reason: str | None, new_tokens: int) -> None:
        with self._wakeup:
            self._stats.generated_tokens += new_tokens
            if reason == FINISH_CANCELLED:
                self._stats.cancelled += 1
            elif reason is not None:
                self._stats.completed += 1

    def _finish_rows(self, rows: list[RequestHandle], error: str) -> None:
        """Fails the rows of a broken batch that have no answer yet."""
        unanswered = [h for h in rows if not h._answered]
        with self._wakeup:
            self._stats.failed += len(unanswered)
            self._stats.active = 0
            self._running = []
        for handle in unanswered:
            handle._emit(Event(error=error))
