"""TLS for the public gateway port: a self-signed pair for local trials, and where clients find the CA.

Production: the operator's certificate and key (`VIDEOMESH_GATEWAY_TLS_CERT` / `_TLS_KEY`, e.g. a
Kubernetes `kubernetes.io/tls` Secret) and clients that verify against the system's roots (`--tls`)
or the operator's CA (`--ca FILE`). A local trial: `videomesh up --tls-self-signed` makes a pair for
localhost / 127.0.0.1 / ::1 (cryptography, EC P-256, 30 days) and saves the certificate as the CA the
CLI and SDK on this machine use while that mesh runs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

CA_ENV = "VIDEOMESH_CA"  # PEM file the client verifies the gateway against
TLS_ENV = "VIDEOMESH_TLS"  # 1 = TLS against the system's roots


def self_signed(directory: Path, days: int = 30) -> tuple[Path, Path]:
    """Write cert.pem and key.pem (0600) for localhost into `directory`; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "videomesh local gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )  # fmt: skip
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def ca_file() -> Path:
    """Where `videomesh up --tls-self-signed` saves its certificate for this machine's clients."""
    from videomesh.client import videomesh_home

    return videomesh_home() / "gateway-ca.pem"


def find_root_certificates(ca: str | None = None, tls: bool = False, *, saved: bool = False) -> bytes | None:
    """What a client verifies the gateway against: --ca FILE, $VIDEOMESH_CA, the system's roots (b"")
    with --tls or $VIDEOMESH_TLS=1, and (`saved`: the address is the one `videomesh up` saved) the CA
    that mesh saved; None = plaintext."""
    path = ca or os.environ.get(CA_ENV, "").strip()
    if path:
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as err:
            raise ValueError(f"--ca / ${CA_ENV}: cannot read {path} ({err.strerror or err})") from err
    if tls or os.environ.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return b""
    if saved and ca_file().exists():
        return ca_file().read_bytes()
    return None
