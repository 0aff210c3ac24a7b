"""Where the denoiser's forwards run: in this process, or on expert shards placed by Ray.

Both executors are the same step-level scheduler around the one sampler loop
(`backends.loop.advance`): one long-lived thread gathers every request in flight at its next step, the loop
groups them by the backend's batch key (expert, latent shape, ...), runs one forward per group,
applies the backend's sampler step and reports progress. Requests join and leave between steps;
should_stop() is asked before each of a request's steps. The executors differ only in where a
forward runs (`_submit`): LocalExecutor calls `backend.forward` here, RayExecutor calls it on the
shard that holds the expert. Each request's noise and sampler state (a multistep scheduler, for
Wan) stay here, and its frames decode here as the backend yields them (never on an expert shard).

Threads: all of this process's torch work for the model (a request's start, every forward, every
decoded chunk) runs on the scheduler thread, so torch keeps one OpenMP pool (videomesh/inference.py
says why that matters). Given an InferenceThread (`worker`), the scheduler runs on it, the thread
the model was loaded on. Work from other threads goes through `call()`, which runs it on the
scheduler thread between ticks: a decoded chunk between two steps of the requests still sampling.

RayExecutor
- one ExpertShard actor per expert per replica, each in its own placement-group bundle
  ({"GPU": 1} on a GPU cluster, {"CPU": 1} otherwise); strategy and replica count from config;
  shards load only their expert (no VAE), inside the actor, after Ray has assigned their device;
- a request's text states (4 MiB a text for Wan) go to a shard once, through the object store
  (`backend.remote_state`); each step sends only the latents and the step index;
- expert pipelining: the tick submits every group's forward before waiting for any, so the
  high-noise and the low-noise shard work at the same time on different requests;
- failover: the driver keeps every request's latest latent, so when a shard (or its node)
  dies the step is retried on a restarted shard and the request continues where it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from services.denoiser.backends.base import DenoiseJob, ModelBackend, SamplerState
from services.denoiser.backends.loop import advance
from services.denoiser.engine import WAN, DenoiserEngine, DenoiserSettings
from services.denoiser.lora import LRU, Adapter
from services.denoiser.model import MoEDenoiser
from services.denoiser.sampling import SamplingCancelled
from videomesh.errors import Unavailable
from videomesh.inference import InferenceThread
from videomesh.metrics import DENOISER_STEP

log = logging.getLogger("videomesh.executors")


def as_backend(model: ModelBackend | DenoiserEngine) -> ModelBackend:
    if isinstance(model, DenoiserEngine):
        from services.denoiser.backends.default import DefaultBackend

        return DefaultBackend(model)
    return model


def default_batch(backend: ModelBackend) -> int:
    """Requests per forward when the settings leave it open. Wan: 4 (its texts are all 512 tokens;
    a batch gives each request's frames bit for bit, tests/unit/test_wan_backend.py). The built-in
    models: 8. Their texts are padded to the longest in the batch (the padding is masked out), and
    CPU GEMM kernels round a row differently with the number of rows, so a batched request's frames
    can differ from its frames alone by one level in a few pixels (measured: 1 level at most, in
    2e-5 of the values; tests/unit/test_batching.py holds it to that)."""
    return 4 if getattr(backend, "kind", "") == WAN else 8


@dataclass
class _Request:
    id: int
    state: SamplerState
    on_step: Callable | None
    should_stop: Callable | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    decoding: _DecodeGroup | None = None  # set when the request finished sampling with others


class _DecodeGroup:
    """Requests that finished sampling in the same tick, decoded as one batch (backend.decode_batch).

    Each request's stream pulls its own chunks (`next`, on the scheduler thread); a chunk step of the
    batch runs when the request asking has none queued, and the other requests' chunks wait in their
    queues until they ask. A request that stops reading (`drop`) no longer collects chunks. An error
    of the batch is raised to every request still reading, never read as the end of the frames."""

    def __init__(self, backend: ModelBackend, states: Sequence[SamplerState]):
        self.states = list(states)
        self.queues: dict[int, deque] = {id(s): deque() for s in states}
        self._chunks = backend.decode_batch(self.states)
        self._ended = False
        self.error: BaseException | None = None

    def next(self, state: SamplerState) -> np.ndarray | None:
        q = self.queues.get(id(state))
        if q is None:
            return None
        while not q and not self._ended:
            if self.error is not None:
                raise self.error
            try:
                chunks = next(self._chunks)
            except StopIteration:
                self._ended = True
                break
            except BaseException as err:  # noqa: BLE001 - every reader gets it
                self.error = err
                raise
            for s, chunk in zip(self.states, chunks, strict=True):
                other = self.queues.get(id(s))  # None once its reader stopped (drop, from its thread)
                if other is not None:
                    other.append(chunk)
        if not q and self.error is not None:
            raise self.error
        return q.popleft() if q else None

    def drop(self, state: SamplerState) -> None:
        self.queues.pop(id(state), None)


class SteppedExecutor:
    """The scheduler both executors share; subclasses say where a forward runs (`_submit`)."""

    name = "stepped"

    def __init__(
        self,
        model: ModelBackend | DenoiserEngine,
        max_batch: int = 0,
        *,
        batch_wait: float = 0.0,
        worker: InferenceThread | None = None,
        decode_batch: int = 1,
    ):
        self.backend = as_backend(model)
        # requests that finish sampling in the same tick decode together, up to this many (1 = each alone)
        self.decode_batch = decode_batch
        self.max_batch = max_batch or default_batch(self.backend)
        # a new batch waits this long (seconds) for more requests before its first step; requests
        # that come later join at the next step boundary anyway
        self.batch_wait = batch_wait
        self.worker = worker
        self._tasks: list[tuple[Callable, tuple, Future]] = []  # call()s waiting for the thread
        self._loop_ident: int | None = None
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._by_state: dict[int, _Request] = {}  # id(state) -> its request
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | Future | None = None
        self.ticks = 0
        self.decode_batches: deque[int] = deque(
            maxlen=1000
        )  # sizes of the latest decodes that batched requests

    @property
    def capacity(self) -> int:
        """Generations at once (the gateway sizes its slots from it): what one tick batches."""
        return self.max_batch

    def start(self) -> None:
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._cv:
            if self._thread is None:
                if self.worker is not None:  # the thread the model was loaded on
                    self._thread = self.worker.submit(self._loop)
                else:
                    self._thread = threading.Thread(
                        target=self._loop, name=f"{self.name}-scheduler", daemon=True
                    )
                    self._thread.start()

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the scheduler thread (between ticks) and return its result."""
        if threading.get_ident() == self._loop_ident:
            return fn(*args)
        done: Future = Future()
        with self._cv:
            if self._stop.is_set():
                raise SamplingCancelled("the denoiser is shutting down")
            self._tasks.append((fn, args, done))
            self._cv.notify_all()
        self._ensure_thread()
        return done.result()

    def _run_tasks(self) -> None:
        with self._cv:
            tasks, self._tasks = self._tasks, []
        for fn, args, done in tasks:
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
                done.set_exception(err)

    # --- requests ---
    def stream(
        self, job: DenoiseJob, on_step=None, should_stop=None, stats: dict | None = None
    ) -> Iterator[np.ndarray]:
        """Sample `job` with the requests in flight and yield its uint8 (n, H, W, 3) frame chunks as
        they decode. on_step(step, total, expert, t) after every step (on the scheduler thread);
        `stats`, when given, receives the steps "computed" and "reused" (step caching) once sampled."""
        self._ensure_thread()
        state = self.call(self.backend.start, job)
        req = _Request(next(self._ids), state, on_step, should_stop)
        with self._cv:
            if self._stop.is_set():  # close() has emptied the lists already: nothing would serve it
                raise SamplingCancelled("the denoiser is shutting down")
            self._by_state[id(state)] = req
            self._pending.append(req)
            self._cv.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        if stats is not None:
            reused = state.cache.reused if state.cache is not None else 0
            stats.update(computed=state.step - reused, reused=reused)
        group = req.decoding
        # chunks decode on the scheduler thread, this request's alone or in a batch with the requests
        # that finished with it
        pull = (
            (lambda: group.next(state))
            if group is not None
            else partial(next, self.backend.decode(state), None)
        )
        try:
            while True:
                if should_stop is not None and should_stop():
                    raise SamplingCancelled("stopped while decoding")
                frames = self.call(pull)
                if frames is None:
                    return
                yield frames
        finally:
            if group is not None:
                group.drop(state)

    def run(self, job: DenoiseJob, on_step=None, should_stop=None) -> np.ndarray:
        """`stream` collected: (T, H, W, 3) uint8."""
        return np.concatenate(list(self.stream(job, on_step, should_stop)))

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(timeout=10)
        elif self._thread is not None:
            wait([self._thread], timeout=10)
        self._fail_all(SamplingCancelled("the denoiser is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        """Every request and queued call still waiting gets `error` (the loop will not serve them)."""
        with self._cv:
            waiting, self._active, self._pending = self._active + self._pending, [], []
            tasks, self._tasks = self._tasks, []
        for r in waiting:
            r.error = r.error or error
            r.done.set()
        for _, _, done in tasks:
            if done.set_running_or_notify_cancel():
                done.set_exception(error)

    # --- the scheduler: one tick = every active request advances one step ---
    def _loop(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            self._serve()
        except BaseException as err:
            log.exception("the denoiser's scheduler stopped")
            self._stop.set()  # no caller waits for a loop that is gone: all of them get an error now
            self._fail_all(Unavailable(f"the denoiser's scheduler stopped ({err}); retry", retry_after=5.0))
            raise

    def _serve(self) -> None:
        batch_deadline = 0.0  # while a new batch waits for more requests (batch_wait)
        while not self._stop.is_set():
            with self._cv:
                while not (self._pending or self._active or self._tasks or self._stop.is_set()):
                    self._cv.wait(0.5)
            self._run_tasks()  # starts and decoded chunks asked for by other threads
            with self._cv:
                if self._pending and not self._active and self.batch_wait > 0:
                    # a new batch: give requests that arrive together a moment to start together (their
                    # starts run here meanwhile: this loop goes round for every task)
                    now = time.monotonic()
                    batch_deadline = batch_deadline or now + self.batch_wait
                    if (
                        len(self._pending) < self.max_batch
                        and now < batch_deadline
                        and not self._stop.is_set()
                    ):
                        if not self._tasks:
                            self._cv.wait(batch_deadline - now)
                        continue
                batch_deadline = 0.0
                self._active += self._pending  # requests join between steps
                self._pending = []
            for r in list(self._active):
                try:
                    stop = r.should_stop is not None and r.should_stop()
                except Exception as err:  # noqa: BLE001 - the caller's callback failed: its request fails
                    self._finish(r, err)
                    continue
                if stop:
                    s = r.state
                    self._finish(r, SamplingCancelled(f"stopped before step {s.step + 1} of {s.total}"))
            if self._active:
                try:
                    self._tick()
                except Exception as err:  # noqa: BLE001 - a failed tick fails its requests, not the service
                    log.exception("scheduler tick failed")
                    for r in list(self._active):
                        self._finish(r, err)

    def _tick(self) -> None:
        self.ticks += 1
        t0 = time.perf_counter()
        advance(self.backend, [r.state for r in self._active], self._report, submit=self._submit,
                place=self._place, max_batch=self.max_batch)  # fmt: skip
        DENOISER_STEP.observe(time.perf_counter() - t0)
        finished: dict = defaultdict(list)  # decode key -> requests that finished sampling together
        for r in self._active:
            if r.error is None and r.state.done:
                finished[self.backend.decode_key(r.state)].append(r)
        for group in finished.values() if self.decode_batch > 1 else ():
            for k in range(0, len(group), self.decode_batch):
                part = group[k : k + self.decode_batch]
                if len(part) > 1:
                    batch = _DecodeGroup(self.backend, [r.state for r in part])
                    for r in part:
                        r.decoding = batch
                    self.decode_batches.append(len(part))
        for r in list(self._active):
            if r.error is not None or r.state.done:
                self._finish(r, r.error)

    def _report(self, state: SamplerState, expert: str, t: float) -> None:
        r = self._by_state[id(state)]
        if r.on_step is not None:
            r.on_step(state.step, state.total, expert, t)

    def _finish(self, r: _Request, error: BaseException | None = None) -> None:
        r.error = error
        if r in self._active:
            self._active.remove(r)
        self._by_state.pop(id(r.state), None)
        self._forget(r)
        r.done.set()

    def _fail(self, states: Sequence[SamplerState], error: BaseException) -> None:
        for s in states:
            self._by_state[id(s)].error = error

    def _place(self, state: SamplerState):
        return None

    def _forget(self, r: _Request) -> None:
        pass

    def _submit(self, place, expert: str, states: Sequence[SamplerState]):
        raise NotImplementedError

    def stats(self) -> dict:
        return {"executor": self.name, "ticks": self.ticks, "decode_batches": list(self.decode_batches)}


class LocalExecutor(SteppedExecutor):
    """Every expert in this process: the forwards run on the scheduler thread, one after the other."""

    name = "local"

    def _submit(self, place, expert: str, states: Sequence[SamplerState]):
        def result():
            try:
                return self.backend.forward(expert, states)
            except Exception as err:  # noqa: BLE001 - handed to the requests of this batch
                self._fail(states, err)
                return None

        return result


# --- the shard actor --------------------------------------------------------------------------------


class ExpertShard:
    """One expert of the model (the default U-Net's expert, or one WanTransformer3DModel), with no
    VAE. A plain class; `shard_actor()` makes it a Ray actor. It keeps each request's remote state
    (texts, timesteps, guidance) from its first step to `forget`, so steps carry only latents."""

    def __init__(self, settings: DenoiserSettings, expert: str):
        from services.denoiser.engine import load_backend

        self.expert = expert
        self.gpu_ids = _gpu_ids()  # Ray has set CUDA_VISIBLE_DEVICES for us before the model loads
        self.backend = load_backend(settings, experts=(expert,), decode=False)
        home = getattr(self.backend, "engine", self.backend)
        self.device = torch.device(home.device)
        self.attention = getattr(home, "attention", "sdpa")
        if hasattr(self.backend, "adapter_for"):  # style adapters come through the object store
            self.backend.adapter_for = lambda name: self._adapter_now
        self._adapter_now: Adapter | None = None
        self._states: dict[int, SamplerState] = {}
        # (name, file version) -> this expert's layers of that adapter, fetched once per version
        self._adapters = LRU(8)  # a batch uses one adapter at a time; a few stay for the next
        self.batch_sizes: list[int] = []
        self.adapter_fetches = 0
        self.state_fetches = 0
        self.node_id = _node_id()

    def info(self) -> dict:
        b = self.backend
        loaded = list(b.engine.model.experts) if hasattr(b, "engine") else list(b.experts)
        return {"expert": self.expert, "node_id": self.node_id, "gpu_ids": self.gpu_ids, "device": str(self.device),
                "attention": self.attention, "pid": __import__("os").getpid(), "loaded": loaded,
                "decoder": getattr(b, "vae", None) is not None}  # fmt: skip

    def forward(
        self, expert: str, batch: list, new: dict, adapter: tuple | None = None
    ) -> list[torch.Tensor]:
        """One forward for a batch of requests: batch = [(request id, step, latents)]; `new` maps the
        ids this shard has not seen to [object ref of backend.remote_state] (in a list, so Ray does
        not fetch it for every step); adapter = (name, file version, [object ref]) or None."""
        import ray

        if new:
            for rid, state in zip(new, ray.get([box[0] for box in new.values()]), strict=True):
                self._states[rid] = _on_device(state, self.device)
                self.state_fetches += 1
        self._adapter_now = self._adapter(*adapter) if adapter is not None else None
        states = []
        for rid, step, latents in batch:
            s = self._states[rid]
            s.step, s.latents = step, latents.to(self.device)
            states.append(s)
        self.batch_sizes.append(len(states))
        out = self.backend.forward(expert, states)
        for s in states:
            s.latents = None
        return [p.cpu() for p in out]

    def forget(self, ids: list[int]) -> None:
        for rid in ids:
            self._states.pop(rid, None)

    def _adapter(self, name: str, version: str, box: list) -> Adapter:
        key = (name, version)
        sub = self._adapters.get(key)
        if sub is None:
            import ray

            full = ray.get(box[0])
            prefix = MoEDenoiser._shard_modules[self.expert] + "."
            # only this expert's layers: the other expert is not loaded here
            sub = dataclasses.replace(
                full, layers={p: v for p, v in full.layers.items() if p.startswith(prefix)}
            )
            self._adapters.put(key, sub)
            self.adapter_fetches += 1
        return sub

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "adapter_fetches": self.adapter_fetches,
                "state_fetches": self.state_fetches, "states": len(self._states)}  # fmt: skip


def _on_device(state: SamplerState, device: torch.device) -> SamplerState:
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor):
            setattr(state, f.name, v.to(device))
    return state


def _gpu_ids() -> list:
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - not inside Ray
        return []


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return "local"


def shard_actor(**options):
    """The one factory that turns ExpertShard into a Ray actor class."""
    import ray

    return ray.remote(**options)(ExpertShard)


# --- the Ray executor ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaySettings:
    address: str = ""  # "" = start a local Ray instance; else join (or $RAY_ADDRESS)
    replicas: int = 1
    strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    use_gpus: str = "auto"  # auto: GPU bundles when the cluster has GPUs
    placement_timeout: float = 60.0
    max_batch: int = 8  # requests per shard call
    num_cpus: int = 0  # for a locally started Ray; 0 = Ray's default


class RayExecutor(SteppedExecutor):
    """The experts as Ray actors. `model` is this process's backend (for Wan loaded without experts:
    it starts requests, steps their schedulers and decodes); `denoiser` the settings shards load from
    (an engine's own when a DenoiserEngine is given)."""

    name = "ray"

    def __init__(
        self,
        model: ModelBackend | DenoiserEngine,
        settings: RaySettings,
        denoiser: DenoiserSettings | None = None,
        worker: InferenceThread | None = None,
    ):
        super().__init__(model, settings.max_batch, worker=worker)
        self.settings = settings
        self.denoiser = denoiser or self.backend.engine.settings
        self.experts = [e.name for e in self.backend.supports().experts]
        self.shards: list[dict[str, object]] = []  # per replica: expert -> actor handle
        self.groups: list = []
        # (replica, expert) -> ids of the requests whose remote state that shard holds
        self._sent: dict[tuple[int, str], set[int]] = defaultdict(set)
        self._refs: dict[int, object] = {}  # request id -> object ref of its remote state
        # name -> (file version, object ref), as many as the engine keeps loaded (least recent first)
        self._adapter_refs = LRU(getattr(self.denoiser, "adapter_cache", 8))
        self._tick_experts: set[str] = set()
        self.restarts = 0
        self.pipelined_ticks = 0  # ticks in which two experts ran at once

    @property
    def capacity(self) -> int:
        return self.settings.max_batch * self.settings.replicas

    # --- placement ---
    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": False}
            if self.settings.address:
                ray.init(address=self.settings.address, **kw)
            else:
                ray.init(num_cpus=self.settings.num_cpus or None, **kw)
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = self.settings.use_gpus == "yes" or (
            self.settings.use_gpus == "auto" and gpus >= len(self.experts) * self.settings.replicas
        )
        self._bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        for r in range(self.settings.replicas):
            pg = placement_group(
                [dict(self._bundle) for _ in self.experts],
                strategy=self.settings.strategy,
                name=f"denoiser-{r}",
            )
            ready = ray.wait([pg.ready()], timeout=self.settings.placement_timeout)[0]
            if not ready:
                ray.util.remove_placement_group(pg)
                raise RuntimeError(
                    f"could not place {len(self.experts)} x {self._bundle} with strategy {self.settings.strategy} "
                    f"within {self.settings.placement_timeout:.0f}s; `ray status` shows the cluster's free resources"
                )
            self.groups.append(pg)
            self.shards.append({e: self._make_shard(pg, i, e) for i, e in enumerate(self.experts)})
        ray.get([s.info.remote() for rep in self.shards for s in rep.values()])  # loaded and answering
        self._ensure_thread()

    def _make_shard(self, pg, index: int, expert: str):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cls = shard_actor(num_cpus=self._bundle.get("CPU", 1), num_gpus=self._bundle.get("GPU", 0), max_restarts=0,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index))  # fmt: skip
        return cls.remote(self.denoiser, expert)

    def placement(self) -> list[dict]:
        import ray

        return [ray.get(s.info.remote()) for rep in self.shards for s in rep.values()]

    def stats(self) -> dict:
        import ray

        sizes: dict[str, list[int]] = defaultdict(list)
        fetches: dict[str, int] = defaultdict(int)
        states: dict[str, int] = defaultdict(int)
        for rep in self.shards:
            for e, s in rep.items():
                try:
                    st = ray.get(s.stats.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - a dead shard has no stats
                    continue
                sizes[e] += st["batch_sizes"]
                fetches[e] += st["adapter_fetches"]
                states[e] += st["state_fetches"]
        return {"executor": "ray", "batch_sizes": dict(sizes), "restarts": self.restarts, "ticks": self.ticks,
                "pipelined_ticks": self.pipelined_ticks, "adapter_fetches": dict(fetches),
                "state_fetches": dict(states)}  # fmt: skip

    def close(self) -> None:
        super().close()
        import ray

        for rep in self.shards:
            for s in rep.values():
                ray.kill(s, no_restart=True)
        for pg in self.groups:
            ray.util.remove_placement_group(pg)

    # --- where forwards run ---
    def _tick(self) -> None:
        self._tick_experts = set()
        super()._tick()
        self.pipelined_ticks += len(self._tick_experts) > 1

    def _place(self, state: SamplerState) -> int:
        return self._by_state[id(state)].id % len(self.shards)

    def _submit(self, replica: int, expert: str, states: Sequence[SamplerState]):
        import ray

        self._tick_experts.add(expert)
        reqs = [self._by_state[id(s)] for s in states]
        sent = self._sent[(replica, expert)]
        new = {}
        for r in reqs:
            if r.id not in sent:
                if r.id not in self._refs:  # put once per request, whichever shards read it
                    # the step cache stays with the loop, as the latents do (a reused step sends nothing)
                    remote = dataclasses.replace(self.backend.remote_state(r.state), cache=None)
                    self._refs[r.id] = ray.put(remote)
                new[r.id] = [self._refs[r.id]]
        batch = [(r.id, r.state.step, r.state.latents) for r in reqs]
        job = states[0].job  # one adapter per batch (the backend's batch key)
        adapter = self._adapter_arg(job.adapter) if job.adapter else None
        ref = self.shards[replica][expert].forward.remote(expert, batch, new, adapter)
        sent.update(new)

        def result():
            try:
                out = ray.get(ref)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.NodeDiedError,
            ) as err:
                if self._stop.is_set():  # close() killed the shards: nothing to restart
                    self._fail(states, SamplingCancelled("the denoiser is shutting down"))
                    return None
                log.warning("shard %s of replica %d failed (%s): restarting it; the step is retried",
                            expert, replica, err)  # fmt: skip
                self._restart(replica, expert)
                return None  # these requests keep their latent and step; the next tick redoes the step
            except Exception as err:  # noqa: BLE001 - the forward itself failed: its requests fail
                self._fail(states, getattr(err, "cause", None) or err)
                return None
            return [p.to(s.latents.device) for p, s in zip(out, states, strict=True)]

        return result

    def _forget(self, r: _Request) -> None:
        self._refs.pop(r.id, None)
        for (replica, expert), ids in self._sent.items():
            if r.id in ids:
                ids.discard(r.id)
                try:
                    self.shards[replica][expert].forget.remote([r.id])
                except Exception:  # noqa: BLE001 - a dead shard forgot already
                    pass

    def _adapter_arg(self, name: str) -> tuple:
        """(name, file version, [object ref]) for a shard: the adapter sits in Ray's object store,
        put there once per version of its file (shards on any node read it from there, once; a
        replaced file is put afresh, as in-process)."""
        import ray

        adapter = self.backend.engine.adapter(name)
        cached = self._adapter_refs.get(name)
        if cached is None or cached[0] != adapter.version:
            # a dropped ref's object is freed once no shard call holds it
            self._adapter_refs.put(name, cached := (adapter.version, ray.put(adapter)))
        return (name, adapter.version, [cached[1]])

    def _restart(self, replica: int, expert: str) -> None:
        import ray

        self.restarts += 1
        self._sent[(replica, expert)] = set()  # a new shard holds no request's state
        try:
            ray.kill(self.shards[replica][expert], no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        index = self.experts.index(expert)
        pg = self.groups[replica]
        deadline = time.monotonic() + self.settings.placement_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                shard = self._make_shard(pg, index, expert)
                ray.get(shard.info.remote(), timeout=self.settings.placement_timeout)
                self.shards[replica][expert] = shard
                return
            except Exception as err:  # noqa: BLE001 - the bundle's node may be gone: Ray reschedules the group
                log.warning("restart of %s not ready yet: %s", expert, err)
                time.sleep(1.0)
        raise RuntimeError(f"could not restart the {expert} shard; `ray status` shows the cluster")


def make_executor(
    backend: ModelBackend | DenoiserEngine, settings: DenoiserSettings, worker: InferenceThread | None = None
):
    if settings.executor == "ray":
        import os

        return RayExecutor(backend, RaySettings(address=settings.ray_address or os.environ.get("RAY_ADDRESS", ""),
                                                replicas=settings.ray_replicas, strategy=settings.ray_strategy),
                           settings, worker=worker)  # fmt: skip
    return LocalExecutor(backend, settings.max_batch, batch_wait=settings.batch_wait, worker=worker,
                         decode_batch=settings.decode_batch)  # fmt: skip
