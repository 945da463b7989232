"""Bounded, ordered parallel map over worker processes (both cores decode; memory stays bounded).

Two backends behind one contract (results in input order, at most ``max_in_flight`` tasks pending):
- ``local``: a spawn ProcessPoolExecutor on this machine (``workers == 1``: inline);
- ``dask``: an existing Dask scheduler (``scheduler_address``, else ``$DASK_SCHEDULER_ADDRESS``), else a
  ``LocalCluster`` of ``workers`` single-threaded processes started and closed here.  A task that raises is
  resubmitted up to ``retries`` times, and the scheduler recomputes the tasks of a worker that dies; each input
  has one future and its one result is yielded once, so a retried or recomputed chunk never duplicates rows.
dask and distributed are imported only when the dask backend is used.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from tasks.core.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


@dataclass(frozen=True)
class ExecutorSpec:
    """Where a stage's map runs; ``section`` (e.g. "ingest") names the params keys in error messages."""
    kind: Literal["local", "dask"] = "local"
    scheduler_address: str | None = None
    retries: int = 2
    section: str = "stage"

    @classmethod
    def of(cls, cfg: Any, section: str) -> ExecutorSpec:
        return cls(cfg.executor, cfg.scheduler_address, cfg.retries, section)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, max_in_flight: int | None = None,
                initializer: Callable | None = None, initargs: tuple = (),
                executor: ExecutorSpec | None = None) -> Iterator[R]:
    """Like ``map(fn, items)`` in order, on ``workers`` processes, with at most ``max_in_flight`` pending tasks.

    ``workers == 1`` runs inline (no pool): simplest to debug and what tiny inputs want.  With
    ``executor.kind == "dask"`` the tasks run on Dask workers instead (see the module docstring).
    """
    if executor is not None and executor.kind == "dask":
        yield from _dask_map(fn, items, workers, max_in_flight, initializer, initargs, executor)
        return
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    max_in_flight = max_in_flight or workers * 4
    # spawn, not fork: the parent may hold threads (boto3, pyarrow) that fork would copy mid-lock.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                               initargs=initargs)
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:  # a task raised, or the consumer stopped: the queued tasks are not run for nothing
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


_INIT_LOCK = threading.Lock()
_INITIALISED: set[str] = set()  # in a Dask worker process: the maps whose initializer already ran here


class _InitThenCall:
    """Runs ``initializer(*initargs)`` once per worker process and map (also on a worker that replaced a lost
    one), then ``fn(item)``.  Pickled by reference: the worker imports the same keel modules."""

    def __init__(self, fn: Callable, initializer: Callable | None, initargs: tuple):
        self.fn, self.initializer, self.initargs, self.token = fn, initializer, initargs, uuid.uuid4().hex
        self.__name__ = getattr(fn, "__name__", "task")  # task keys (dashboard, logs) read <fn name>-<hash>

    def __call__(self, item):
        if self.initializer is not None and self.token not in _INITIALISED:
            with _INIT_LOCK:
                if self.token not in _INITIALISED:
                    self.initializer(*self.initargs)
                    _INITIALISED.add(self.token)
        return self.fn(item)


def _dask_map(fn, items, workers, max_in_flight, initializer, initargs, spec: ExecutorSpec) -> Iterator:
    key = f"{spec.section}.executor"
    try:
        from distributed import Client, LocalCluster
        from distributed.comm import get_address_host_port
    except ImportError as exc:
        raise ConfigError(f"{key}: dask needs the packages dask and distributed, which are not installed here "
                          f"({exc}); install them (`pip install -r requirements.lock`) or set {key}: local") from None
    address = spec.scheduler_address or os.environ.get(SCHEDULER_ENV) or None
    with ExitStack() as stack:
        if address:
            where = (f"{spec.section}.scheduler_address" if spec.scheduler_address
                     else f"${SCHEDULER_ENV} ({spec.section}.scheduler_address is unset)")
            try:
                get_address_host_port(address)  # a malformed address fails here, not as a half-made Client
            except ValueError as exc:
                raise ConfigError(f"{key}: dask: {address!r}, given by {where}, is not a Dask scheduler address "
                                  f"({exc}); write it as tcp://HOST:PORT (the scheduler's port, 8786 by default)"
                                  ) from None
            try:
                client = stack.enter_context(Client(address, set_as_default=False))
            except (OSError, TimeoutError) as exc:
                raise ConfigError(
                    f"{key}: dask: no Dask scheduler answered at {address!r}, given by {where}: "
                    f"{type(exc).__name__}: {exc}. Start one (`dask scheduler`, or the DaskCluster in infra/dask/), "
                    f"fix the address, unset it to use a LocalCluster of {spec.section}.workers processes, or set "
                    f"{key}: local") from None
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=max(workers, 1), threads_per_worker=1,
                                                       processes=True, host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster, set_as_default=False))
        threads = sum(client.nthreads().values()) or max(workers, 1)
        max_in_flight = max_in_flight or max(threads, workers) * 4
        call = _InitThenCall(fn, initializer, initargs)
        pending: deque = deque()
        try:
            for item in items:
                pending.append(client.submit(call, item, retries=spec.retries, pure=False))
                if len(pending) >= max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an abandoned generator: leave no work behind on a shared cluster
            if pending:
                client.cancel(list(pending))


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
