"""Micro-batching: images of concurrent requests are captioned in one encoder and one decoder run.

One worker thread owns the captioner. It takes the first waiting job, gathers whatever else arrives within
`max_wait` (or is already queued, as under load) up to `max_batch` images, groups the jobs by decoding
options and runs each group as one batch. A server that announces the requests it is still reading
(`reading()`, with `wait_for_readers=True`) waits only while one is on its way: a lone client is answered
without the wait. Sampled captions depend on the order of the random draws, so each sampling request is its
own group: a seed gives the same words as `capcli caption --sample --seed`.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from capcli.errors import CapcliError
from capcli.guidance import GuideOptions
from capcli.runtime.captioner import (
    DEFAULT_GUARDS,
    DEFAULT_GUIDANCE,
    NO_GUIDANCE,
    Guards,
    Sampling,
    decode_states,
    guidance_bias,
    start_batch_classes,
)


class ServerBusy(CapcliError):
    """More images are waiting than the server accepts; the client should retry later."""


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode: beam search (beam_size 1 = greedy) or sampling, and the guards (as `capcli caption`)."""

    beam_size: int = 3
    n_best: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    allow_unk: bool = False
    no_repeat_ngram: int = DEFAULT_GUARDS.no_repeat_ngram
    guidance: bool = True
    constrain: bool = False

    def guide_options(self) -> GuideOptions:
        if not self.guidance:
            return NO_GUIDANCE
        return replace(DEFAULT_GUIDANCE, constrain=True) if self.constrain else DEFAULT_GUIDANCE

    def sampling(self) -> Sampling | None:
        return Sampling(self.temperature, self.top_k, self.seed) if self.sample else None

    def guards(self) -> Guards:
        return Guards(suppress_unk=not self.allow_unk, no_repeat_ngram=self.no_repeat_ngram)


@dataclass
class Captioned:
    """One job's answer: per image, the decoder's hypotheses best first, and where the time went."""

    hypotheses: list[list]
    timings_ms: dict[str, float]
    batch_images: int
    classes: list | None = None  # per image, what the classifier saw (capcli.guidance.ImageClasses), or None


@dataclass
class _Job:
    images: np.ndarray  # [n, 3, S, S] float32
    options: DecodeOptions
    number: int
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> tuple:
        return (self.options, self.number) if self.options.sample else (self.options,)


_STOP = object()
_WAKE = object()  # a reader gave up: look again at who is still on the way


class Reading:
    """One request being read: a batch waits (up to max_wait) for it until it submits or fails."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher, self.open = batcher, True

    def submit(self, images: np.ndarray, options: DecodeOptions) -> Future:
        return self.batcher.submit(images, options, reading=self)


class MicroBatcher:
    """Owns the captioner's worker thread; `submit` is safe from any thread."""

    def __init__(self, captioner, max_batch: int = 16, max_wait: float = 0.005, max_queued: int = 256,
                 wait_for_readers: bool = False):
        self.captioner, self.max_batch, self.max_wait, self.max_queued = captioner, max_batch, max_wait, max_queued
        self.wait_for_readers = wait_for_readers
        self._readers = 0
        self.with_attention = getattr(captioner, "grid", None) is not None  # attention bundles answer their maps
        self._queue: queue.Queue = queue.Queue()
        self._queued_images = 0
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._thread = threading.Thread(target=self._run, name="capcli-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @contextlib.contextmanager
    def reading(self) -> Iterator[Reading]:
        """Around reading one request: until it submits (`Reading.submit`) or fails, batches wait for it."""
        reading = Reading(self)
        with self._lock:
            self._readers += 1
        try:
            yield reading
        finally:
            with self._lock:
                gave_up, reading.open = reading.open, False
                self._readers -= gave_up
            if gave_up:  # it failed before submitting: a batch waiting for it goes now
                self._queue.put(_WAKE)

    def _nobody_on_the_way(self) -> bool:
        with self._lock:
            return self.wait_for_readers and self._readers == 0 and self._queue.empty()

    def submit(self, images: np.ndarray, options: DecodeOptions, reading: Reading | None = None) -> Future:
        """Queue images for captioning; the future's result is a Captioned."""
        with self._lock:
            if self._queued_images + len(images) > self.max_queued:
                raise ServerBusy(f"server busy: {self._queued_images} images are waiting; retry shortly")
            self._queued_images += len(images)
            job = _Job(images, options, next(self._numbers))
            self._queue.put(job)
            if reading is not None and reading.open:  # in the same lock: never neither queued nor on the way
                reading.open = False
                self._readers -= 1
        return job.future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _WAKE:
                continue
            if first is _STOP:
                return
            jobs, stopping = self._gather(first)
            for group in _groups(jobs):
                self._caption(group)
            if stopping:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus those arriving within max_wait, up to max_batch images."""
        jobs, images = [first], len(first.images)
        deadline = time.perf_counter() + self.max_wait
        while images < self.max_batch and not self._nobody_on_the_way():
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            if job is not _WAKE:
                jobs.append(job)
                images += len(job.images)
        return jobs, False

    def _caption(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            options = jobs[0].options
            images = np.concatenate([job.images for job in jobs])
            hypotheses, classes, encode_s, decode_s = [], [], 0.0, 0.0
            for chunk in _chunks(images, self.max_batch):
                t0 = time.perf_counter()
                state, context, probs = start_batch_classes(self.captioner, chunk)  # context: attention bundles
                t1 = time.perf_counter()
                guide = options.guide_options()
                bias, seen = guidance_bias(self.captioner, probs, guide)
                required = np.array([c.required for c in seen]) if seen is not None and guide.constrain else None
                classes += seen if seen is not None else [None] * len(chunk)
                hypotheses += decode_states(self.captioner, state, options.beam_size, options.n_best,
                                            sampling=options.sampling(), context=context,
                                            attention=self.with_attention, guards=options.guards(), bias=bias,
                                            required=required)
                encode_s, decode_s = encode_s + t1 - t0, decode_s + time.perf_counter() - t1
        except Exception as exc:  # the server must outlive any failure of one batch
            for job in jobs:
                job.future.set_exception(exc)
            return
        finally:
            with self._lock:
                self._queued_images -= sum(len(job.images) for job in jobs)
        offset = 0
        for job in jobs:
            n = len(job.images)
            timings = {"queue": (started - job.queued_at) * 1e3, "encode": encode_s * 1e3, "decode": decode_s * 1e3}
            job.future.set_result(Captioned(hypotheses[offset : offset + n], timings, len(images),
                                            classes[offset : offset + n]))
            offset += n


def _groups(jobs: list[_Job]) -> Iterator[list[_Job]]:
    by_group: dict[tuple, list[_Job]] = {}
    for job in jobs:
        by_group.setdefault(job.group, []).append(job)
    yield from by_group.values()


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]
