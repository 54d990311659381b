"""Requests from many clients gathered into mixed batches on one model thread.

The HTTP handlers run on an asyncio event loop; the model runs on one worker thread of its own (torch gives no
guarantee for concurrent forward passes through one model, and a forward pass would block the loop). Each request
becomes a job on a queue. The worker takes the oldest job, waits up to ``max_wait`` from that job's arrival for
more, then runs every waiting job that can share its batch as one call on the :class:`Server`, up to
``max_batch`` rows: rows of different adapters in one mixed batch (``Server.predict`` / ``generate_ids``), each
row getting what its adapter gives alone. Jobs that cannot share it stay queued for the next round, in order.

What shares a batch: every prediction (classify) job; every greedy generation, whatever its ``max_tokens`` (each
row stops at its own limit, see ``streaming.py``); sampled generations with the same temperature, top-p and top-k.
A sampled generation with a seed runs alone, so that the same seed gives the same text whatever else is queued
(sampling draws one random stream for the whole batch). Loading and unloading adapters run alone, between
batches, which is what makes them safe while the server runs.

Not continuous batching: a generation that arrives while a batch is generating waits for that batch to end.
Joining a running ``model.generate`` call is not possible through transformers' API (its batch, padding and
cache are fixed when the call starts), and its continuous-batching manager has no per-row LoRA routing, so it
could not keep each row exact.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .metrics import Metrics
from .serving import Server
from .streaming import RowState, Watch, until_stop


class ShuttingDown(Exception):
    """The server stopped taking new work."""


@dataclass(eq=False, kw_only=True)
class Job:
    """One request's work; resolved on the event loop it was made on (make it there)."""
    rows: int = 1
    abandoned: bool = False  # its client went away: skip it, or stop its rows
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    future: asyncio.Future = field(init=False)
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    def key(self) -> tuple:
        return ("alone", id(self))

    def resolve(self, value: Any) -> None:
        """From the worker thread: the result, or an exception to raise."""
        def set_now() -> None:
            if self.future.done():  # its awaiting task was cancelled
                return
            if isinstance(value, asyncio.CancelledError):
                self.future.cancel()
            elif isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(set_now)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


@dataclass(eq=False, kw_only=True)
class PredictJob(Job):
    names: list[str]  # per row: adapter, or adapter:task
    inputs: list[dict[str, Any]]
    check: Optional[Callable[[Server], None]] = None  # runs on the worker first; raising refuses this job alone

    def key(self) -> tuple:
        return ("predict",)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass(eq=False, kw_only=True)
class GenerateJob(Job):
    name: str
    # the prompt's token ids, built on the worker (a fast tokenizer must not be used from two threads at once)
    prompt: Callable[[Server], list[int]]
    max_tokens: int
    sampling: Sampling = Sampling()
    on_text: Optional[Callable[[str], None]] = None  # streaming: called on the worker with each new piece of text

    def key(self) -> tuple:
        s = self.sampling
        if s.temperature == 0:
            return ("greedy",)
        return ("alone", id(self)) if s.seed is not None else ("sample", s.temperature, s.top_p, s.top_k)


@dataclass(eq=False, kw_only=True)
class CallJob(Job):
    fn: Callable[[Server], Any]  # e.g. loading an adapter: runs alone, between batches


_STOP = object()


class Batcher:
    def __init__(self, server: Server, max_batch: int = 32, max_wait_ms: float = 5.0,
                 metrics: Optional[Metrics] = None):
        self.server = server
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue = queue.Queue()
        self._counts = [0, 0]  # jobs queued, jobs taken: their difference is the queue length
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="peftkit-model", daemon=True)

    # ---- the event loop's side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Take no new job; finish the queued ones, then end the worker."""
        with self._lock:
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_length(self) -> int:
        with self._lock:
            return self._counts[0] - self._counts[1]

    def enqueue(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._counts[0] += 1
            self._queue.put(job)

    async def run(self, job: Job) -> Any:
        """Queue ``job`` and wait for its result; a cancelled wait (the client went away) abandons it."""
        self.enqueue(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    # ---- the worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        pending: list[Job] = []
        stopping = False
        while pending or not stopping:
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                pending.append(item)
            head = pending[0]
            deadline = head.enqueued + self.max_wait
            alone = head.key()[0] == "alone"  # nothing can join it: no reason to wait
            while not stopping and not alone and self._rows(head, pending) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    pending.append(item)
            group = self._select(head, pending)
            pending = [job for job in pending if job not in group]
            with self._lock:
                self._counts[1] += len(group)
            live = [job for job in group if not job.abandoned]
            self.metrics.abandoned(len(group) - len(live))
            for job in group:
                if job.abandoned:
                    job.resolve(asyncio.CancelledError())
            if live:
                self._execute(live)

    def _rows(self, head: Job, pending: list[Job]) -> int:
        return sum(job.rows for job in pending if job.key() == head.key())

    def _select(self, head: Job, pending: list[Job]) -> list[Job]:
        group, rows = [], 0
        for job in pending:
            if job.key() == head.key() and (not group or rows + job.rows <= self.max_batch):
                group.append(job)
                rows += job.rows
        return group

    def _execute(self, group: list[Job]) -> None:
        try:
            if isinstance(group[0], PredictJob):
                self._predict(group)  # type: ignore[arg-type]
            elif isinstance(group[0], GenerateJob):
                self._generate(group)  # type: ignore[arg-type]
            else:
                group[0].resolve(group[0].fn(self.server))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, never the worker
            for job in group:
                job.resolve(exc)

    def _prepared(self, group: list[Job], prepare: Callable[[Any], Any]) -> list[tuple[Job, Any]]:
        """Each job with what ``prepare`` makes of it; a job it raises for is answered with that error alone."""
        ready = []
        for job in group:
            try:
                ready.append((job, prepare(job)))
            except Exception as exc:  # noqa: BLE001
                job.resolve(exc)
        return ready

    def _predict(self, group: list[PredictJob]) -> None:
        ready = [job for job, _ in self._prepared(group, lambda job: job.check and job.check(self.server))]
        if not ready:
            return
        try:
            rows = [row for job in ready for row in job.inputs]
            names = [name for job in ready for name in job.names]
            predictions = self.server.predict(rows, names, batch_size=self.max_batch)
        except Exception:  # noqa: BLE001
            if len(ready) == 1:
                raise
            for job in ready:  # find the request at fault: the others still get their answers
                self._execute([job])
            return
        self.metrics.batch("predict", len(rows), len(ready), len(set(names)))
        start = 0
        for job in ready:
            job.resolve(predictions[start:start + job.rows])
            start += job.rows

    def _generate(self, group: list[GenerateJob]) -> None:
        ready = self._prepared(group, lambda job: job.prompt(self.server))
        if not ready:
            return
        jobs = [job for job, _ in ready]
        prompts = [ids for _, ids in ready]
        eos = self._eos_ids()
        states = [RowState(job.max_tokens, eos, self.server.decode, job.on_text,
                           lambda job=job: job.abandoned) for job in jobs]
        s = jobs[0].sampling
        generated = self.server.generate_ids(
            prompts, [job.name for job in jobs], max_new_tokens=max(job.max_tokens for job in jobs),
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed, batch_size=len(jobs),
            watch=lambda index: Watch([states[i] for i in index]))
        self.metrics.batch("generate", len(jobs), len(jobs), len({job.name for job in jobs}))
        self.metrics.abandoned(sum(state.dropped for state in states))
        for job, prompt, state, new in zip(jobs, prompts, states, generated):
            kept = until_stop(new, job.max_tokens, eos)
            text = self.server.decode(kept)
            if not state.finish(text):
                self.metrics.stream_mismatch()
            reason = "stop" if kept and kept[-1] in eos else "length"
            job.resolve(Generation(text, len(prompt), len(kept), reason))

    def _eos_ids(self) -> set[int]:
        configured = getattr(self.server.model.generation_config, "eos_token_id", None)
        ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
        ids.add(self.server.tokenizer.eos_token_id)
        return {int(i) for i in ids if i is not None}
