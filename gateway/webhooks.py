"""Webhooks on terminal states: JSON body signed with HMAC-SHA256, retried with backoff.

Deliveries run on their own thread from a bounded queue, so a slow or dead receiver never
blocks a job. The signature header is `X-Videomesh-Signature: t=<unix>,v1=<hex>` over
"<t>.<body>", as Stripe signs webhooks; receivers check it with the tenant's secret.

Where a webhook may go (the gateway must not be a proxy into its own network):

- The URL is http:// or https://, at most MAX_URL_LENGTH characters, has a host name, and
  carries no `user:password@` and no `.`/`..` path segments.
- A URL sent with a request (`CreateVideo.webhook_url`) is accepted only if it is the one
  registered for the tenant (`videomesh tenants add NAME --webhook URL`) or matches the
  operator's allow-list (`webhook_allow`: URL prefixes such as `https://hooks.example.com/`, or
  host patterns such as `hooks.example.com`, `*.example.com`, `*` for any host).
- Every address the host name resolves to must be public: loopback, private, link-local
  (cloud metadata at 169.254.169.254), multicast, reserved, unspecified and other
  non-global ranges are refused, also when embedded in IPv6 (::ffff:a.b.c.d, 64:ff9b::/96,
  6to4, Teredo), unless the operator sets `webhook_allow_private` (local trials).
- The POST goes to an address that was checked (the connection is pinned to it, with the
  name kept for the Host header, TLS SNI and certificate check), so a name that resolves to a
  public address at the check and to 127.0.0.1 a moment later (DNS rebinding) cannot
  redirect it; the check runs again at each delivery attempt.
- Redirects are not followed (http.client never follows one); a 3xx counts as a failed
  delivery and is not retried. Proxy variables (HTTP_PROXY…) are not used.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

log = logging.getLogger("videomesh.webhooks")

MAX_URL_LENGTH = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookRefused(ValueError):
    """A webhook URL or target that the policy refuses; the message says what is allowed."""


class Unresolvable(WebhookRefused):
    """The host name does not resolve (now): refused at CreateVideo, retried at delivery."""


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


# --- the URL --------------------------------------------------------------------------------------
def parse_url(url: str) -> urllib.parse.SplitResult:
    """Syntax checks that need no network: scheme, length, host, no credentials; WebhookRefused if not."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"webhook_url has {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        raise WebhookRefused(
            "webhook_url must not contain spaces, control or non-ASCII characters (percent-encode them; "
            "write an international host name in its xn-- form)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        raise WebhookRefused(f"webhook_url is not a valid URL: {err}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookRefused("webhook_url must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise WebhookRefused("webhook_url must not carry credentials (user:password@)")
    if not parts.hostname:
        raise WebhookRefused("webhook_url has no host name")
    segments = urllib.parse.unquote(parts.path).split("/")
    if "." in segments or ".." in segments:
        raise WebhookRefused("webhook_url must not contain '.' or '..' path segments")
    return parts


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme.lower() == "https" else 80)


def canonical(url: str) -> str:
    """scheme://host[:port]/path?query with the scheme and host lower-cased and the default port dropped."""
    p = parse_url(url)
    scheme, host, port = p.scheme.lower(), p.hostname.lower(), _port(p)
    host = f"[{host}]" if ":" in host else host
    netloc = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
    return urllib.parse.urlunsplit((scheme, netloc, p.path or "/", p.query, ""))


def check_allow_entries(allow: tuple[str, ...]) -> None:
    """ValueError for an allow-list entry that is neither an http(s) URL prefix nor a host pattern."""
    for entry in allow:
        if "://" in entry:
            try:
                parse_url(entry)
            except WebhookRefused as err:
                raise ValueError(f"webhook_allow entry {entry!r}: {err}") from None
        elif not entry or "/" in entry or "@" in entry or "*" in entry[1:]:
            raise ValueError(
                f"webhook_allow entry {entry!r} must be a URL prefix (https://host/path) or a host pattern "
                "(host, *.domain or *)"
            )


def _host_matches(pattern: str, host: str, port: int) -> bool:
    pattern = pattern.lower()
    want_port = None
    if not pattern.startswith("[") and pattern.count(":") == 1:
        pattern, _, p = pattern.partition(":")
        want_port = int(p) if p.isdigit() else -1
    if want_port is not None and want_port != port:
        return False
    pattern = pattern.strip("[]")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def allowed_by(url: str, allow: tuple[str, ...]) -> bool:
    """Does `url` match an allow-list entry? URL prefixes match whole path segments only."""
    p = parse_url(url)
    host, port = p.hostname.lower(), _port(p)
    for entry in allow:
        if "://" not in entry:
            if _host_matches(entry, host, port):
                return True
            continue
        e = urllib.parse.urlsplit(entry)
        if (e.scheme.lower(), (e.hostname or "").lower(), _port(e)) != (p.scheme.lower(), host, port):
            continue
        prefix, path = e.path or "/", p.path or "/"
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return True
    return False


# --- the addresses --------------------------------------------------------------------------------
def address_refusal(addr: str) -> str | None:
    """Why an address is not a public one ("loopback", "private"…), or None if it is."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_refusal(str(embedded))
            if why:
                return why
    for name, bad in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                      ("private", ip.is_private), ("reserved", ip.is_reserved),
                      ("not globally routable", not ip.is_global)):  # fmt: skip
        if bad:
            return name
    return None


def resolve(host: str, port: int, *, allow_private: bool = False) -> list[tuple]:
    """Every (family, sockaddr) of host:port, each checked; WebhookRefused if any is not public.

    All of them are checked, not only the first, so a name cannot hide an internal address
    behind a public one; callers connect only to what this returned."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise Unresolvable(f"webhook host {host!r} does not resolve ({err})") from None
    out = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        why = None if allow_private else address_refusal(sockaddr[0])
        if why:
            raise WebhookRefused(
                f"webhook host {host!r} resolves to {sockaddr[0]}, a {why} address; webhooks go only to "
                "public addresses"
            )
        if (family, sockaddr) not in out:
            out.append((family, sockaddr))
    if not out:
        raise WebhookRefused(f"webhook host {host!r} has no IPv4 or IPv6 address")
    return out


def check_request_url(
    url: str, *, registered: str = "", allow: tuple[str, ...] = (), allow_private: bool = False
) -> str:
    """The policy for a URL sent with a request; returns it, or raises WebhookRefused saying what is allowed."""
    parts = parse_url(url)
    same = False
    if registered:
        try:
            same = canonical(url) == canonical(registered)
        except WebhookRefused:
            same = False
    if not same and not allowed_by(url, allow):
        what = "the URL registered for your tenant (`videomesh tenants add NAME --webhook URL`)"
        if allow:
            what += " or one on the operator's allow-list (webhook_allow)"
        raise WebhookRefused(f"webhook_url to {parts.hostname} is not allowed; use {what}")
    resolve(parts.hostname, _port(parts), allow_private=allow_private)
    return url


def redact(url: str) -> str:
    """scheme://host/path for logs: no query (it may carry a token), bounded length."""
    try:
        p = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((p.scheme, p.hostname or "", p.path, "", ""))[:200]
    except ValueError:
        return url[:80] + "…"


# --- the connection -------------------------------------------------------------------------------
class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address checked beforehand; the Host header keeps the name."""

    def __init__(self, host: str, port: int, sockaddr: tuple, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._sockaddr = sockaddr

    def connect(self) -> None:
        self.sock = socket.create_connection(self._sockaddr[:2], self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As _PinnedHTTP, with TLS: SNI and the certificate check use the name, not the address."""

    def __init__(self, host: str, port: int, sockaddr: tuple, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._sockaddr = sockaddr

    def connect(self) -> None:
        sock = socket.create_connection(self._sockaddr[:2], self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class NotDelivered(Exception):
    """A delivery that must not be retried (refused target, redirect)."""


@dataclass
class Delivery:
    url: str
    secret: str
    payload: dict
    attempt: int = 0


class WebhookSender:
    def __init__(self, *, attempts: int = 5, backoff: float = 0.5, timeout: float = 5.0, max_queue: int = 10_000,
                 allow_private: bool = False, ssl_context: ssl.SSLContext | None = None):  # fmt: skip
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.allow_private = allow_private
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self.delivered = 0
        self.failed = 0
        self.refused = 0  # deliveries not attempted: the target is not allowed (counted in failed too)
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def send(self, url: str, secret: str, payload: dict) -> None:
        try:
            self._q.put_nowait((time.monotonic(), Delivery(url, secret, payload)))
        except queue.Full:
            self.failed += 1
            log.error("webhook queue full; dropped delivery to %s", redact(url))

    def close(self) -> None:
        self._stop.set()

    def _post(self, d: Delivery) -> None:
        try:
            parts = parse_url(d.url)
            targets = resolve(parts.hostname, _port(parts), allow_private=self.allow_private)
        except Unresolvable:
            raise  # DNS may answer at the next attempt
        except WebhookRefused as err:
            raise NotDelivered(str(err)) from None
        body = json.dumps(d.payload, separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "X-Videomesh-Signature": sign(d.secret, body, int(time.time())),
                   "X-Videomesh-Delivery-Attempt": str(d.attempt + 1), "User-Agent": "videomesh-webhooks"}  # fmt: skip
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        err: Exception | None = None
        for sockaddr in (t[1] for t in targets):
            if parts.scheme.lower() == "https":
                conn = _PinnedHTTPS(parts.hostname, _port(parts), sockaddr, self.timeout, self.ssl_context)
            else:
                conn = _PinnedHTTP(parts.hostname, _port(parts), sockaddr, self.timeout)
            # a receiver that drips its answer byte by byte must not hold the delivery thread
            watchdog = threading.Timer(3 * self.timeout, _abort, args=(conn,))
            watchdog.start()
            try:
                try:
                    conn.connect()
                except OSError as e:  # this address does not answer: try the next checked one
                    err = e
                    continue
                conn.request("POST", path, body=body, headers=headers)
                status = conn.getresponse().status
            finally:
                watchdog.cancel()
                conn.close()
            if 300 <= status < 400:
                raise NotDelivered(f"HTTP {status}: redirects are not followed; register the final URL")
            if status >= 300:
                raise RuntimeError(f"HTTP {status}")
            return
        raise err or RuntimeError("no address to connect to")

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
                except NotDelivered as e:
                    self.failed += 1
                    self.refused += 1
                    log.error("webhook to %s not delivered: %s", redact(d.url), e)
                except Exception as e:  # noqa: BLE001 - any other failure is retried
                    d.attempt += 1
                    if d.attempt >= self.attempts:
                        self.failed += 1
                        log.error("webhook to %s failed after %d attempts: %s", redact(d.url), d.attempt, e)
                    else:
                        pending.append((now + self.backoff * 2 ** (d.attempt - 1), d))


def _abort(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
