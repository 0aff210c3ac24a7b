"""Webhooks on terminal states: JSON body signed with HMAC-SHA256, retried with backoff.

Deliveries run on their own thread from a bounded queue, so a slow or dead receiver never
blocks a job. The signature header is `X-Videomesh-Signature: t=<unix>,v1=<hex>` over
"<t>.<body>", as Stripe signs webhooks; receivers check it with the tenant's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("videomesh.webhooks")


def sign(secret: str, body: bytes, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, t), header)


@dataclass
class Delivery:
    url: str
    secret: str
    payload: dict
    attempt: int = 0


class WebhookSender:
    def __init__(
        self, *, attempts: int = 5, backoff: float = 0.5, timeout: float = 5.0, max_queue: int = 10_000
    ):
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def send(self, url: str, secret: str, payload: dict) -> None:
        try:
            self._q.put_nowait((time.monotonic(), Delivery(url, secret, payload)))
        except queue.Full:
            self.failed += 1
            log.error("webhook queue full; dropped delivery to %s", url)

    def close(self) -> None:
        self._stop.set()

    def _post(self, d: Delivery) -> None:
        body = json.dumps(d.payload, separators=(",", ":"), sort_keys=True).encode()
        req = urllib.request.Request(d.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Videomesh-Signature": sign(d.secret, body, int(time.time())),
            "X-Videomesh-Delivery-Attempt": str(d.attempt + 1)})  # fmt: skip
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            if r.status >= 300:
                raise RuntimeError(f"HTTP {r.status}")

    def _run(self) -> None:
        pending: list[tuple[float, Delivery]] = []
        while not self._stop.is_set():
            try:
                pending.append(self._q.get(timeout=0.05))
            except queue.Empty:
                pass
            now = time.monotonic()
            due = [p for p in pending if p[0] <= now]
            pending = [p for p in pending if p[0] > now]
            for _, d in due:
                try:
                    self._post(d)
                    self.delivered += 1
                except Exception as e:  # noqa: BLE001 - any failure is retried
                    d.attempt += 1
                    if d.attempt >= self.attempts:
                        self.failed += 1
                        log.error("webhook to %s failed after %d attempts: %s", d.url, d.attempt, e)
                    else:
                        pending.append((now + self.backoff * 2 ** (d.attempt - 1), d))
