"""Where the denoiser's experts run: in this process, or as Ray actors placed on a cluster.

Both executors run the same flow-matching Euler loop with classifier-free guidance as
DenoiserEngine.generate; the model contract is one call per step, `velocity(x, t)`, so the
loop does not care where the expert lives.

RayExecutor
- one ExpertShard actor per expert per replica, each in its own placement-group bundle
  ({"GPU": 1} on a GPU cluster, {"CPU": 1} otherwise); strategy and replica count from config;
  shards load weights only inside the actor, after Ray has assigned their device;
- step-level (continuous) batching: every scheduler tick gathers all requests at their next
  step, groups them by the expert their timestep needs, and sends each group to its shard
  as one batch — requests join and leave between steps;
- expert pipelining: the high-noise and the low-noise shard work at the same time on
  different requests (one in its early steps, another in its late steps);
- failover: the driver keeps every request's latest latent, so when a shard (or its node)
  dies the step is retried on a restarted shard and the request continues where it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from services.denoiser.engine import DenoiseJob, DenoiserEngine, DenoiserSettings
from services.denoiser.lora import LRU, Adapter, AdapterSlot
from services.denoiser.model import MODELS, MoEDenoiser, set_attention
from services.denoiser.sampling import SamplingCancelled, flow_timesteps, pad_text

log = logging.getLogger("videomesh.executors")


class LocalExecutor:
    """The embedded default: both experts in this process (DenoiserEngine)."""

    name = "local"

    def __init__(self, engine: DenoiserEngine):
        self.engine = engine

    def start(self) -> None:
        pass

    def run(self, job: DenoiseJob, on_step=None, should_stop=None) -> np.ndarray:
        return self.engine.generate(job, on_step=on_step, should_stop=should_stop)

    def stats(self) -> dict:
        return {"executor": "local"}

    def close(self) -> None:
        pass


# --- the shard actor --------------------------------------------------------------------------------


class ExpertShard:
    """One expert of the MoE denoiser. A plain class; `shard_actor()` makes it a Ray actor."""

    def __init__(
        self, model: str, expert: str, weights: str | None, precision: str = "auto", attention: str = "auto"
    ):
        import os

        from videomesh.weights import load_into

        self.model_name, self.expert = model, expert
        self.gpu_ids = _gpu_ids()
        cuda = torch.cuda.is_available() and bool(self.gpu_ids)
        self.device = torch.device("cuda" if cuda else "cpu")  # Ray has set CUDA_VISIBLE_DEVICES for us
        self.dtype = torch.float16 if (cuda and precision == "fp16") else torch.bfloat16
        self.attention = set_attention(attention) if cuda else "matmul"
        torch.manual_seed(0)
        full = MoEDenoiser(MODELS[model])
        prefix = MoEDenoiser._shard_modules[expert] + "."
        net = full.get_submodule(MoEDenoiser._shard_modules[expert])
        load_into(net, weights, prefix=prefix) if weights and os.path.exists(weights) else None
        self.net = net.eval().to(self.device)
        self.prefix = prefix
        self.slot = AdapterSlot(self.net)  # brand style adapters, merged per batch
        # (name, file version) -> this expert's layers of that adapter, fetched once per version
        self._adapters = LRU(8)  # a batch uses one adapter at a time; a few stay for the next
        self.batch_sizes: list[int] = []
        self.adapter_fetches = 0
        self.node_id = _node_id()

    def info(self) -> dict:
        return {"expert": self.expert, "node_id": self.node_id, "gpu_ids": self.gpu_ids, "device": str(self.device),
                "attention": self.attention, "pid": __import__("os").getpid()}  # fmt: skip

    def velocity(
        self,
        x: np.ndarray,
        t: np.ndarray,
        cond: list,
        uncond: list,
        guidance: np.ndarray,
        adapter: tuple | None = None,
        strength: float = 1.0,
    ) -> np.ndarray:
        """One CFG step for a batch of requests: x (B, T, C, H, W), t (B,), per-request text;
        every request of a batch uses the same style adapter (or none), given as (name, file
        version, [object ref]): the ref sits in a list so Ray does not fetch the adapter for every
        step; the shard gets it only the first time it sees that version."""
        self.batch_sizes.append(len(x))
        self.slot.use(self._adapter(*adapter) if adapter is not None else None, strength)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype):
            xb = torch.from_numpy(x).to(self.device)
            tb = torch.from_numpy(t).to(self.device)
            length = max(tx.shape[1] for tx, _ in cond + uncond)
            padded = [pad_text(torch.from_numpy(tx), torch.from_numpy(m), length) for tx, m in cond + uncond]
            text = torch.cat([tx for tx, _ in padded]).to(self.device)
            mask = torch.cat([m for _, m in padded]).to(self.device)
            v = self.net(torch.cat([xb, xb]), torch.cat([tb, tb]), text, mask).float()
            vc, vu = v.chunk(2)
            g = torch.from_numpy(guidance).to(self.device)[:, None, None, None, None]
            return (vu + g * (vc - vu)).cpu().numpy()

    def _adapter(self, name: str, version: str, box: list) -> Adapter:
        key = (name, version)
        sub = self._adapters.get(key)
        if sub is None:
            import ray

            sub = ray.get(box[0]).under(self.prefix)
            self._adapters.put(key, sub)
            self.adapter_fetches += 1
        return sub

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "adapter_fetches": self.adapter_fetches}


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


@dataclass
class _Request:
    job: DenoiseJob
    x: np.ndarray
    timesteps: np.ndarray
    on_step: Callable | None
    should_stop: Callable | None
    step: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def t(self) -> float:
        return float(self.timesteps[self.step])


@dataclass(frozen=True)
class RaySettings:
    address: str = ""  # "" = start a local Ray instance; else join (or $RAY_ADDRESS)
    replicas: int = 1
    strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    use_gpus: str = "auto"  # auto: GPU bundles when the cluster has GPUs
    placement_timeout: float = 60.0
    max_batch: int = 8  # requests per shard call
    num_cpus: int = 0  # for a locally started Ray; 0 = Ray's default


class RayExecutor:
    name = "ray"

    @property
    def capacity(self) -> int:
        return self.settings.max_batch * self.settings.replicas

    def __init__(self, engine: DenoiserEngine, settings: RaySettings):
        self.engine = engine  # for the model config, weights path and the initial noise
        self.settings = settings
        self.shards: list[dict[str, object]] = []  # per replica: expert -> actor handle
        self.groups: list = []
        self._pending: list[_Request] = []
        # name -> (file version, object ref), as many as the engine keeps loaded (least recent first)
        self._adapter_refs = LRU(engine.settings.adapter_cache)
        self._active: list[_Request] = []
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.ticks = 0
        self.pipelined_ticks = 0  # ticks in which both experts ran at once

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
            self.settings.use_gpus == "auto" and gpus >= 2 * self.settings.replicas
        )
        self._bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        experts = list(MoEDenoiser._shard_modules)
        for r in range(self.settings.replicas):
            pg = placement_group(
                [dict(self._bundle) for _ in experts], strategy=self.settings.strategy, name=f"denoiser-{r}"
            )
            ready = ray.wait([pg.ready()], timeout=self.settings.placement_timeout)[0]
            if not ready:
                ray.util.remove_placement_group(pg)
                raise RuntimeError(
                    f"could not place {len(experts)} x {self._bundle} with strategy {self.settings.strategy} within "
                    f"{self.settings.placement_timeout:.0f}s; `ray status` shows the cluster's free resources"
                )
            self.groups.append(pg)
            self.shards.append({e: self._make_shard(pg, i, e) for i, e in enumerate(experts)})
        ray.get([s.info.remote() for rep in self.shards for s in rep.values()])  # loaded and answering
        self._thread = threading.Thread(target=self._loop, name="ray-scheduler", daemon=True)
        self._thread.start()

    def _make_shard(self, pg, index: int, expert: str):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cls = shard_actor(num_cpus=self._bundle.get("CPU", 1), num_gpus=self._bundle.get("GPU", 0), max_restarts=0,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index))  # fmt: skip
        s = self.engine.settings
        weights = str(s.weights) if s.weights else str(_weights_path(self.engine.cfg.name))
        return cls.remote(self.engine.cfg.name, expert, weights, s.precision, s.attention)

    def placement(self) -> list[dict]:
        import ray

        return [ray.get(s.info.remote()) for rep in self.shards for s in rep.values()]

    def stats(self) -> dict:
        import ray

        sizes: dict[str, list[int]] = defaultdict(list)
        fetches: dict[str, int] = defaultdict(int)
        for rep in self.shards:
            for e, s in rep.items():
                try:
                    st = ray.get(s.stats.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - a dead shard has no stats
                    continue
                sizes[e] += st["batch_sizes"]
                fetches[e] += st["adapter_fetches"]
        return {"executor": "ray", "batch_sizes": dict(sizes), "restarts": self.restarts, "ticks": self.ticks,
                "pipelined_ticks": self.pipelined_ticks, "adapter_fetches": dict(fetches)}  # fmt: skip

    # --- requests ---
    def run(self, job: DenoiseJob, on_step=None, should_stop=None) -> np.ndarray:
        x = self.engine.initial_noise(job).numpy()
        ts = flow_timesteps(job.steps, self.engine.cfg.shift).numpy()
        req = _Request(job, x, ts, on_step, should_stop)
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        frames = ((np.clip(req.x[0], -1, 1) + 1) * 127.5).round().astype(np.uint8)  # (T, C, H, W)
        return frames.transpose(0, 2, 3, 1)

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        import ray

        for rep in self.shards:
            for s in rep.values():
                ray.kill(s, no_restart=True)
        for pg in self.groups:
            ray.util.remove_placement_group(pg)

    # --- the scheduler: one tick = every active request advances one step ---
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while not self._pending and not self._active and not self._stop.is_set():
                    self._cv.wait(0.5)
                self._active += self._pending  # requests join between steps
                self._pending = []
            for r in list(self._active):
                if r.should_stop is not None and r.should_stop():
                    self._finish(
                        r, SamplingCancelled(f"stopped before step {r.step + 1} of {len(r.timesteps) - 1}")
                    )
            if self._active:
                self._tick()

    def _finish(self, r: _Request, error: BaseException | None = None) -> None:
        r.error = error
        self._active.remove(r)
        r.done.set()

    def _tick(self) -> None:
        import ray

        cfg = self.engine.cfg
        # one batch per replica, expert and style adapter (a shard merges one adapter at a time)
        groups: dict[tuple[int, str, str, float], list[_Request]] = defaultdict(list)
        for i, r in enumerate(self._active):
            replica = i % len(self.shards)
            groups[(replica, cfg.expert_for(r.t), r.job.adapter, r.job.adapter_strength)].append(r)
        calls = []
        for (replica, expert, _, _), reqs in groups.items():
            for k in range(0, len(reqs), self.settings.max_batch):
                part = reqs[k : k + self.settings.max_batch]
                calls.append((replica, expert, part, self._submit(replica, expert, part)))
        self.ticks += 1
        self.pipelined_ticks += len({e for _, e, _, _ in calls}) > 1
        for replica, expert, part, ref in calls:
            try:
                v = ray.get(ref)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.NodeDiedError,
            ) as err:
                log.warning(
                    "shard %s of replica %d failed (%s): restarting it; the step is retried",
                    expert,
                    replica,
                    err,
                )
                self._restart(replica, expert)
                continue  # these requests keep their latent and step; the next tick redoes the step
            for j, r in enumerate(part):
                t, t_next = float(r.timesteps[r.step]), float(r.timesteps[r.step + 1])
                r.x = r.x + (t_next - t) * v[j : j + 1]
                r.step += 1
                if r.on_step:
                    r.on_step(r.step, len(r.timesteps) - 1, expert, t)
                if r.step == len(r.timesteps) - 1:
                    self._finish(r)

    def _submit(self, replica: int, expert: str, reqs: list[_Request]):
        x = np.concatenate([r.x for r in reqs]).astype(np.float32)
        t = np.array([r.t for r in reqs], np.float32)
        cond = [(r.job.text.float().numpy(), r.job.text_mask.numpy()) for r in reqs]
        uncond = [(r.job.negative.float().numpy(), r.job.negative_mask.numpy()) for r in reqs]
        g = np.array([r.job.guidance or self.engine.cfg.guidance_for(expert) for r in reqs], np.float32)
        job = reqs[0].job
        adapter = self._adapter_arg(job.adapter) if job.adapter else None
        return self.shards[replica][expert].velocity.remote(
            x, t, cond, uncond, g, adapter, job.adapter_strength
        )

    def _adapter_arg(self, name: str) -> tuple:
        """(name, file version, [object ref]) for a shard: the adapter sits in Ray's object store,
        put there once per version of its file (shards on any node read it from there, once; a
        replaced file is put afresh, as in-process)."""
        import ray

        adapter = self.engine.adapter(name)
        cached = self._adapter_refs.get(name)
        if cached is None or cached[0] != adapter.version:
            # a dropped ref's object is freed once no shard call holds it
            self._adapter_refs.put(name, cached := (adapter.version, ray.put(adapter)))
        return (name, adapter.version, [cached[1]])

    def _restart(self, replica: int, expert: str) -> None:
        import ray

        self.restarts += 1
        try:
            ray.kill(self.shards[replica][expert], no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        index = list(MoEDenoiser._shard_modules).index(expert)
        pg = self.groups[replica]
        deadline = time.monotonic() + self.settings.placement_timeout
        while time.monotonic() < deadline:
            try:
                shard = self._make_shard(pg, index, expert)
                ray.get(shard.info.remote(), timeout=self.settings.placement_timeout)
                self.shards[replica][expert] = shard
                return
            except Exception as err:  # noqa: BLE001 - the bundle's node may be gone: Ray reschedules the group
                log.warning("restart of %s not ready yet: %s", expert, err)
                time.sleep(1.0)
        raise RuntimeError(f"could not restart the {expert} shard; `ray status` shows the cluster")


def _weights_path(model: str):
    from services.denoiser.engine import WEIGHTS_DIR

    return WEIGHTS_DIR / f"{model}.safetensors"


def make_executor(engine: DenoiserEngine, settings: DenoiserSettings):
    if settings.executor == "ray":
        import os

        return RayExecutor(engine, RaySettings(address=settings.ray_address or os.environ.get("RAY_ADDRESS", ""),
                                               replicas=settings.ray_replicas, strategy=settings.ray_strategy))  # fmt: skip
    return LocalExecutor(engine)
