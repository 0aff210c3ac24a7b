"""The `videomesh` command: up, generate, demo, health, serve, tenants.

These names and options are a contract other tools depend on; keep them stable.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import grpc

DEFAULT_DATA_DIR = "videomesh-data"


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _spec(args):
    from videomesh.v1 import common_pb2

    spec = common_pb2.VideoSpec(
        prompt=args.prompt, negative_prompt=args.negative or "", style=args.style or ""
    )
    if args.seed is not None:
        spec.seed = args.seed
    if args.adapter:
        spec.style_adapter = args.adapter
    if args.adapter_strength:
        spec.style_strength = args.adapter_strength
    if args.duration:
        spec.duration_seconds = args.duration
    if args.fps:
        spec.fps = args.fps
    if args.size:
        try:
            w, h = args.size.lower().split("x")
            spec.width, spec.height = int(w), int(h)
        except ValueError:
            raise SystemExit(f"error: --size must look like 256x256; got {args.size!r}") from None
    if args.steps:
        spec.num_steps = args.steps
    if args.guidance:
        spec.guidance_scale = args.guidance
    return spec


def _fetch(url: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        shutil.copyfile(unquote(urlparse(url).path), tmp)
    else:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    tmp.replace(out)


def _verify(out: Path, sha256: str) -> None:
    from gateway.storage import digests

    got = digests(out)[0]
    if sha256 and got != sha256:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"downloaded file's SHA-256 {got} does not match the server's {sha256}")


def generate(address: str, args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from videomesh.client import VideoClient
    from videomesh.errors import details_of
    from videomesh.v1 import common_pb2

    out = Path(args.out)
    spec = _spec(args)
    client = VideoClient(address, api_key=args.api_key)
    stream = client.generate(spec, request_id=uuid.uuid4().hex, timeout=args.timeout)
    video = None
    try:
        with Progress(
            TextColumn("[bold]{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(), transient=False, disable=args.quiet,
        ) as bar:  # fmt: skip
            task = bar.add_task("queued", total=100)
            for ev in stream:
                kind = ev.WhichOneof("event")
                if kind == "queued":
                    bar.update(task, description=f"queued #{ev.queued.position}")
                elif kind == "stage_started":
                    name = (
                        common_pb2.Stage.Name(ev.stage_started.stage)
                        .removeprefix("STAGE_")
                        .lower()
                        .replace("_", " ")
                    )
                    bar.update(task, description=name)
                elif kind == "progress":
                    bar.update(task, completed=ev.progress.percent)
                elif kind == "completed":
                    video = ev.completed.video
                    bar.update(task, completed=100, description="done")
                elif kind == "failed":
                    _err(f"{ev.failed.error.reason}: {ev.failed.error.message}")
                    return 1
                elif kind == "cancelled":
                    _err("the job was cancelled")
                    return 1
    except grpc.RpcError as e:
        info = details_of(e)
        extra = "".join(f"\n  {f}: {d}" for f, d in info.get("violations", []))
        _err(f"{e.code().name}: {e.details()}{extra}")
        return 1
    finally:
        client.close()
    if video is None:
        _err("the stream ended without a result")
        return 1
    try:
        _fetch(video.result.url, out)
        _verify(out, video.result.sha256)
    except Exception as e:  # noqa: BLE001
        _err(f"could not fetch {video.result.url}: {e}")
        return 1
    r = video.result
    if video.status == common_pb2.NEEDS_REVIEW:
        failed = [f"{c.name} ({c.detail})" for c in video.quality.checks if not c.passed]
        print(f"warning: quality gate flagged this video for review: {'; '.join(failed)}", file=sys.stderr)
    print(
        f"video {video.id}: {r.width}x{r.height}, {r.num_frames} frames at {r.fps:g} fps, sha256 {r.sha256[:16]}…"
    )
    print(f"wrote {out.resolve()}")
    return 0


def cmd_generate(args) -> int:
    address = _gateway(args)
    if not address:
        return 2
    return generate(address, args)


def cmd_up(args) -> int:
    from videomesh.mesh import LocalMesh

    mesh = LocalMesh(Path(args.data_dir), port=args.port or 0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        address = mesh.start()
    except Exception as e:  # noqa: BLE001
        _err(f"start-up failed: {e}")
        return 1
    print(f"gateway listening on {address}", flush=True)
    for n, a in mesh.addresses.items():
        if n != "gateway":
            print(f"  {n:<9} {a}", flush=True)
    print(
        f"dev tenant key in {Path(args.data_dir).resolve() / 'dev-api-key'}; Ctrl-C stops everything",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            for n, p in mesh.procs.items():
                if p.poll() is not None:
                    _err(f"{n} exited with code {p.returncode}; stopping")
                    stop.set()
    finally:
        print("stopping…", flush=True)
        mesh.stop()
    return 0


def cmd_demo(args) -> int:
    from videomesh.mesh import LocalMesh

    print("starting the mesh (encoder, denoiser, upscaler, qc, gateway)…", flush=True)
    mesh = LocalMesh(Path(args.data_dir))
    try:
        address = mesh.start()
        print(f"gateway on {address}", flush=True)
        return generate(address, args)
    except Exception as e:  # noqa: BLE001
        _err(str(e))
        return 1
    finally:
        mesh.stop()


def cmd_health(args) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from videomesh.mesh import SERVICE_NAMES

    address = _gateway(args)
    if not address:
        return 2
    bad = 0
    with grpc.insecure_channel(address) as ch:
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
    return 1 if bad else 0


def cmd_serve(args, rest) -> int:
    from videomesh.launch import main as launch_main

    launch_main(args.name, rest)
    return 0


def _gateway(args) -> str | None:
    address = args.gateway or os.environ.get("VIDEOMESH_GATEWAY")
    if not address:
        _err("give --gateway HOST:PORT (or set VIDEOMESH_GATEWAY); `videomesh up` prints it")
    return address


def cmd_review(args) -> int:
    from videomesh.client import VideoClient
    from videomesh.v1 import common_pb2

    address = _gateway(args)
    if not address:
        return 2
    with VideoClient(address, api_key=args.api_key) as c:
        try:
            if args.decision is None:
                v = c.get(args.id)
            else:
                v = c.review(args.id, args.decision == "approve", args.note or "")
        except grpc.RpcError as e:
            _err(f"{e.code().name}: {e.details()}")
            return 1
    print(f"{v.id}: {common_pb2.VideoStatus.Name(v.status)}")
    for ch in v.quality.checks:
        ranges = ", ".join(f"{r.start}-{r.end - 1}" for r in ch.frames)
        print(
            f"  {'ok  ' if ch.passed else 'FAIL'} {ch.name:<13} {ch.detail}{f' (frames {ranges})' if ranges else ''}"
        )
    return 0


def cmd_verify(args) -> int:
    from videomesh.client import VideoClient

    address = _gateway(args)
    if not address:
        return 2
    with VideoClient(address, api_key=args.api_key) as c:
        try:
            r = c.verify_watermark(args.file)
        except grpc.RpcError as e:
            _err(f"{e.code().name}: {e.details()}")
            return 1
    if not r.present:
        print(f"no videomesh watermark found ({r.frames} frames read)")
        return 3
    print(
        f"watermark {r.payload} (confidence {r.confidence:.2f}, {r.frames} frames)"
        + (f": video {r.video_id}" if r.video_id else "")
    )
    return 0


def cmd_usage(args) -> int:
    from videomesh.client import VideoClient

    address = _gateway(args)
    if not address:
        return 2
    with VideoClient(address, api_key=args.api_key) as c:
        try:
            u = c.usage()
            tpl = c.templates() if args.templates else []
            adapters = c.style_adapters() if args.adapters else []
        except grpc.RpcError as e:
            _err(f"{e.code().name}: {e.details()}")
            return 1
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
    return 0


def cmd_tenants(args) -> int:
    from gateway.tenants import TenantDirectory

    d = TenantDirectory(Path(args.data_dir) / "tenants.json")
    if args.action == "add":
        key = d.add(args.name, args.tier, args.webhook or "")
        print(key)
        if args.webhook:
            print(f"webhook secret: {d.get(args.name).webhook_secret}", file=sys.stderr)
    elif args.action == "list":
        for t, keys in d.list():
            active = sum(not k["revoked"] for k in keys)
            print(f"{t.name:<20} {t.tier:<10} keys: {active} active, {len(keys) - active} revoked")
    elif args.action == "revoke":
        print(f"revoked {d.revoke(args.name)} key(s)")
    elif args.action == "rotate":
        print(d.rotate(args.name))
    return 0


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--out", "-o", default="clip.mp4")
    p.add_argument("--seed", type=int)
    p.add_argument("--duration", type=float, help="seconds")
    p.add_argument("--fps", type=float)
    p.add_argument("--size", help="WIDTHxHEIGHT, e.g. 256x256")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--style", help="style word, e.g. documentary")
    p.add_argument(
        "--adapter",
        help="brand style adapter (LoRA), e.g. brand-banner; `videomesh usage --adapters` lists yours",
    )
    p.add_argument("--adapter-strength", type=float, help="0..2 (default 1)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--api-key", help="default: $VIDEOMESH_API_KEY or the key `videomesh up` wrote")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="videomesh", description="Text-to-video through a mesh of gRPC services."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start every service locally on loopback")
    up.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    up.add_argument("--port", type=int, default=0, help="gateway port (default: a free port)")

    g = sub.add_parser("generate", help="generate a video through a running gateway")
    g.add_argument("--gateway", help="HOST:PORT (default $VIDEOMESH_GATEWAY)")
    _gen_args(g)

    d = sub.add_parser("demo", help="up, generate, down in one")
    d.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    _gen_args(d)

    h = sub.add_parser("health", help="health of the gateway and every service behind it")
    h.add_argument("--gateway")
    h.add_argument("--timeout", type=float, default=3.0)

    s = sub.add_parser("serve", help="run one service (encoder, denoiser, upscaler, qc, gateway)")
    s.add_argument("name", choices=["encoder", "denoiser", "upscaler", "qc", "gateway"])

    r = sub.add_parser("review", help="show a video's quality report, or approve/reject one held for review")
    r.add_argument("id")
    r.add_argument("--gateway")
    r.add_argument("--api-key")
    g2 = r.add_mutually_exclusive_group()
    g2.add_argument("--approve", dest="decision", action="store_const", const="approve")
    g2.add_argument("--reject", dest="decision", action="store_const", const="reject")
    r.add_argument("--note", help="reviewer's note (the reason, when rejecting)")

    v = sub.add_parser("verify", help="read the invisible watermark of a video file")
    v.add_argument("file")
    v.add_argument("--gateway")
    v.add_argument("--api-key")

    us = sub.add_parser("usage", help="your metering: jobs, output seconds, compute seconds, cache hits")
    us.add_argument("--gateway")
    us.add_argument("--api-key")
    us.add_argument("--templates", action="store_true", help="also list the template library")
    us.add_argument("--adapters", action="store_true", help="also list the brand style adapters you may use")

    sub.add_parser(
        "train", help="train the default model from scratch (see services/denoiser/train.py)", add_help=False
    )
    sub.add_parser("eval", help="prompt adherence on held-out phrasings, through the mesh", add_help=False)
    sub.add_parser("train-adapter", help="fit a brand style adapter (LoRA) on the shipped denoiser",
                   add_help=False)  # fmt: skip

    t = sub.add_parser("tenants", help="manage tenants and API keys")
    t.add_argument("action", choices=["add", "list", "revoke", "rotate"])
    t.add_argument("name", nargs="?")
    t.add_argument("--tier", default="free")
    t.add_argument("--webhook", help="URL that receives signed job-finished callbacks")
    t.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
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
    if args.cmd == "train-adapter":
        from services.denoiser.train_adapter import main as adapter_main

        return adapter_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "tenants" and args.action != "list" and not args.name:
        parser.error("tenants add|revoke|rotate need a tenant name")
    return {
        "up": cmd_up,
        "generate": cmd_generate,
        "demo": cmd_demo,
        "health": cmd_health,
        "tenants": cmd_tenants,
        "review": cmd_review,
        "verify": cmd_verify,
        "usage": cmd_usage,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
