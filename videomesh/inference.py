"""One long-lived inference thread per engine, and torch's thread count set once from the machine.

Torch's OpenMP runtime keeps a pool of worker threads per thread that calls into it. A service
that loads its model on one thread and runs each request on whichever gRPC thread (or a new
thread) handles it gives torch a pool per calling thread: on a 2-core machine those pools fight
for the cores and their workers sleep between operations (measured on the denoiser before this
change: 1.49 cores used and 0.5 s of system time per clip, against 2.0 cores and 0.2 s on one
thread; denoise 3.65 -> 2.52 s). So every engine loads and runs on one thread that lives as long
as the engine: `InferenceThread`, a single-worker `concurrent.futures.ThreadPoolExecutor` (its
worker is created once and reused for every call).

`available_cores()` is what torch's intra-op pool is sized from when the settings leave `threads`
at 0: the CPUs this process may run on (sched_getaffinity), capped by a cgroup v2 CPU quota
(`cpu.max`, what a container's CPU limit sets), so a pod limited to 2 CPUs on a 64-core node
does not start 64 threads.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("videomesh.inference")
T = TypeVar("T")
_set_once = threading.Lock()
_threads_set = 0


def available_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def set_torch_threads(n: int = 0) -> int:
    """Size torch's intra-op pool: `n`, or available_cores() when 0. Returns the count. Called by
    each service at start and by every inference thread as it starts (a thread's OpenMP pool takes
    its size from the thread that creates it)."""
    global _threads_set
    import torch

    n = n or available_cores()
    with _set_once:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        if _threads_set != n:
            log.info("torch intra-op threads: %d", n)
            _threads_set = n
    return n


class InferenceThread:
    """Runs an engine's torch work (load, forward, decode) on one long-lived thread.

    call(fn, ...) blocks the caller until fn has run there and returns its result or raises its
    exception; calls run one at a time, in the order they came (which also serialises access to
    a model that is not thread-safe). A call from the inference thread itself runs at once.
    """

    def __init__(self, name: str = "inference", threads: int = 0):
        self.name = name
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._init_thread)
        self._ident: int | None = None

    def _init_thread(self) -> None:
        self._ident = threading.get_ident()
        set_torch_threads(self.threads)

    @property
    def on_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if self.on_thread:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Stop taking calls; queued calls that have not started are dropped (their callers get
        CancelledError); the one running finishes on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
