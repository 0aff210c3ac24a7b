"""gRPC adapter for the denoiser: parses, checks with the backend, runs it through the executor on a
worker thread, streams step progress, then frames as they decode, then Done."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

import torch

from services.denoiser.backends.base import MAX_STEP_CACHE, DenoiseJob, ModelSupport
from services.denoiser.sampling import SamplingCancelled
from videomesh import codec
from videomesh.errors import Cancelled, InvalidArgument, Unavailable
from videomesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc
from videomesh.weights import file_version

log = logging.getLogger("videomesh.denoiser")
SERVICE_NAME = denoiser_pb2.DESCRIPTOR.services_by_name["Denoiser"].full_name
_FLOATS = (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16)


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    """Serves one model backend through an executor; both are attached once loaded (until then the
    server's readiness gate answers UNAVAILABLE)."""

    def __init__(self, backend=None, executor=None):
        self.backend = None
        self.executor = None
        self.active = 0  # generations in flight (tests and metrics read it)
        self._active_lock = threading.Lock()
        if backend is not None:
            self.attach(backend, executor)

    def attach(self, backend, executor=None) -> None:
        """backend: a loaded ModelBackend (or a loaded DenoiserEngine: the default model)."""
        from services.denoiser.executors import LocalExecutor, as_backend

        self.backend = as_backend(backend)
        self.executor = executor or LocalExecutor(self.backend)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()

    def _model(self):
        if self.backend is None:
            raise Unavailable("the denoiser is still loading its model; retry shortly", retry_after=2.0,
                              reason="NOT_READY")  # fmt: skip
        return self.backend

    def _job(self, req: denoiser_pb2.DenoiseRequest, support: ModelSupport) -> DenoiseJob:
        for name in ("text_embeddings", "negative_embeddings"):
            codec.expect(getattr(req, name), name=name, dtypes=_FLOATS, ndim=3)
        for name in ("text_mask", "negative_mask"):
            codec.expect(getattr(req, name), name=name, dtypes=[common_pb2.DTYPE_BOOL], ndim=2)
        for name in ("num_frames", "height", "width", "num_steps"):
            if getattr(req, name) < 0:
                raise InvalidArgument(f"{name} must not be negative; got {getattr(req, name)}", field=name)
        if not (0 <= req.step_cache <= MAX_STEP_CACHE) or not math.isfinite(req.step_cache):
            raise InvalidArgument(f"step_cache must be in 0..{MAX_STEP_CACHE:g} (0 = off); got {req.step_cache}",
                                  field="step_cache")  # fmt: skip
        text = codec.to_torch(req.text_embeddings, name="text_embeddings")
        text_mask = codec.to_torch(req.text_mask, name="text_mask")
        negative = codec.to_torch(req.negative_embeddings, name="negative_embeddings")
        negative_mask = codec.to_torch(req.negative_mask, name="negative_mask")
        # an encoder's states are finite and mark at least one real token (BOS, EOS): NaN, inf or
        # an empty mask would come back as black frames with no word of why
        for name, t, m in (("text", text, text_mask), ("negative", negative, negative_mask)):
            if not bool(torch.isfinite(t.float()).all()):
                raise InvalidArgument(
                    f"{name}_embeddings: NaN or infinite values", field=f"{name}_embeddings.data"
                )
            if not bool(m.any()):
                raise InvalidArgument(f"{name}_mask: no token is marked real", field=f"{name}_mask.data")
        width, height = support.default_size
        return DenoiseJob(
            text=text,
            text_mask=text_mask,
            negative=negative,
            negative_mask=negative_mask,
            frames=req.num_frames or support.default_frames,
            height=req.height or height,
            width=req.width or width,
            seed=req.seed,
            steps=req.num_steps or support.default_steps,
            guidance=req.guidance_scale,
            adapter=req.adapter,
            adapter_strength=req.adapter_strength or 1.0,
            guidance_2=req.guidance_scale_2,
            # reserved for image-to-video: the backends refuse it until one serves it
            image=torch.empty(0, dtype=torch.uint8) if req.HasField("image") else None,
            step_cache=req.step_cache,
        )

    def Denoise(self, request, context):
        backend = self._model()
        executor = self.executor
        support = backend.supports()
        job = self._job(request, support)
        backend.check_request(job, request.encoder_model)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        context.add_callback(stop.set)  # client cancel, deadline or disconnect
        done = object()

        stats: dict = {}  # the executor's count of steps computed and reused (step caching)

        def on_step(step, total, expert, t):
            events.put(
                denoiser_pb2.DenoiseEvent(
                    progress=denoiser_pb2.StepProgress(step=step, total=total, expert=expert, sigma=t)
                )
            )

        def work():
            with self._active_lock:
                self.active += 1
            try:
                # frames come as the backend decodes them (Wan: one latent frame at a time), so the
                # upscaler downstream starts on the first frames while the last ones decode
                for frames in executor.stream(job, on_step=on_step, should_stop=stop.is_set, stats=stats):
                    events.put(frames)
            except BaseException as err:  # noqa: BLE001 - handed to the RPC thread
                events.put(err)
            finally:
                with self._active_lock:
                    self.active -= 1
                events.put(done)

        t0 = time.perf_counter()
        worker = threading.Thread(target=work, name=f"denoise-{request.request_id}", daemon=True)
        worker.start()
        sent = 0
        try:
            while True:
                item = events.get()
                if item is done:
                    break
                if isinstance(item, denoiser_pb2.DenoiseEvent):
                    yield item
                elif isinstance(item, SamplingCancelled):
                    raise Cancelled(f"denoising cancelled: {item}")
                elif isinstance(item, BaseException):
                    raise item
                else:
                    for chunk in codec.frame_chunks(item, start=sent):
                        yield denoiser_pb2.DenoiseEvent(frames=chunk)
                    sent += len(item)
            yield denoiser_pb2.DenoiseEvent(
                done=denoiser_pb2.DenoiseDone(
                    num_frames=sent,
                    fps=support.fps,
                    seconds=time.perf_counter() - t0,
                    steps_computed=stats.get("computed", job.steps),
                    steps_reused=stats.get("reused", 0),
                )
            )
        finally:
            stop.set()  # a consumer that went away stops the sampler at the next step

    def GetModelInfo(self, request, context):
        backend = self._model()
        s = backend.supports()
        engine = getattr(backend, "engine", None)  # the default model's: adapters, trained or not
        size = common_pb2.Size
        return denoiser_pb2.ModelInfo(
            name=s.name,
            version=s.version,
            sizes=[size(width=w, height=h) for w, h in s.sizes.official],
            frame_counts=list(s.frames.counts),
            fps=s.fps,
            languages=list(s.languages),
            default_steps=s.default_steps,
            default_guidance=s.experts[0].default_guidance,
            experts=[
                denoiser_pb2.ExpertInfo(
                    name=e.name,
                    boundary=e.boundary,
                    parameters=backend.parameters(e.name),
                    default_guidance=e.default_guidance,
                )
                for e in s.experts
            ],  # fmt: skip
            encoder_model=s.encoder,
            trained=engine.trained if engine is not None else True,
            max_steps=s.max_steps,
            # generations at once: the gateway sizes its slots from it
            capacity=getattr(self.executor, "capacity", 1),
            # the default model's adapters, or a backend's own (Wan: its LoRAs, wan_lora.py)
            adapters=self._adapters(engine)
            if engine is not None
            else [common_pb2.AdapterInfo(**a) for a in getattr(backend, "adapter_infos", list)()],
            backend=backend.kind,
            size_rule=denoiser_pb2.SizeRule(
                official=[size(width=w, height=h) for w, h in s.sizes.official],
                multiple=s.sizes.multiple,
                min_side=s.sizes.min_side,
                max_side=s.sizes.max_side,
                default_size=size(width=s.default_size[0], height=s.default_size[1]),
            ),
            frame_rule=denoiser_pb2.FrameRule(
                counts=list(s.frames.counts),
                step=s.frames.step,
                min_frames=s.frames.min_frames,
                max_frames=s.frames.max_frames,
                default_frames=s.default_frames,
            ),
            text_length=s.text_length,
            text_dim=s.text_dim,
            # the default model's frames are a base resolution the upscaler raises; Wan's come out at
            # the requested size
            upscale=backend.kind == "default",
        )

    @staticmethod
    def _adapters(engine) -> list[common_pb2.AdapterInfo]:
        out = []
        for name in engine.adapter_names():
            try:
                a = engine.adapter(name)
            except Exception as err:  # noqa: BLE001 - an unusable file is left out, not fatal
                log.warning("style adapter %s is installed but unusable: %s", name, err)
                continue
            try:
                version = file_version(engine.adapters_dir / f"{name}.safetensors")
            except OSError:  # removed meanwhile
                continue
            out.append(common_pb2.AdapterInfo(name=name, description=a.description, rank=a.rank,
                                                parameters=a.parameters(), version=version))  # fmt: skip
        return out


def registration(servicer: DenoiserServicer):
    return (denoiser_pb2_grpc.add_DenoiserServicer_to_server, servicer, SERVICE_NAME)
