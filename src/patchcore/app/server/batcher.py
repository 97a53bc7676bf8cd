"""Micro-batching: concurrent predict requests are collected (up to B images or T ms after the first) and
scored with one `predict_batch` call per model and image size, in one worker thread, never on the event loop.

Admission is bounded: at most `max_queue` requests are in flight (decoding, queued or computing); past
that `admit` says no and the route answers 503 with Retry-After, so memory stays bounded under overload.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch

from .registry import ModelEntry

log = logging.getLogger("patchcore.server")


class ScoringError(Exception):
    """The model could not score this image (a non-finite score): the request fails, nothing is labelled."""


@dataclass
class ScoredImage:
    """One image's share of a batch result."""

    score: float
    label: bool | None
    threshold: float | None
    anomaly_map: torch.Tensor  # (H', W') at the model's input geometry
    mask: torch.Tensor | None
    version: int
    batch_size: int
    queue_ms: float
    compute_ms: float


@dataclass
class _Job:
    entry: ModelEntry
    image: torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


class Batcher:
    def __init__(self, *, max_batch: int, max_wait_ms: float, max_queue: int, on_batch=None):
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self.in_flight = 0  # admitted requests; changed on the event loop only
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._on_batch = on_batch  # callback(batch_size) for metrics

    @property
    def depth(self) -> int:
        """Images waiting for the worker."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="patchcore-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def admit(self) -> bool:
        if self.in_flight >= self.max_queue:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    async def score(self, entry: ModelEntry, image: torch.Tensor) -> ScoredImage:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(entry, image, future, loop, time.perf_counter()))
        return await future

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            deadline = time.perf_counter() + self.max_wait
            while len(jobs) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.entry.name, tuple(job.image.shape)), []).append(job)
            for group in groups.values():
                try:
                    self._score_group(group)
                except Exception as err:  # anything unforeseen fails this group's requests, never the worker
                    log.exception("scoring a batch of %d for %s failed", len(group), group[0].entry.name)
                    for job in group:
                        job.loop.call_soon_threadsafe(_fail, job.future, err)

    def _score_group(self, jobs: list[_Job]) -> None:
        entry = jobs[0].entry
        model, version = entry.model, entry.version  # read once: the whole group sees one version
        started = time.perf_counter()
        result = model.predict_batch(torch.stack([job.image for job in jobs]))
        compute_ms = (time.perf_counter() - started) * 1000.0
        if self._on_batch is not None:
            self._on_batch(len(jobs))
        threshold = model.image_threshold_
        for i, job in enumerate(jobs):
            score = float(result.scores[i])
            if not math.isfinite(score):  # never labelled: NaN > threshold is False, which read as "good"
                err = ScoringError(f"the model gave a non-finite anomaly score ({score}) for this image, so it was "
                                   f"not scored: is the model file damaged?")
                job.loop.call_soon_threadsafe(_fail, job.future, err)
                continue
            scored = ScoredImage(
                score=score, label=None if result.labels is None else bool(result.labels[i]),
                threshold=threshold, anomaly_map=result.maps[i].cpu(),
                mask=None if result.masks is None else result.masks[i].cpu(), version=version,
                batch_size=len(jobs), queue_ms=(started - job.enqueued) * 1000.0, compute_ms=compute_ms)
            job.loop.call_soon_threadsafe(_resolve, job.future, scored)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(value)


def _fail(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
