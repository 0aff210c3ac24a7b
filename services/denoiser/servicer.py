"""gRPC adapter for the denoiser: validates, runs the engine on a worker thread, streams events."""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from services.denoiser.engine import DenoiseJob, DenoiserEngine
from services.denoiser.model import count_parameters
from services.denoiser.sampling import SamplingCancelled
from videomesh import codec
from videomesh.errors import Cancelled, InvalidArgument
from videomesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc
from videomesh.weights import file_version

log = logging.getLogger("videomesh.denoiser")
SERVICE_NAME = denoiser_pb2.DESCRIPTOR.services_by_name["Denoiser"].full_name
_FLOATS = (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16)


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, engine: DenoiserEngine, executor=None):
        from services.denoiser.executors import LocalExecutor

        self.engine = engine
        self.executor = executor or LocalExecutor(engine)
        self.active = 0  # generations in flight (tests and metrics read it)
        self._active_lock = threading.Lock()

    def _job(self, req: denoiser_pb2.DenoiseRequest) -> DenoiseJob:
        cfg = self.engine.cfg
        for name in ("text_embeddings", "negative_embeddings"):
            codec.expect(getattr(req, name), name=name, dtypes=_FLOATS, ndim=3)
        for name in ("text_mask", "negative_mask"):
            codec.expect(getattr(req, name), name=name, dtypes=[common_pb2.DTYPE_BOOL], ndim=2)
        for name in ("num_frames", "height", "width", "num_steps"):
            if getattr(req, name) < 0:
                raise InvalidArgument(f"{name} must not be negative; got {getattr(req, name)}", field=name)
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
        return DenoiseJob(
            text=text,
            text_mask=text_mask,
            negative=negative,
            negative_mask=negative_mask,
            frames=req.num_frames or cfg.frames,
            height=req.height or cfg.height,
            width=req.width or cfg.width,
            seed=req.seed,
            steps=req.num_steps or cfg.steps,
            guidance=req.guidance_scale,
            adapter=req.adapter,
            adapter_strength=req.adapter_strength or 1.0,
        )

    def Denoise(self, request, context):
        job = self._job(request)
        self.engine.check(job, request.encoder_model)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        context.add_callback(stop.set)  # client cancel, deadline or disconnect
        done = object()

        def on_step(step, total, expert, t):
            events.put(
                denoiser_pb2.DenoiseEvent(
                    progress=denoiser_pb2.StepProgress(step=step, total=total, expert=expert, sigma=t)
                )
            )

        def work():
            with self._active_lock:
                self.active += 1
            t0 = time.perf_counter()
            try:
                frames = self.executor.run(job, on_step=on_step, should_stop=stop.is_set)
                events.put((frames, time.perf_counter() - t0))
            except BaseException as err:  # noqa: BLE001 - handed to the RPC thread
                events.put(err)
            finally:
                with self._active_lock:
                    self.active -= 1
                events.put(done)

        worker = threading.Thread(target=work, name=f"denoise-{request.request_id}", daemon=True)
        worker.start()
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
                    frames, seconds = item
                    for chunk in codec.frame_chunks(frames):
                        yield denoiser_pb2.DenoiseEvent(frames=chunk)
                    yield denoiser_pb2.DenoiseEvent(
                        done=denoiser_pb2.DenoiseDone(
                            num_frames=len(frames), fps=self.engine.cfg.fps, seconds=seconds
                        )
                    )
        finally:
            stop.set()  # a consumer that went away stops the sampler at the next step

    def GetModelInfo(self, request, context):
        e = self.engine
        cfg = e.cfg
        params = count_parameters(e.model.experts["high_noise"]) if e.model is not None else 0
        return denoiser_pb2.ModelInfo(
            name=cfg.name,
            version=e.version,
            sizes=[common_pb2.Size(width=cfg.width, height=cfg.height)],
            frame_counts=[cfg.frames],
            fps=cfg.fps,
            languages=list(cfg.languages),
            default_steps=cfg.steps,
            default_guidance=cfg.guidance_high,
            experts=[
                denoiser_pb2.ExpertInfo(name="high_noise", boundary=cfg.boundary, parameters=params),
                denoiser_pb2.ExpertInfo(name="low_noise", boundary=cfg.boundary, parameters=params),
            ],
            encoder_model=e.encoder_model,
            trained=e.trained,
            max_steps=cfg.max_steps,
            capacity=getattr(
                self.executor, "capacity", 1
            ),  # generations at once: the gateway sizes its slots from it
            adapters=self._adapters(),
        )

    def _adapters(self) -> list[common_pb2.AdapterInfo]:
        out = []
        for name in self.engine.adapter_names():
            try:
                a = self.engine.adapter(name)
            except Exception as err:  # noqa: BLE001 - an unusable file is left out, not fatal
                log.warning("style adapter %s is installed but unusable: %s", name, err)
                continue
            try:
                version = file_version(self.engine.adapters_dir / f"{name}.safetensors")
            except OSError:  # removed meanwhile
                continue
            out.append(common_pb2.AdapterInfo(name=name, description=a.description, rank=a.rank,
                                                parameters=a.parameters(), version=version))  # fmt: skip
        return out


def registration(servicer: DenoiserServicer):
    return (denoiser_pb2_grpc.add_DenoiserServicer_to_server, servicer, SERVICE_NAME)
