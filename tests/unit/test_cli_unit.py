"""The CLI and the client SDK against a scripted in-process VideoService (grpc on 127.0.0.1:0).

Fast: no models, no service processes. What a real mesh adds is in tests/integration/test_cli.py
and tests/integration/test_supervisor.py.
"""

from __future__ import annotations

import _thread
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from videomesh import cli
from videomesh.client import (
    DownloadError,
    GatewayNotConfigured,
    GatewayUnreachable,
    VideoClient,
    find_gateway,
    gateway_file,
    write_address_file,
)
from videomesh.errors import InvalidArgument, ResourceExhausted, to_status
from videomesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

DATA = bytes(range(256)) * 5000  # 1.28 MB: two chunks of 1 MiB or less
SHA = hashlib.sha256(DATA).hexdigest()


def _abort(context, err):
    context.abort_with_status(to_status(err))


class FakeGateway(gateway_pb2_grpc.VideoServiceServicer):
    """One scripted job, vid_1: its events, its file, and the faults a test asks for."""

    def __init__(self):
        self.video = gateway_pb2.Video(id="vid_1", status=common_pb2.QUEUED)
        self.events: list[gateway_pb2.VideoEvent] = []
        self.data = DATA
        self.download_mode = "good"  # good | flip | short | no-trailer | trailer-sha | after-trailer
        self.break_after: int | None = None  # WatchVideo aborts UNAVAILABLE after this many events (once)
        self.always_unavailable = False
        self.exhausted_once = False  # the first WatchVideo answers RESOURCE_EXHAUSTED with a retry delay
        self.hang = False  # WatchVideo sends nothing and waits (until the client goes away)
        self.create_error: Exception | None = None
        self.creates: list[gateway_pb2.CreateVideoRequest] = []
        self.watches: list[int] = []
        self.cancelled: list[str] = []
        self.verified = 0
        self.finish(common_pb2.SUCCEEDED)

    def finish(self, status: int, warnings: tuple[str, ...] = ()) -> None:
        """Script a job: queued, stage, progress, [warnings], then its end."""
        done = gateway_pb2.Video()
        done.CopyFrom(self.video)
        done.status = status
        done.warnings.extend(warnings)
        done.result.CopyFrom(gateway_pb2.VideoResult(sha256=SHA, size_bytes=len(DATA), width=64, height=64,
                                                     num_frames=32, fps=8))  # fmt: skip
        if status == common_pb2.NEEDS_REVIEW:
            done.quality.checks.add(name="flicker", passed=False, detail="luma jumps 40%")
        evs = [
            gateway_pb2.VideoEvent(queued=gateway_pb2.Queued(position=1)),
            gateway_pb2.VideoEvent(stage_started=gateway_pb2.StageStarted(stage=common_pb2.STAGE_DENOISING)),
            gateway_pb2.VideoEvent(progress=gateway_pb2.Progress(percent=50)),
        ]
        evs += [gateway_pb2.VideoEvent(warning=gateway_pb2.Warning(reason="W", message=w)) for w in warnings]
        if status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW):
            evs.append(gateway_pb2.VideoEvent(completed=gateway_pb2.Completed(video=done)))
        elif status == common_pb2.FAILED:
            done.error.CopyFrom(gateway_pb2.VideoError(code=13, message="num_steps exploded", reason="BOOM"))
            evs.append(gateway_pb2.VideoEvent(failed=gateway_pb2.Failed(error=done.error)))
        for i, ev in enumerate(evs, 1):
            ev.video_id, ev.sequence = "vid_1", i
        self.events, self.final = evs, done

    # --- the RPCs the CLI uses ---
    def CreateVideo(self, request, context):
        self.creates.append(request)
        if self.create_error is not None:
            _abort(context, self.create_error)
        return self.video

    def GenerateVideo(self, request, context):
        raise AssertionError("the CLI must not use GenerateVideo (its end cancels the job)")

    def WatchVideo(self, request, context):
        self.watches.append(request.after_sequence)
        if self.always_unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
        if self.exhausted_once:
            self.exhausted_once = False
            _abort(context, ResourceExhausted("too many streams", retry_after=0.1))
        if self.hang:
            while context.is_active():
                time.sleep(0.05)
            return
        sent = 0
        for ev in self.events:
            if ev.sequence <= request.after_sequence:
                continue
            if self.break_after is not None and sent == self.break_after:
                self.break_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed")
            sent += 1
            yield ev

    def GetVideo(self, request, context):
        if request.id != "vid_1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"video {request.id} not found")
        return self.final

    def CancelVideo(self, request, context):
        self.cancelled.append(request.id)
        return self.video

    def VerifyWatermark(self, request_iterator, context):
        self.verified += 1
        for _ in request_iterator:
            pass
        return gateway_pb2.VerifyWatermarkResponse(present=True, payload="0badcafe", confidence=1, frames=3)

    def DownloadVideo(self, request, context):
        data, mode = self.data, self.download_mode
        sent = bytearray(data)
        if mode == "flip":
            sent[1000] ^= 0xFF
        if mode == "short":
            sent = sent[:-10]
        for i in range(0, len(sent), 1 << 20):
            yield gateway_pb2.DownloadVideoResponse(chunk=bytes(sent[i : i + (1 << 20)]))
        if mode == "no-trailer":
            return
        sha = hashlib.sha256(bytes(sent)).hexdigest() if mode != "flip" else SHA  # flip: the trailer lies
        if mode == "trailer-sha":
            sha = "0" * 64
        size = len(data) if mode in ("short",) else len(sent)
        yield gateway_pb2.DownloadVideoResponse(
            trailer=gateway_pb2.DownloadTrailer(size_bytes=size, sha256=sha)
        )
        if mode == "after-trailer":
            yield gateway_pb2.DownloadVideoResponse(chunk=b"more")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDEOMESH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VIDEOMESH_GATEWAY", raising=False)
    monkeypatch.setenv("VIDEOMESH_API_KEY", "vm_test")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "REATTACH_MAX_DELAY", 0.05)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    gw = FakeGateway()
    gateway_pb2_grpc.add_VideoServiceServicer_to_server(gw, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    gw.address = f"127.0.0.1:{port}"
    yield gw
    server.stop(0)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- 3: the id first, re-attaching, watch ----------------------------------------------------------------


def test_generate_prints_the_id_first_then_downloads_a_verified_file(fake, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc, stdout, err = run(
        capsys, "generate", "a red ball", "--gateway", fake.address, "--out", str(out), "-q"
    )
    assert rc == 0, err
    assert stdout.splitlines()[0] == "video vid_1 queued"
    assert f"wrote {out}" in stdout
    assert out.read_bytes() == DATA
    assert fake.creates[0].request_id  # idempotent CreateVideo, not GenerateVideo
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".clip")] == []


def test_generate_reattaches_after_the_last_event_when_the_stream_breaks(fake, tmp_path, capsys):
    fake.break_after = 2
    out = tmp_path / "clip.mp4"
    rc, stdout, err = run(
        capsys, "generate", "a red ball", "--gateway", fake.address, "--out", str(out), "-q"
    )
    assert rc == 0, err
    assert fake.watches == [0, 2]
    assert "connection lost (UNAVAILABLE: Stream removed); re-attaching to vid_1 after event 2" in err
    assert out.read_bytes() == DATA


def test_generate_gives_up_reattaching_after_bounded_tries(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "REATTACH_TRIES", 3)
    fake.always_unavailable = True
    rc, stdout, err = run(
        capsys, "generate", "x", "--gateway", fake.address, "--out", str(tmp_path / "c.mp4"), "-q"
    )
    assert rc == 1
    assert len(fake.watches) == 4
    assert "gave up re-attaching after 3 tries" in err and "videomesh watch vid_1" in err
    assert stdout.startswith("video vid_1 queued")
    assert not (tmp_path / "c.mp4").exists()


def test_a_refused_stream_is_retried_after_the_advised_delay(fake, tmp_path, capsys):
    fake.exhausted_once = True
    rc, _, err = run(capsys, "watch", "vid_1", "--gateway", fake.address, "-q")
    assert rc == 0, err
    assert "the gateway refused the stream (RESOURCE_EXHAUSTED" in err and "in 0.1 s" in err


def test_watch_reattaches_and_exits_as_generate_would(fake, tmp_path, capsys):
    fake.break_after = 1
    out = tmp_path / "w.mp4"
    rc, stdout, err = run(capsys, "watch", "vid_1", "--gateway", fake.address, "--out", str(out), "-q")
    assert rc == 0, err
    assert out.read_bytes() == DATA and f"wrote {out}" in stdout
    assert fake.watches == [0, 1]
    rc, stdout, _ = run(capsys, "watch", "vid_1", "--gateway", fake.address, "-q")  # no --out: no file
    assert rc == 0 and "video vid_1: 64x64, 32 frames at 8 fps" in stdout and "wrote" not in stdout


def test_watch_a_failed_job_exits_1_with_one_error(fake, capsys):
    fake.finish(common_pb2.FAILED)
    rc, _, err = run(capsys, "watch", "vid_1", "--gateway", fake.address, "-q")
    assert rc == 1
    assert _error_lines(err) == ["error: video vid_1 failed: --steps exploded (BOOM)"]


def test_watch_an_unknown_id_is_one_line(fake, capsys):
    rc, _, err = run(capsys, "watch", "vid_nope", "--gateway", fake.address, "-q")
    assert rc == 1 and _error_lines(err) == ["error: NOT_FOUND: video vid_nope not found"]


def test_warnings_are_printed_once(fake, tmp_path, capsys):
    fake.finish(common_pb2.SUCCEEDED, warnings=("the default model draws balls, boxes and triangles",))
    rc, _, err = run(
        capsys,
        "generate",
        "a girl jogging",
        "--gateway",
        fake.address,
        "--out",
        str(tmp_path / "c.mp4"),
        "-q",
    )
    assert rc == 0
    assert err.count("warning: the default model draws balls, boxes and triangles") == 1


# --- 6: review, Ctrl-C, verify ---------------------------------------------------------------------------


def test_needs_review_writes_the_clip_but_exits_4_unless_accepted(fake, tmp_path, capsys):
    fake.finish(common_pb2.NEEDS_REVIEW)
    out = tmp_path / "r.mp4"
    rc, stdout, err = run(capsys, "generate", "x", "--gateway", fake.address, "--out", str(out), "-q")
    assert rc == cli.EXIT_NEEDS_REVIEW == 4
    assert out.read_bytes() == DATA and f"wrote {out}" in stdout
    assert "flicker (luma jumps 40%)" in err and "videomesh review vid_1 --approve" in err
    out.unlink()
    rc, _, err = run(
        capsys, "generate", "x", "--gateway", fake.address, "--out", str(out), "-q", "--accept-review"
    )
    assert rc == 0 and out.exists() and "accepted: --accept-review" in err
    rc, _, _ = run(capsys, "watch", "vid_1", "--gateway", fake.address, "-q")
    assert rc == 4


def test_ctrl_c_cancels_the_job_and_exits_130(fake, tmp_path, capsys):
    fake.hang = True
    threading.Timer(1.0, _thread.interrupt_main).start()
    rc, stdout, err = run(
        capsys, "generate", "x", "--gateway", fake.address, "--out", str(tmp_path / "c.mp4"), "-q"
    )
    assert rc == 130
    assert fake.cancelled == ["vid_1"]
    assert "cancelled vid_1" in err and "Traceback" not in err


def test_ctrl_c_in_a_real_process_prints_no_traceback(fake, tmp_path):
    fake.hang = True
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "videomesh.cli", "generate", "x", "--gateway", fake.address, "-q",
                          "--out", str(tmp_path / "c.mp4")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = p.stdout.readline()  # the id, once the job exists
    assert first.strip() == "video vid_1 queued"
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert err.strip() == "cancelled vid_1"
    assert fake.cancelled == ["vid_1"]


def test_timeout_cancels_the_generate_job_but_only_detaches_a_watch(fake, tmp_path, capsys):
    fake.hang = True
    rc, _, err = run(capsys, "generate", "x", "--gateway", fake.address, "--timeout", "1", "-q")
    assert rc == 1 and fake.cancelled == ["vid_1"]
    assert _error_lines(err) == ["error: no result within --timeout 1 s"] and "cancelled vid_1" in err
    rc, _, err = run(capsys, "watch", "vid_1", "--gateway", fake.address, "--timeout", "1", "-q")
    assert rc == 1 and fake.cancelled == ["vid_1"] and "vid_1 goes on" in err


def test_ctrl_c_in_watch_detaches_without_cancelling(fake, capsys):
    fake.hang = True
    threading.Timer(1.0, _thread.interrupt_main).start()
    rc, _, err = run(capsys, "watch", "vid_1", "--gateway", fake.address, "-q")
    assert rc == 130 and fake.cancelled == [] and "detached from vid_1" in err


@pytest.mark.parametrize("name", ["nope.mp4", "."])
def test_verify_an_unreadable_file_is_one_line_before_any_call(fake, capsys, name):
    rc, _, err = run(capsys, "verify", name, "--gateway", fake.address)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert fake.verified == 0


def test_verify_reads_a_file(fake, tmp_path, capsys):
    f = tmp_path / "v.mp4"
    f.write_bytes(DATA)
    rc, out, _ = run(capsys, "verify", str(f), "--gateway", fake.address)
    assert rc == 0 and "watermark 0badcafe" in out


# --- 8: where the gateway is -----------------------------------------------------------------------------


def test_an_unreachable_gateway_says_how_to_start_the_mesh_quickly(fake, tmp_path, capsys):
    t0 = time.monotonic()
    rc, _, err = run(capsys, "generate", "x", "--gateway", "127.0.0.1:1", "-q")
    assert time.monotonic() - t0 < 3.0
    assert rc == 1
    assert _error_lines(err) == [e for e in err.splitlines() if e]  # one line, no traceback
    assert "no videomesh gateway answers at 127.0.0.1:1" in err and "videomesh up" in err
    for cmd in (["health"], ["usage"], ["review", "vid_1"], ["watch", "vid_1"]):
        rc, _, err = run(capsys, *cmd, "--gateway", "127.0.0.1:1")
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "videomesh up" in err, (cmd, err)


def test_no_gateway_known_says_how_to_start_the_mesh(fake, capsys):
    rc, _, err = run(capsys, "generate", "x", "-q")
    assert rc == 2 and "videomesh up" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(GatewayNotConfigured):
        VideoClient()


def test_the_environment_and_the_saved_address_are_honoured(fake, tmp_path, capsys, monkeypatch):
    write_address_file(gateway_file(), fake.address)  # what `videomesh up` writes
    assert find_gateway() == (fake.address, str(gateway_file()))
    with VideoClient() as c:
        assert c.get("vid_1").id == "vid_1"
    rc, stdout, _ = run(capsys, "generate", "x", "--out", str(tmp_path / "a.mp4"), "-q")
    assert rc == 0 and stdout.startswith("video vid_1")
    monkeypatch.setenv("VIDEOMESH_GATEWAY", "127.0.0.1:1")  # the environment wins over the file
    assert find_gateway()[0] == "127.0.0.1:1"
    with pytest.raises(GatewayUnreachable, match=r"127\.0\.0\.1:1 \(from \$VIDEOMESH_GATEWAY\)"):
        VideoClient().wait_ready(2)
    monkeypatch.delenv("VIDEOMESH_GATEWAY")
    write_address_file(gateway_file(), "127.0.0.1:1", pid=2**22 + 12345)  # an `up` that is gone
    rc, _, err = run(capsys, "usage")
    assert rc == 1 and "which has exited" in err and "videomesh up" in err


# --- 9, 19: flags in the user's words --------------------------------------------------------------------


def test_violations_name_the_flags_and_print_once(fake, capsys):
    fake.create_error = InvalidArgument(
        "num_steps must be in 1..50; guidance_scale must be in 0..30",
        violations=[("spec.num_steps", "num_steps must be in 1..50 (0 = default 8); got 99"),
                    ("spec.guidance_scale", "guidance_scale must be in 0..30 (0 = default); got 99.0"),
                    ("spec.width", "size 100x100 is not offered; choose one of 256x256")],
    )  # fmt: skip
    rc, _, err = run(
        capsys, "generate", "x", "--gateway", fake.address, "--steps", "99", "--guidance", "99", "-q"
    )
    assert rc == 1
    assert _error_lines(err) == [
        "error: --steps must be in 1..50 (0 = default 8); got 99",
        "error: --guidance must be in 0..30 (0 = default); got 99.0",
        "error: --size: size 100x100 is not offered; choose one of 256x256",
    ]
    assert "num_steps" not in err and "guidance_scale" not in err
    assert len(err.strip().splitlines()) == 3


@pytest.mark.parametrize("flag,value", [("--seed", str(2**70)), ("--seed", "-1"), ("--steps", "-5"),
                                        ("--steps", str(10**12)), ("--size", "99999999999x2"), ("--size", "big"),
                                        ("--fps", "nan"), ("--guidance", "inf")])  # fmt: skip
def test_out_of_range_values_are_one_line_naming_the_flag_before_any_call(fake, capsys, flag, value):
    rc, _, err = run(capsys, "generate", "x", "--gateway", fake.address, flag, value, "-q")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {flag} ")
    assert fake.creates == []


def test_adapter_strength_out_of_range_without_an_adapter_reports_the_range(tmp_path):
    from gateway.gateway import GatewaySettings, VideoGateway
    from videomesh.v1 import denoiser_pb2

    gw = VideoGateway(GatewaySettings(data_dir=tmp_path))
    gw.model = denoiser_pb2.ModelInfo(name="m", frame_counts=[16], fps=4, max_steps=50, default_steps=8,
                                      languages=["en"], sizes=[common_pb2.Size(width=32, height=32)])  # fmt: skip
    with pytest.raises(InvalidArgument) as e:
        gw.normalize(common_pb2.VideoSpec(prompt="a red ball", style_strength=5))
    assert e.value.violations == [("spec.style_strength", "style_strength must be in 0..2 (0 = 1); got 5.0")]
    assert cli._user_words(e.value.violations[0][1]).startswith("--adapter-strength must be in 0..2")
    with pytest.raises(InvalidArgument, match="needs a style_adapter"):  # in range, still needs an adapter
        gw.normalize(common_pb2.VideoSpec(prompt="a red ball", style_strength=1.5))


# --- 10: downloads ---------------------------------------------------------------------------------------


def test_download_writes_the_verified_file_atomically(fake, tmp_path):
    out = tmp_path / "sub" / "d.mp4"
    with VideoClient(fake.address) as c:
        assert c.download("vid_1", out) == out
    assert out.read_bytes() == DATA
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.mp4"]


@pytest.mark.parametrize("mode,words", [
    ("flip", "the server says it sent"), ("short", "received"), ("no-trailer", "without its trailer"),
    ("trailer-sha", "the server says it sent"), ("after-trailer", "after the trailer"),
])  # fmt: skip
def test_a_corrupted_download_raises_and_leaves_nothing(fake, tmp_path, mode, words):
    fake.download_mode = mode
    out = tmp_path / "d.mp4"
    out.write_bytes(b"an older file")
    with VideoClient(fake.address) as c, pytest.raises(DownloadError, match=words):
        c.download("vid_1", out)
    assert out.read_bytes() == b"an older file"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mp4"]  # no partial file


def test_a_download_that_differs_from_the_videos_record_is_refused(fake, tmp_path):
    fake.data = (
        DATA[:-1] + b"?"
    )  # intact in transit (the trailer matches) but not the file GetVideo describes
    with (
        VideoClient(fake.address) as c,
        pytest.raises(DownloadError, match="does not match the video's recorded"),
    ):
        c.download("vid_1", tmp_path / "d.mp4")
    assert list(tmp_path.iterdir()) == []


def test_generate_reports_a_bad_download_in_one_line(fake, tmp_path, capsys):
    fake.download_mode = "flip"
    rc, stdout, err = run(
        capsys, "generate", "x", "--gateway", fake.address, "--out", str(tmp_path / "c.mp4"), "-q"
    )
    assert rc == 1 and _error_lines(err) and len(_error_lines(err)) == 1 and "nothing written" in err
    assert not (tmp_path / "c.mp4").exists() and "wrote" not in stdout


# --- 7: tenants ------------------------------------------------------------------------------------------


def test_tenants_refuse_unknown_tiers_and_silent_changes(tmp_path, capsys):
    d = str(tmp_path / "data")
    rc, _, err = run(capsys, "tenants", "add", "bob", "--tier", "gold", "--data-dir", d)
    assert rc == 2 and "unknown tier 'gold'" in err and "free, pro, enterprise" in err
    assert not (tmp_path / "data" / "tenants.json").exists()
    rc, key, err = run(capsys, "tenants", "add", "bob", "--tier", "pro", "--data-dir", d)
    assert rc == 0 and key.startswith("vm_") and "added tenant bob (tier pro)" in err
    rc, out, err = run(capsys, "tenants", "add", "bob", "--data-dir", d)
    assert rc == 1 and out == "" and "already exists (tier pro, 1 active key(s))" in err and "--force" in err
    rc, out, err = run(capsys, "tenants", "add", "bob", "--force", "--data-dir", d)
    assert (
        rc == 0
        and out.startswith("vm_")
        and "tier pro (unchanged)" in err
        and "1 earlier key(s) still work" in err
    )
    rc, out, err = run(capsys, "tenants", "add", "bob", "--tier", "free", "--force", "--data-dir", d)
    assert rc == 0 and "tier pro -> free" in err
    rc, out, _ = run(capsys, "tenants", "list", "--data-dir", d)
    assert rc == 0 and "bob" in out and "free" in out and "keys: 3 active" in out


def test_tenants_add_checks_the_webhook_url(tmp_path, capsys):
    d = str(tmp_path / "data")
    for bad in (
        "ftp://example.com/hook",
        "https://user:pw@example.com/hook",
        "https://example.com/" + "x" * 3000,
    ):
        rc, _, err = run(capsys, "tenants", "add", "eve", "--webhook", bad, "--data-dir", d)
        assert rc == 2 and err.startswith("error: --webhook:") and len(err) < 400, err
    assert not (tmp_path / "data" / "tenants.json").exists()
    rc, _, _ = run(
        capsys, "tenants", "add", "eve", "--webhook", "https://hooks.example.com/v", "--data-dir", d
    )
    assert rc == 0


def test_tenants_without_a_directory_say_where_they_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "tenants", "list")
    assert rc == 1 and out == ""
    assert str(Path(tmp_path / "videomesh-data" / "tenants.json")) in err
    rc, _, err = run(capsys, "tenants", "revoke", "bob", "--data-dir", str(tmp_path))
    assert rc == 1 and "no tenants file" in err
    run(capsys, "tenants", "add", "alice", "--data-dir", str(tmp_path))
    rc, _, err = run(capsys, "tenants", "rotate", "bob", "--data-dir", str(tmp_path))
    assert rc == 1 and err.strip() == "error: tenant 'bob' not found"


# --- the README's CLI section matches --help -------------------------------------------------------------


def test_the_readme_names_every_command_and_flag():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for name, p in sub.choices.items():
        assert (
            f"videomesh {name}" in section or name in ("train", "eval", "train-adapter") and name in section
        ), name
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in section, f"{name} {opt} is not in the README's CLI section"
    for code in ("0", "1", "2", "3", "4", "130"):
        assert f"`{code}`" in section, code
