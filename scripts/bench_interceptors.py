"""What the operations layer costs per RPC (issue #22): a unary call (the denoiser's GetModelInfo, tiny model)
and a server-streaming one (a 2-step Denoise) against the same service built plain (only the error
interceptor) and with everything a production server has (Prometheus metrics, an OpenTelemetry span per
call on both sides with traceparent sent, the mesh credential checked). Interleaved rounds, min and median.

    python scripts/bench_interceptors.py [--calls 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from services.denoiser import server as denoiser_server  # noqa: E402
from videomesh import (
    codec,  # noqa: E402
    tracing,  # noqa: E402
)
from videomesh.client import channel  # noqa: E402
from videomesh.launch import load_settings  # noqa: E402
from videomesh.meshauth import MeshSecrets  # noqa: E402
from videomesh.v1 import denoiser_pb2, denoiser_pb2_grpc  # noqa: E402


def serve(instrument: bool, mesh):
    settings = load_settings("denoiser", env={}, model="tiny")
    srv, load, close = denoiser_server.build(settings, service="denoiser", mesh=mesh, instrument=instrument)
    srv.start()
    load()
    srv.set_serving(True)
    return srv, close


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    tracing.setup("bench")
    mesh = MeshSecrets(("bench-secret",))
    plain, close_plain = serve(False, None)
    full, close_full = serve(True, mesh)
    stubs = {
        "plain": denoiser_pb2_grpc.DenoiserStub(channel(plain.address)),
        "instrumented": denoiser_pb2_grpc.DenoiserStub(tracing.traced(channel(full.address, mesh=mesh))),
    }
    info = denoiser_pb2.GetModelInfoRequest()
    model = stubs["plain"].GetModelInfo(info, timeout=10)
    steps = {k: [] for k in stubs}
    unary = {k: [] for k in stubs}
    for stub in stubs.values():  # warm-up
        stub.GetModelInfo(info, timeout=10)
    dim = model.text_dim or 32
    emb, mask = codec.to_proto(np.zeros((1, 5, dim), "float32")), codec.to_proto(np.ones((1, 5), bool))
    enc = denoiser_pb2.DenoiseRequest(text_embeddings=emb, text_mask=mask, negative_embeddings=emb,
                                      negative_mask=mask, num_steps=2, seed=1)  # fmt: skip
    try:
        for stub in stubs.values():
            list(stub.Denoise(enc, timeout=60))
        streaming = True
    except Exception as err:  # noqa: BLE001 - the unary figure stands alone
        print(f"(no streaming figure: {err})")
        streaming = False
    for _ in range(a.rounds):
        for name, stub in stubs.items():  # interleaved: both see the same machine state
            t0 = time.perf_counter()
            for _ in range(a.calls):
                stub.GetModelInfo(info, timeout=10)
            unary[name].append((time.perf_counter() - t0) / a.calls * 1e6)
            if streaming:
                t0 = time.perf_counter()
                for _ in range(20):
                    list(stub.Denoise(enc, timeout=60))
                steps[name].append((time.perf_counter() - t0) / 20 * 1e3)
    print(f"{a.calls} GetModelInfo calls x {a.rounds} rounds, interleaved; per call:")
    for name in stubs:
        print(
            f"  {name:<13} unary min {min(unary[name]):7.1f} us  median {statistics.median(unary[name]):7.1f} us"
        )
    print(f"  overhead      unary {statistics.median(unary['instrumented']) - statistics.median(unary['plain']):+.1f} us "
          f"({statistics.median(unary['instrumented']) / statistics.median(unary['plain']):.2f}x)")  # fmt: skip
    if streaming:
        for name in stubs:
            print(f"  {name:<13} Denoise (2 steps) min {min(steps[name]):6.2f} ms  median "
                  f"{statistics.median(steps[name]):6.2f} ms")  # fmt: skip
    close_plain()
    close_full()
    plain.stop(0)
    full.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
