"""`python -m videomesh.probe [HOST:PORT] [--service NAME] [--ca FILE]`: one grpc.health.v1 Check, for
container health checks (docker compose, exec probes). Exit 0 when SERVING, 1 otherwise (NOT_SERVING, an
unknown service, no answer within --timeout), with one line saying which.

Health answers without the mesh credential (videomesh/meshauth.py), so the probe carries none. A gateway
whose public port speaks TLS has a plaintext health-only port for probes (`health_port`); or pass --ca.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videomesh.v1 import denoiser_pb2, encoder_pb2, gateway_pb2, qc_pb2, upscaler_pb2

# each service of the mesh -> the gRPC service its health reports on (and its servicer registers)
SERVICE_NAMES = {
    name: module.DESCRIPTOR.services_by_name[service].full_name
    for name, module, service in (("encoder", encoder_pb2, "TextEncoder"), ("denoiser", denoiser_pb2, "Denoiser"),
                                  ("upscaler", upscaler_pb2, "Upscaler"), ("qc", qc_pb2, "QualityCheck"),
                                  ("gateway", gateway_pb2, "VideoService"))
}  # fmt: skip


def check(address: str, service: str = "", *, timeout: float = 3.0, ca: bytes | None = None) -> int:
    """The status (health_pb2.HealthCheckResponse.ServingStatus); raises grpc.RpcError when none came.
    `ca`: TLS, verified against these PEM roots. What every health check of one address in the mesh calls."""
    from videomesh.client import channel

    with channel(address, root_certificates=ca) as ch:
        req = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(ch).Check(req, timeout=timeout).status


def serving(address: str, service: str = "", *, timeout: float = 3.0, ca: bytes | None = None) -> bool:
    """Whether `address` answers SERVING for `service` (no answer at all: False)."""
    try:
        return check(address, service, timeout=timeout, ca=ca) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videomesh.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("address", nargs="?", default="localhost:50051")
    p.add_argument(
        "--service", default="", help="the service name to ask about (default: the server as a whole)"
    )
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--ca", help="TLS: verify the server against this PEM file")
    a = p.parse_args(argv)
    try:
        ca = open(a.ca, "rb").read() if a.ca else None  # noqa: SIM115 - read once, closed at exit
        st = check(a.address, a.service, timeout=a.timeout, ca=ca)
    except OSError as err:
        print(f"--ca {a.ca}: {err.strerror or err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"{a.address}: no health answer ({err.code().name}: {err.details()})")
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
    print(f"{a.address} {a.service or '(server)'}: {name}")
    return 0 if st == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
