"""Bounded, ordered parallel map over worker processes (both cores decode; memory stays bounded)."""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, max_in_flight: int | None = None,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[R]:
    """Like ``map(fn, items)`` in order, on ``workers`` processes, with at most ``max_in_flight`` pending tasks.

    ``workers == 1`` runs inline (no pool): simplest to debug and what tiny inputs want.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    max_in_flight = max_in_flight or workers * 4
    # spawn, not fork: the parent may hold threads (boto3, pyarrow) that fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
