"""The `videomesh` command: up, generate, watch, demo, health, serve, tenants, review, verify, usage.

These names and options are a contract other tools depend on; keep them stable.

Exit codes (see EXIT_* below, README "The CLI"): 0 done; 1 the job failed or was cancelled, a
call failed, the gateway did not answer, or `up` gave up restarting a service; 2 a usage error
(a bad flag or value, an unreadable file, no gateway address known); 3 `verify` found no
watermark; 4 the video was held for review (NEEDS_REVIEW: the file is written all the same;
`--accept-review` makes this 0); 130 interrupted (Ctrl-C; `generate` cancels its job first).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import grpc

from videomesh.client import DEFAULT_DATA_DIR, GatewayNotConfigured, GatewayUnreachable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_WATERMARK = 3
EXIT_NEEDS_REVIEW = 4
EXIT_INTERRUPTED = 130

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
CONNECT_TIMEOUT = 3.0  # seconds to wait for the gateway to accept a connection
REATTACH_TRIES = 10  # `generate`/`watch`: re-attach this many times after the stream breaks
REATTACH_MAX_DELAY = 10.0  # 0.5, 1, 2, 4, 8, 10, 10, … s between tries
CREATE_TRIES = 4  # CreateVideo (idempotent through request_id) on UNAVAILABLE

# what the user typed, for the proto fields the gateway names in its errors
FIELD_FLAGS = {
    "spec.negative_prompt": "--negative",
    "spec.style": "--style",
    "spec.width": "--size",
    "spec.height": "--size",
    "spec.fps": "--fps",
    "spec.duration_seconds": "--duration",
    "spec.seed": "--seed",
    "spec.num_steps": "--steps",
    "spec.guidance_scale": "--guidance",
    "spec.guidance_scale_2": "--guidance-2",
    "spec.num_frames": "--frames",
    "spec.style_adapter": "--adapter",
    "spec.style_strength": "--adapter-strength",
    "spec.step_cache": "--step-cache",
}
_WORDS = {
    "num_steps": "--steps",
    "num_frames": "--frames",
    "guidance_scale_2": "--guidance-2",
    "guidance_scale": "--guidance",
    "style_strength": "--adapter-strength",
    "style_adapter": "--adapter",
    "negative_prompt": "--negative",
    "duration_seconds": "--duration",
    "step_cache": "--step-cache",
}
_WORDS_RE = re.compile(r"\b(?:spec\.)?(" + "|".join(_WORDS) + r")\b")


class UsageError(Exception):
    """A bad flag or value: one line on stderr, exit 2, before any call to the gateway."""


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _user_words(text: str) -> str:
    """Proto field names -> the flags the user typed (num_steps -> --steps, …)."""
    return _WORDS_RE.sub(lambda m: _WORDS[m.group(1)], text or "")


def _rpc_err(e: grpc.RpcError) -> None:
    """Print a call's error once, in the user's words: one line per field violation, else the status."""
    from videomesh.errors import details_of

    info = details_of(e)
    code = e.code().name if e.code() else "UNKNOWN"
    lines: list[str] = []
    for field, desc in info.get("violations", []):
        line = _user_words(desc)
        flag = FIELD_FLAGS.get(field)
        if flag and not line.startswith(flag):
            line = f"{flag}: {line}"
        if line not in lines:
            lines.append(line)
    if not lines:
        msg = _user_words(e.details() or "")
        lines = [f"{code}: {msg}" if msg else code]
    reason = info.get("reason", "")
    if reason and reason not in (code, "INTERNAL") and reason not in lines[0]:
        lines[0] += f" ({reason})"
    if info.get("retry_after"):
        lines[-1] += f"; try again in {info['retry_after']:g} s"
    if code == "UNAUTHENTICATED":
        lines[-1] += " (give --api-key, set $VIDEOMESH_API_KEY, or use the dev key `videomesh up` saves)"
    for line in lines:
        _err(line)


def _retry_after(e: grpc.RpcError) -> float | None:
    from videomesh.errors import details_of

    return details_of(e).get("retry_after")


def _number(flag: str, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number; got {value}")
    return value


def _spec(args):
    """The VideoSpec for the flags; UsageError (naming the flag) for values no request can carry."""
    from videomesh.v1 import common_pb2

    spec = common_pb2.VideoSpec(
        prompt=args.prompt, negative_prompt=args.negative or "", style=args.style or ""
    )
    if args.seed is not None:
        if not 0 <= args.seed <= INT64_MAX:
            raise UsageError(
                f"--seed must be a whole number from 0 to {INT64_MAX} (2**63-1); got {args.seed}"
            )
        spec.seed = args.seed
    if args.adapter:
        spec.style_adapter = args.adapter
    if _number("--adapter-strength", args.adapter_strength):
        spec.style_strength = args.adapter_strength
    if _number("--duration", args.duration):
        spec.duration_seconds = args.duration
    if _number("--fps", args.fps):
        spec.fps = args.fps
    if args.size:
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", args.size)
        if not m or not (0 < int(m[1]) <= INT32_MAX and 0 < int(m[2]) <= INT32_MAX):
            raise UsageError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 256x256; got {args.size!r}")
        spec.width, spec.height = int(m[1]), int(m[2])
    if args.steps is not None:
        if args.steps < 0:
            raise UsageError(f"--steps must be at least 1 (0 = the model's default); got {args.steps}")
        if args.steps > INT32_MAX:
            raise UsageError(
                f"--steps must be at most {INT32_MAX} (the model allows far fewer); got {args.steps}"
            )
        spec.num_steps = args.steps
    if _number("--guidance", args.guidance):
        spec.guidance_scale = args.guidance
    if _number("--guidance-2", args.guidance_2):
        spec.guidance_scale_2 = args.guidance_2
    if args.frames is not None:
        if not 0 <= args.frames <= INT32_MAX:
            raise UsageError(
                f"--frames must be a whole number of frames (0 = the model's default); got {args.frames}"
            )
        spec.num_frames = args.frames
    if args.step_cache is not None:
        _number("--step-cache", args.step_cache)
        spec.step_cache = args.step_cache
    return spec


def _client(args):
    """A VideoClient for --gateway / $VIDEOMESH_GATEWAY / the address `up` saved, checked to answer."""
    from videomesh.client import VideoClient

    try:
        client = VideoClient(getattr(args, "gateway", None), api_key=getattr(args, "api_key", None),
                             ca=getattr(args, "ca", None), tls=getattr(args, "tls", False))  # fmt: skip
    except ValueError as e:  # an unreadable --ca
        raise UsageError(str(e)) from None
    try:
        client.wait_ready(CONNECT_TIMEOUT)
    except BaseException:
        client.close()
        raise
    return client


def _progress(quiet: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(), transient=False, disable=quiet,
    )  # fmt: skip


def _stage_name(stage: int) -> str:
    from videomesh.v1 import common_pb2

    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower().replace("_", " ")


class _Watcher:
    """Follows one job's events to its end, re-attaching after the last event seen when the
    stream breaks (UNAVAILABLE: the gateway restarting, a network blip)."""

    def __init__(self, client, video_id: str, args):
        self.client = client
        self.id = video_id
        self.timeout = getattr(args, "timeout", None)
        self.quiet = getattr(args, "quiet", False)
        self.last = 0  # sequence of the last event seen
        self.warned: set[str] = set()
        self.finished = False  # the job reached a terminal state
        self.timed_out = False  # --timeout passed first

    def warn(self, message: str) -> None:
        message = _user_words(message)
        if message and message not in self.warned:
            self.warned.add(message)
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def run(self):
        """-> (exit code, the finished Video or None)."""
        deadline = time.monotonic() + self.timeout if self.timeout else None
        tries = 0
        with _progress(self.quiet) as bar:
            task = bar.add_task("queued", total=100)
            while True:
                left = None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._timed_out()
                try:
                    for ev in self.client.watch(self.id, after=self.last, timeout=left):
                        self.last = max(self.last, ev.sequence)
                        tries = 0
                        done = self._event(ev, bar, task)
                        if done is not None:
                            return done
                    done = self._terminal(self.client.get(self.id))
                    if done is not None:
                        return done
                    why, wait = "the event stream ended before the job did", None
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                        return self._timed_out()
                    wait = _retry_after(e) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                    if e.code() != grpc.StatusCode.UNAVAILABLE and wait is None:
                        _rpc_err(e)
                        return EXIT_FAILED, None
                    lost = "connection lost" if wait is None else "the gateway refused the stream"
                    why = f"{lost} ({e.code().name}: {_user_words(e.details())})"
                tries += 1
                if tries > REATTACH_TRIES:
                    _err(f"{why}; gave up re-attaching after {REATTACH_TRIES} tries. "
                         f"The job may still be running: `videomesh watch {self.id}`")  # fmt: skip
                    return EXIT_FAILED, None
                delay = wait if wait is not None else min(REATTACH_MAX_DELAY, 0.5 * 2 ** (tries - 1))
                print(f"{why}; re-attaching to {self.id} after event {self.last} in {delay:g} s "
                      f"(try {tries} of {REATTACH_TRIES})", file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(delay)

    def _timed_out(self):
        self.timed_out = True  # the caller says what it does about it (generate cancels, watch leaves it)
        return EXIT_FAILED, None

    def _event(self, ev, bar, task):
        kind = ev.WhichOneof("event")
        if kind == "queued":
            bar.update(task, description=f"queued #{ev.queued.position}")
        elif kind == "stage_started":
            bar.update(task, description=_stage_name(ev.stage_started.stage))
        elif kind == "progress":
            bar.update(task, completed=ev.progress.percent)
        elif kind == "warning":
            self.warn(ev.warning.message or ev.warning.reason)
        elif kind == "completed":
            bar.update(task, completed=100, description="done")
            self.finished = True
            return EXIT_OK, ev.completed.video
        elif kind == "failed":
            self.finished = True
            err = ev.failed.error
            _err(
                f"video {self.id} failed: {_user_words(err.message)}"
                + (f" ({err.reason})" if err.reason else "")
            )
            return EXIT_FAILED, None
        elif kind == "cancelled":
            self.finished = True
            _err(f"video {self.id} was cancelled")
            return EXIT_FAILED, None
        return None

    def _terminal(self, video):
        from videomesh.v1 import common_pb2

        if video.status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW):
            self.finished = True
            return EXIT_OK, video
        if video.status == common_pb2.FAILED:
            self.finished = True
            _err(f"video {self.id} failed: {_user_words(video.error.message)}"
                 + (f" ({video.error.reason})" if video.error.reason else ""))  # fmt: skip
            return EXIT_FAILED, None
        if video.status == common_pb2.CANCELLED:
            self.finished = True
            _err(f"video {self.id} was cancelled")
            return EXIT_FAILED, None
        return None


def _deliver(client, video_id: str, out: Path | None, args, watcher: _Watcher) -> int:
    """Download the finished video (when `out`), print what it is, and the exit code for its status."""
    from videomesh.client import DownloadError
    from videomesh.v1 import common_pb2

    try:
        if out is not None:
            try:
                client.download(video_id, out)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    _err(f"this gateway cannot send files (no DownloadVideo: an older version); video {video_id} "
                         "is in its storage")  # fmt: skip
                    return EXIT_FAILED
                raise
        video = client.get(video_id)
    except DownloadError as e:
        _err(f"download failed, nothing written: {e}")
        return EXIT_FAILED
    except grpc.RpcError as e:
        _rpc_err(e)
        return EXIT_FAILED
    for w in video.warnings:
        watcher.warn(w)
    r = video.result
    print(f"video {video.id}: {r.width}x{r.height}, {r.num_frames} frames at {r.fps:g} fps, sha256 {r.sha256[:16]}…"
          + (" (from the result cache)" if video.cached else ""), flush=True)  # fmt: skip
    if out is not None:
        print(f"wrote {out.resolve()}", flush=True)
    if video.status == common_pb2.NEEDS_REVIEW:
        failed = "; ".join(f"{c.name} ({c.detail})" for c in video.quality.checks if not c.passed)
        what = f"the quality gate held {video.id} for review" + (f": {failed}" if failed else "")
        if getattr(args, "accept_review", False):
            print(f"warning: {what} (accepted: --accept-review)", file=sys.stderr, flush=True)
            return EXIT_OK
        look = f"look at {out}, then " if out is not None else ""
        print(f"held for review: {what}. {look}approve it with `videomesh review {video.id} --approve` "
              f"(or pass --accept-review); exit code {EXIT_NEEDS_REVIEW}", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_NEEDS_REVIEW
    return EXIT_OK


def _create(client, spec, request_id: str):
    """CreateVideo, tried again on UNAVAILABLE (the same request_id makes that safe)."""
    for attempt in range(1, CREATE_TRIES + 1):
        try:
            return client.create(spec, request_id=request_id, timeout=30)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == CREATE_TRIES:
                raise
            delay = 2.0 ** (attempt - 1)
            print(f"the gateway is unavailable ({e.details()}); trying again in {delay:g} s", file=sys.stderr,
                  flush=True)  # fmt: skip
            time.sleep(delay)


def generate(client, spec, args) -> int:
    """Create the job, print its id, follow it to the end, download it to --out."""
    from videomesh.v1 import common_pb2

    out = Path(args.out)
    vid = ""
    watcher = None
    try:
        try:
            video = _create(client, spec, uuid.uuid4().hex)
        except grpc.RpcError as e:
            _rpc_err(e)
            return EXIT_FAILED
        vid = video.id
        status = common_pb2.VideoStatus.Name(video.status).lower()
        print(f"video {vid} {status}" + (" (from the result cache)" if video.cached else ""), flush=True)
        watcher = _Watcher(client, vid, args)
        for w in video.warnings:
            watcher.warn(w)
        rc, done = watcher.run()
        if watcher.timed_out:
            _err(f"no result within --timeout {args.timeout:g} s")
            _cancel(client, vid)
        if done is None:
            return rc
        return _deliver(client, vid, out, args, watcher)
    except KeyboardInterrupt:
        if not vid:
            print("cancelled", file=sys.stderr, flush=True)
        elif watcher is not None and watcher.finished:
            print(f"interrupted; video {vid} is finished: `videomesh watch {vid} --out FILE` fetches it",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            _cancel(client, vid)
        return EXIT_INTERRUPTED


def _cancel(client, vid: str) -> None:
    """CancelVideo, then `cancelled vid_…` (the job is this command's: nobody else waits for it)."""
    try:
        client.cancel(vid, timeout=5)
        print(f"cancelled {vid}", file=sys.stderr, flush=True)
    except grpc.RpcError as e:
        print(f"could not cancel {vid} ({e.code().name}: {e.details()}); it may still run",
              file=sys.stderr, flush=True)  # fmt: skip


def cmd_generate(args) -> int:
    spec = _spec(args)
    client = _client(args)
    try:
        return generate(client, spec, args)
    finally:
        client.close()


def cmd_watch(args) -> int:
    client = _client(args)
    out = Path(args.out) if args.out else None
    watcher = _Watcher(client, args.id, args)
    try:
        rc, done = watcher.run()
        if watcher.timed_out:
            _err(
                f"no result within --timeout {args.timeout:g} s; {args.id} goes on: `videomesh watch {args.id}`"
            )
        if done is None:
            return rc
        return _deliver(client, args.id, out, args, watcher)
    except KeyboardInterrupt:
        print(f"detached from {args.id}; it keeps running (`videomesh watch {args.id}` re-attaches)",
              file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        client.close()


def model_args(model: str, model_dir: str | None) -> dict[str, list[str]]:
    """The encoder's and denoiser's extra arguments for `up --model M --model-dir DIR`; UsageError for a
    directory that cannot be served (checked here, before any process starts)."""
    if model == "default":
        if model_dir:
            raise UsageError("--model-dir is for --model wan2.2 (the default model is built in)")
        return {}
    if not model_dir:
        raise UsageError(f"--model {model} needs --model-dir DIR: the downloaded diffusers-layout directory, "
                         "e.g. `hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers --local-dir DIR`")  # fmt: skip
    from videomesh.model_dir import ModelDirError, WanModelDir

    path = Path(model_dir).expanduser().resolve()
    try:
        d = WanModelDir.open(path)
        d.require("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
        if d.two_experts:
            d.require("transformer_2")
    except ModelDirError as e:
        raise UsageError(f"--model-dir: {e}") from None
    extra = ["--model", model, "--model-dir", str(path)]
    return {"encoder": list(extra), "denoiser": list(extra)}


def cmd_up(args) -> int:
    from gateway.jobs import is_postgres
    from videomesh.mesh import LocalMesh

    extra = model_args(args.model, args.model_dir)
    database = args.database or os.environ.get("VIDEOMESH_GATEWAY_DATABASE", "")
    if args.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    if args.replicas > 1 and not is_postgres(database):
        raise UsageError("--replicas N (N > 1) needs --database postgresql://…: the replicas share their jobs, queue "
                         "and limits there (SQLite belongs to one process)")  # fmt: skip
    mesh = LocalMesh(Path(args.data_dir), port=args.port or 0, max_restarts=args.max_restarts,
                     restart_window=args.restart_window, extra_args=extra, replicas=args.replicas,
                     database=database, tls_self_signed=args.tls_self_signed)  # fmt: skip
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        mesh.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # a real Wan directory loads tens of GB of weights before its services say SERVING
        address = mesh.start(timeout=180.0 if args.model == "default" else 1800.0)
    except Exception as e:  # noqa: BLE001
        if stop.is_set():
            print("stopped during start-up", flush=True)
            return EXIT_OK
        _err(f"start-up failed: {e}")
        return EXIT_FAILED
    try:
        saved = mesh.publish_address()
        print(f"gateway listening on {address}", flush=True)
        for n, a in mesh.addresses.items():
            if not n.startswith("gateway"):
                print(f"  {n:<9} {a} (pid {mesh.procs[n].pid})", flush=True)
        for g in mesh.gateways:
            print(f"  {g:<9} {mesh.addresses[g]} (pid {mesh.procs[g].pid})", flush=True)
        if len(mesh.gateways) > 1:
            print(f"{len(mesh.gateways)} gateway replicas share the database; `generate`/`watch` work against any "
                  f"(--gateway ADDRESS); clients spread over them with gRPC round_robin: "
                  f"ipv4:{','.join(mesh.addresses[g] for g in mesh.gateways)}",
                  flush=True)  # fmt: skip
        print(
            f"address saved in {saved[0]} and {saved[1]}: other commands find it without --gateway",
            flush=True,
        )
        if mesh.tls_cert is not None:
            print(f"TLS on the gateway port, self-signed: certificate {mesh.tls_cert} (other commands on this "
                  f"machine use it; elsewhere pass --ca {mesh.tls_cert})", flush=True)  # fmt: skip
        print(
            f"dev tenant key in {Path(args.data_dir).resolve() / 'dev-api-key'}; a service that exits is restarted; "
            "Ctrl-C stops everything",
            flush=True,
        )
        rc = mesh.supervise(stop, log=lambda m: print(m, flush=True))
    finally:
        print("stopping…", flush=True)
        mesh.stop()
    return EXIT_OK if rc == 0 else EXIT_FAILED


def cmd_demo(args) -> int:
    from videomesh.client import VideoClient
    from videomesh.mesh import LocalMesh

    spec = _spec(args)
    print("starting the mesh (encoder, denoiser, upscaler, qc, gateway)…", flush=True)
    mesh = LocalMesh(Path(args.data_dir))
    try:
        address = mesh.start()
        print(f"gateway on {address}", flush=True)
        with VideoClient(address, api_key=args.api_key) as client:
            return generate(client, spec, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001
        _err(str(e))
        return EXIT_FAILED
    finally:
        mesh.stop()


def cmd_health(args) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from videomesh.client import channel, find_gateway, gateway_file, wait_ready
    from videomesh.mesh import SERVICE_NAMES
    from videomesh.tls import find_root_certificates

    address, source = find_gateway(args.gateway)
    try:
        roots = find_root_certificates(args.ca, args.tls, saved=source.startswith(str(gateway_file())))
    except ValueError as e:
        raise UsageError(str(e)) from None
    bad = 0
    with channel(address, root_certificates=roots) as ch:
        wait_ready(ch, address, source, min(CONNECT_TIMEOUT, args.timeout))
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("gateway", "encoder", "denoiser", "upscaler", "qc"):
            try:
                st = stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]), timeout=args.timeout
                ).status
                label = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
            except grpc.RpcError as e:
                st, label = 0, f"UNREACHABLE ({e.code().name})"
            bad += st != health_pb2.HealthCheckResponse.SERVING
            print(f"{name:<9} {label}")
    return EXIT_FAILED if bad else EXIT_OK


def cmd_serve(args, rest) -> int:
    from videomesh.launch import main as launch_main

    launch_main(args.name, rest)
    return EXIT_OK


def cmd_review(args) -> int:
    from videomesh.v1 import common_pb2

    with _client(args) as c:
        try:
            if args.decision is None:
                v = c.get(args.id)
            else:
                v = c.review(args.id, args.decision == "approve", args.note or "")
        except grpc.RpcError as e:
            _rpc_err(e)
            return EXIT_FAILED
    print(f"{v.id}: {common_pb2.VideoStatus.Name(v.status)}")
    for ch in v.quality.checks:
        ranges = ", ".join(f"{r.start}-{r.end - 1}" for r in ch.frames)
        print(
            f"  {'ok  ' if ch.passed else 'FAIL'} {ch.name:<13} {ch.detail}{f' (frames {ranges})' if ranges else ''}"
        )
    return EXIT_OK


def _readable_file(name: str) -> Path:
    p = Path(name)
    try:
        with open(p, "rb") as f:
            first = f.read(1)
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{name} is a directory, not a video file") from None
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror or e}") from None
    if not first:
        raise UsageError(f"{name} is empty")
    return p


def cmd_verify(args) -> int:
    path = _readable_file(args.file)  # before any call
    with _client(args) as c:
        try:
            r = c.verify_watermark(path)
        except grpc.RpcError as e:
            _rpc_err(e)
            return EXIT_FAILED
    if not r.present:
        print(f"no videomesh watermark found ({r.frames} frames read)")
        return EXIT_NO_WATERMARK
    print(
        f"watermark {r.payload} (confidence {r.confidence:.2f}, {r.frames} frames)"
        + (f": video {r.video_id}" if r.video_id else "")
    )
    return EXIT_OK


def cmd_usage(args) -> int:
    with _client(args) as c:
        try:
            u = c.usage()
            tpl = c.templates() if args.templates else []
            adapters = c.style_adapters() if args.adapters else []
        except grpc.RpcError as e:
            _rpc_err(e)
            return EXIT_FAILED
    print(f"tenant {u.tenant}")
    print("  jobs: " + (", ".join(f"{k.lower()} {v}" for k, v in sorted(u.jobs.items())) or "none"))
    print(
        f"  output: {u.output_seconds:.1f} s of video; cache hits {u.cache_hits}; refused prompts {u.blocked_prompts}"
    )
    print(
        "  compute: " + (", ".join(f"{k} {v:.1f} s" for k, v in sorted(u.compute_seconds.items())) or "none")
    )
    for t in tpl:
        fields = ", ".join(f.name + (f" [{'|'.join(f.choices)}]" if f.choices else "") for f in t.fields)
        print(f"template {t.id}: {t.name} — {fields}")
    for a in adapters:
        print(f"style adapter {a.name}: {a.description}")
    if args.adapters and not adapters:
        print("no style adapters installed for you")
    return EXIT_OK


def tier_names() -> list[str]:
    """The tiers a tenant may have: the defaults and any [gateway.tiers] in $VIDEOMESH_CONFIG."""
    from gateway.tiers import DEFAULT_TIERS

    names = list(DEFAULT_TIERS)
    file = os.environ.get("VIDEOMESH_CONFIG")
    if file:
        try:
            extra = tomllib.loads(Path(file).read_text()).get("gateway", {}).get("tiers", {})
        except (OSError, tomllib.TOMLDecodeError):
            extra = {}
        names += [n for n in extra if n not in names]
    return names


def _gateway_database() -> str:
    """The database the gateway's own settings name ($VIDEOMESH_GATEWAY_DATABASE or its _FILE, or
    VIDEOMESH_CONFIG): so `videomesh tenants` run beside a gateway (kubectl exec) edits the keys it reads."""
    from gateway.gateway import GatewaySettings
    from videomesh import config

    try:
        return config.load(GatewaySettings, "VIDEOMESH_GATEWAY_", validate=False).database
    except (ValueError, OSError) as err:
        raise UsageError(
            f"the gateway's settings (to find its database; or pass --database): {err}"
        ) from None


def cmd_tenants(args) -> int:
    from gateway.jobs import is_postgres
    from gateway.tenants import key_active, open_tenants
    from videomesh.errors import VideomeshError

    database = args.database if args.database is not None else _gateway_database()
    postgres = is_postgres(database)
    path = Path(args.data_dir) / "tenants.json"
    if args.action == "import" and not postgres:
        raise UsageError("tenants import FILE copies a tenants.json into the gateways' PostgreSQL: give --database "
                         "URL (or run it where VIDEOMESH_GATEWAY_DATABASE is set)")  # fmt: skip
    if args.action not in ("add", "import") and not postgres and not path.exists():
        _err(f"no tenants file at {path.resolve()}; `videomesh up --data-dir DIR` or `videomesh tenants add NAME "
             f"--data-dir DIR` creates one (give the same --data-dir here; or --database URL for the gateways' "
             f"PostgreSQL)")  # fmt: skip
        return EXIT_FAILED
    try:  # never an import by the way: `tenants import` says which file, and only into the database named
        d = open_tenants(Path(args.data_dir), database if postgres else "", import_file=False)
    except VideomeshError as e:
        _err(e.message)
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - psycopg's connection errors: say which database, not a traceback
        first = (str(e).strip().splitlines() or [repr(e)])[0]
        _err(f"cannot open the tenants in {_redact(database)}: {_redact_text(first, database)}")
        return EXIT_FAILED
    try:
        if args.action == "add":
            tiers = tier_names()
            if args.tier is not None and args.tier not in tiers:
                raise UsageError(f"unknown tier {args.tier!r}; choose one of {', '.join(tiers)}")
            if args.webhook:  # the same URL rules the gateway applies (http(s), length, no credentials)
                from gateway.webhooks import WebhookRefused, parse_url

                try:
                    parse_url(args.webhook)
                except WebhookRefused as e:
                    raise UsageError(f"--webhook: {e}") from None
            old = d.find(args.name)
            if old is not None and not args.force:
                _err(f"tenant {args.name!r} already exists (tier {old.tier}, {d.active_keys(args.name)} active "
                     f"key(s)); --force adds another key (and applies --tier/--webhook), `videomesh tenants rotate "
                     f"{args.name}` replaces its keys")  # fmt: skip
                return EXIT_FAILED
            tier = args.tier or (old.tier if old else "free")
            before = d.active_keys(args.name)
            key = d.add(args.name, tier, args.webhook or "", tiers=tiers)
            if old is None:
                print(f"added tenant {args.name} (tier {tier}); its API key:", file=sys.stderr)
            else:
                changes = [f"tier {old.tier} -> {tier}" if old.tier != tier else f"tier {tier} (unchanged)"]
                if args.webhook and args.webhook != old.webhook_url:
                    changes.append(f"webhook {old.webhook_url or '(none)'} -> {args.webhook}")
                changes.append(f"a new key added ({before} earlier key(s) still work)")
                print(f"updated tenant {args.name}: {'; '.join(changes)}; the new key:", file=sys.stderr)
            print(key)
            if args.webhook:
                print(f"webhook secret: {d.get(args.name).webhook_secret}", file=sys.stderr)
        elif args.action == "list":
            for t, keys in d.list():
                active = sum(key_active(k) for k in keys)
                print(f"{t.name:<20} {t.tier:<10} keys: {active} active, {len(keys) - active} revoked")
        elif args.action == "revoke":
            print(f"revoked {d.revoke(args.name)} key(s)")
        elif args.action == "rotate":
            print(d.rotate(args.name, grace=args.grace))
            if args.grace:
                print(f"the tenant's earlier keys keep working for {args.grace:g} s more", file=sys.stderr)
        elif args.action == "import":
            try:
                tenants, keys = d.import_file(Path(args.name))
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(
                    f"tenants import: {args.name} is not a readable tenants.json ({e})"
                ) from None
            print(f"imported {tenants} tenant(s) and {keys} key(s) from {args.name} (a tenant the database "
                  f"had already is left as it is)")  # fmt: skip
    except VideomeshError as e:
        _err(e.message)
        return EXIT_FAILED
    finally:
        d.close()
    return EXIT_OK


def _passwords(url: str) -> list[str]:
    """The password a database URL carries (user:PASSWORD@ or ?password=), as written and decoded."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    u = urlsplit(url)
    found = [u.password] if u.password else []
    found += [v for k, v in parse_qsl(u.query) if k == "password" and v]
    return [p for w in found for p in {w, unquote(w)} if p]


def _redact_text(text: str, url: str) -> str:
    for p in _passwords(url):
        text = text.replace(p, "***")
    return text


def _redact(url: str) -> str:
    """A database URL without its password."""
    return _redact_text(url, url)


EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 the job failed or was cancelled, a call failed or the gateway did not answer; "
    "2 bad flags or values; 4 the video was held for review (written all the same; --accept-review makes it 0); "
    "130 Ctrl-C"
)
GATEWAY_HELP = "HOST:PORT (default: $VIDEOMESH_GATEWAY, else the address `videomesh up` saved)"
API_KEY_HELP = "default: $VIDEOMESH_API_KEY or the dev key `videomesh up` saved"


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--out", "-o", default="clip.mp4", help="where to write the MP4 (default clip.mp4)")
    p.add_argument("--seed", type=int, help=f"0..{INT64_MAX} (default: random, recorded in the job)")
    p.add_argument("--duration", type=float, help="seconds (default: the model's clip length)")
    p.add_argument(
        "--fps", type=float, help="frames per second, e.g. 24, 12 or 8 (wan2.2: 16, or 24 interpolated)"
    )
    p.add_argument(
        "--size", help="WIDTHxHEIGHT, e.g. 256x256 (wan2.2: 1280x720, 832x480, any multiple of 16)"
    )
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--style", help="style word, e.g. documentary")
    p.add_argument(
        "--adapter",
        help="brand style adapter (LoRA), e.g. brand-banner; `videomesh usage --adapters` lists yours",
    )
    p.add_argument("--adapter-strength", type=float, help="0..2 (default 1)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale, 0..30 (default: the model's)"
    )
    p.add_argument(
        "--guidance-2", type=float,
        help="the low-noise expert's guidance scale (two-expert models such as wan2.2; default: --guidance)",
    )  # fmt: skip
    p.add_argument(
        "--frames", type=int,
        help="frames the model generates, e.g. 81 for wan2.2 (4k+1); default: from --duration, else the model's",
    )  # fmt: skip
    p.add_argument(
        "--step-cache", type=float,
        help="step caching: reuse a denoising step's prediction while the model's input changed less than this "
             "(0..1, e.g. 0.1: faster, slightly different frames; 0 = off; default: your tier's)",
    )  # fmt: skip
    p.add_argument("--api-key", help=API_KEY_HELP)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="cancel the job if it has not ended after this many seconds",
    )
    p.add_argument(
        "--accept-review",
        action="store_true",
        help=f"exit 0 when the quality gate holds the video for review (default: exit {EXIT_NEEDS_REVIEW})",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", help=GATEWAY_HELP)
    p.add_argument("--ca", help="TLS: verify the gateway against this CA (PEM file; env VIDEOMESH_CA); the "
                                "address `up --tls-self-signed` saved comes with its own")  # fmt: skip
    p.add_argument("--tls", action="store_true",
                   help="TLS, verifying the gateway against the system's roots (env VIDEOMESH_TLS=1)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="videomesh", description="Text-to-video through a mesh of gRPC services.",
        epilog=EXIT_CODES_HELP,
    )  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser(
        "up", help="start every service locally on loopback, restart any that exits, until Ctrl-C",
        epilog="exit codes: 0 stopped by SIGINT/SIGTERM; 1 start-up failed or a service kept exiting",
    )  # fmt: skip
    up.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help=f"jobs, keys, videos, logs (default {DEFAULT_DATA_DIR})"
    )
    up.add_argument("--port", type=int, default=0,
                    help="gateway port; with --replicas N the gateways take P … P+N-1 (default: free ports)")  # fmt: skip
    up.add_argument("--database", default=None,
                    help="the gateways' job store: postgresql://user:pass@host/db (shared; needed for --replicas) "
                         "or a SQLite file (default: DATA_DIR/jobs.sqlite3; env VIDEOMESH_GATEWAY_DATABASE)")  # fmt: skip
    up.add_argument("--replicas", type=int, default=1,
                    help="gateway processes sharing --database and the data dir's storage (default 1)")  # fmt: skip
    up.add_argument("--max-restarts", type=int, default=5,
                    help="give up (stop everything, exit 1) when one service needs more restarts than this "
                         "within --restart-window (default 5)")  # fmt: skip
    up.add_argument("--restart-window", type=float, default=300.0, help="seconds (default 300)")
    up.add_argument("--tls-self-signed", action="store_true",
                    help="TLS on the gateway port with a certificate made for localhost (a local trial; "
                         "production: VIDEOMESH_GATEWAY_TLS_CERT and _TLS_KEY)")  # fmt: skip
    up.add_argument("--model", default="default", choices=["default", "wan2.2"],
                    help="the model the encoder and denoiser serve (default: the embedded model)")  # fmt: skip
    up.add_argument("--model-dir", help="wan2.2: the downloaded diffusers-layout directory, e.g. of "
                                        "Wan-AI/Wan2.2-T2V-A14B-Diffusers")  # fmt: skip

    g = sub.add_parser("generate", help="generate a video through a running gateway", epilog=EXIT_CODES_HELP)
    _gateway_args(g)
    _gen_args(g)

    w = sub.add_parser("watch", help="follow a job's events (again) until it ends; --out downloads the video",
                       epilog=EXIT_CODES_HELP + " (Ctrl-C detaches; the job goes on)")  # fmt: skip
    w.add_argument("id", help="the video id `generate` printed (vid_…)")
    _gateway_args(w)
    w.add_argument("--out", "-o", help="write the finished video here")
    w.add_argument("--api-key", help=API_KEY_HELP)
    w.add_argument(
        "--timeout", type=float, default=None, help="stop waiting after this many seconds (the job goes on)"
    )
    w.add_argument(
        "--accept-review",
        action="store_true",
        help=f"exit 0 when the video is held for review (default: exit {EXIT_NEEDS_REVIEW})",
    )
    w.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", help="up, generate, down in one", epilog=EXIT_CODES_HELP)
    d.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    _gen_args(d)

    h = sub.add_parser(
        "health", help="health of the gateway and every service behind it; non-zero if any is not SERVING"
    )
    _gateway_args(h)
    h.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")

    s = sub.add_parser("serve", help="run one service (encoder, denoiser, upscaler, qc, gateway)")
    s.add_argument("name", choices=["encoder", "denoiser", "upscaler", "qc", "gateway"])

    r = sub.add_parser("review", help="show a video's quality report, or approve/reject one held for review")
    r.add_argument("id")
    _gateway_args(r)
    r.add_argument("--api-key", help=API_KEY_HELP)
    g2 = r.add_mutually_exclusive_group()
    g2.add_argument("--approve", dest="decision", action="store_const", const="approve")
    g2.add_argument("--reject", dest="decision", action="store_const", const="reject")
    r.add_argument("--note", help="reviewer's note (the reason, when rejecting)")

    v = sub.add_parser("verify", help="read the invisible watermark of a video file",
                       epilog="exit codes: 0 a watermark found; 1 a call failed; 2 the file cannot be read; "
                              f"{EXIT_NO_WATERMARK} no watermark")  # fmt: skip
    v.add_argument("file")
    _gateway_args(v)
    v.add_argument("--api-key", help=API_KEY_HELP)

    us = sub.add_parser("usage", help="your metering: jobs, output seconds, compute seconds, cache hits")
    _gateway_args(us)
    us.add_argument("--api-key", help=API_KEY_HELP)
    us.add_argument("--templates", action="store_true", help="also list the template library")
    us.add_argument("--adapters", action="store_true", help="also list the brand style adapters you may use")

    sub.add_parser(
        "train", help="train the default model from scratch (see services/denoiser/train.py)", add_help=False
    )
    sub.add_parser("eval", help="prompt adherence on held-out phrasings, through the mesh", add_help=False)
    sub.add_parser("bench", help="performance ratios: mesh, throughput, FLOP/s, caching, Wan", add_help=False)
    sub.add_parser("train-adapter", help="fit a brand style adapter (LoRA) on the shipped denoiser",
                   add_help=False)  # fmt: skip

    t = sub.add_parser("tenants", help="manage tenants and API keys",
                       epilog="exit codes: 0 done; 1 refused (the tenant exists without --force, no such tenant, "
                              "no tenants file); 2 an unknown tier")  # fmt: skip
    t.add_argument("action", choices=["add", "list", "revoke", "rotate", "import"],
                   help="import FILE: copy a tenants.json's tenants (those the database lacks) and their key hashes "
                        "into --database")  # fmt: skip
    t.add_argument("name", nargs="?")
    t.add_argument(
        "--tier", default=None, help="free, pro or enterprise (add; default free, or unchanged with --force)"
    )
    t.add_argument("--webhook", help="URL that receives signed job-finished callbacks")
    t.add_argument("--grace", type=float, default=0.0,
                   help="rotate: the earlier keys keep working this many seconds (default 0: revoked now)")  # fmt: skip
    t.add_argument(
        "--force", action="store_true", help="add: update an existing tenant and give it another key"
    )
    t.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"where `videomesh up` keeps tenants.json (default {DEFAULT_DATA_DIR})",
    )
    t.add_argument("--database", default=None, metavar="URL",
                   help="the gateways' PostgreSQL (postgresql://…), where replicas keep tenants and keys; default: "
                        "the gateway's own setting ($VIDEOMESH_GATEWAY_DATABASE or _FILE), else tenants.json "
                        "in --data-dir")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("VIDEOMESH_LOG_LEVEL", "WARNING").upper())
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "serve":
        return cmd_serve(args, rest)
    if args.cmd == "train":
        from services.denoiser.train import main as train_main

        return train_main(rest)
    if args.cmd == "eval":
        from services.denoiser.evaluate import main as eval_main

        return eval_main(rest)
    if args.cmd == "bench":
        from videomesh.bench import main as bench_main

        return bench_main(rest)
    if args.cmd == "train-adapter":
        from services.denoiser.train_adapter import main as adapter_main

        return adapter_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "tenants" and args.action != "list" and not args.name:
        parser.error("tenants add|revoke|rotate need a tenant name; tenants import a file")
    command = {
        "up": cmd_up,
        "generate": cmd_generate,
        "watch": cmd_watch,
        "demo": cmd_demo,
        "health": cmd_health,
        "tenants": cmd_tenants,
        "review": cmd_review,
        "verify": cmd_verify,
        "usage": cmd_usage,
    }[args.cmd]
    try:
        return command(args)
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except GatewayNotConfigured as e:
        _err(str(e))
        return EXIT_USAGE
    except GatewayUnreachable as e:
        _err(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
