"""Webhook SSRF (issue 18, item 15): where a webhook may go, checked at CreateVideo and at delivery.

The policy is tested on its own, then at CreateVideo through an in-process gateway (gRPC,
INVALID_ARGUMENT naming `webhook_url`), then delivery with real local HTTP servers:
no redirect is followed, and a name that re-resolves to loopback (DNS rebinding) is not posted to.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time

import grpc
import pytest

from gateway.webhooks import WebhookRefused, WebhookSender, address_refusal, allowed_by, check_request_url
from tests.helpers import InProcessMesh
from videomesh.errors import details_of
from videomesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PUBLIC = "93.184.216.34"  # a globally routable address (nothing connects to it in these tests)
_real_getaddrinfo = socket.getaddrinfo


def fake_dns(monkeypatch, table: dict):
    """Resolve the names in `table` (a value is an address, or a callable giving one per call); the
    rest as usual. Patches socket.getaddrinfo, which the webhook code calls at every check."""
    calls: dict[str, int] = {}

    def getaddrinfo(host, port, *args, **kwargs):
        if host in table:
            calls[host] = calls.get(host, 0) + 1
            addr = table[host]
            addr = addr(calls[host]) if callable(addr) else addr
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sockaddr = (addr, int(port), 0, 0) if family == socket.AF_INET6 else (addr, int(port))
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
        return _real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


# --- the policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "addr,why",
    [("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
     ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
     ("0.0.0.0", "unspecified"), ("240.0.0.1", "private"), ("100.64.0.1", "not globally routable"),
     ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a00:1", "private"), ("2002:7f00:1::", "loopback")],
)  # fmt: skip
def test_non_public_addresses_are_named(addr, why):
    assert address_refusal(addr) == why


def test_public_addresses_pass():
    assert address_refusal(PUBLIC) is None and address_refusal("2606:4700:4700::1111") is None


def test_url_syntax_length_and_credentials():
    bad = {
        "http://example.com/" + "a" * 100_000: "limit is 2048",
        "ftp://example.com/x": "http:// or https://",
        "file:///etc/passwd": "http:// or https://",
        "https://user:pw@example.com/": "credentials",
        "https://example.com/a b": "spaces",
        "http:///nohost": "no host",
        "http://example.com:99999/": "not a valid URL",
        "https://example.com/hooks/../admin": "path segments",
    }
    for url, words in bad.items():
        with pytest.raises(WebhookRefused, match=words):
            check_request_url(url, allow=("*",), allow_private=True)


def test_allow_list_prefixes_match_whole_segments_and_host_patterns():
    allow = ("https://hooks.example.com/vm", "*.partner.test", "exact.test:8443")
    assert allowed_by("https://hooks.example.com/vm", allow)
    assert allowed_by("https://HOOKS.example.com:443/vm/job?x=1", allow)
    assert not allowed_by("https://hooks.example.com/vmx", allow)
    assert not allowed_by("http://hooks.example.com/vm", allow)  # another scheme
    assert not allowed_by("https://hooks.example.com:8443/vm", allow)  # another port
    assert not allowed_by("https://hooks.example.com.evil.test/vm", allow)
    assert allowed_by("https://a.b.partner.test/x", allow)
    assert not allowed_by("https://partner.test/x", allow) and not allowed_by(
        "https://evilpartner.test/", allow
    )
    assert allowed_by("https://exact.test:8443/", allow) and not allowed_by("https://exact.test/", allow)


def test_every_resolved_address_is_checked(monkeypatch):
    """A name with a public and a private address is refused: an attacker cannot hide 10.x behind 93.x."""

    def two(host, port, *a, **k):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]  # fmt: skip

    monkeypatch.setattr(socket, "getaddrinfo", two)
    with pytest.raises(WebhookRefused, match="10.0.0.5, a private address"):
        check_request_url("https://mixed.test/h", allow=("*",))


def test_numeric_host_spellings_resolve_to_what_they_are():
    for host in ("127.0.0.1", "2130706433", "0x7f000001", "127.1", "[::1]", "[::ffff:127.0.0.1]"):
        with pytest.raises(WebhookRefused, match="loopback|unspecified|private"):
            check_request_url(f"http://{host}:8080/x", allow=("*",))


def test_allow_entries_are_checked_at_start():
    from gateway.gateway import GatewaySettings

    GatewaySettings(webhook_allow=("https://hooks.example.com/", "*.example.com", "*")).validate()
    for bad in ("ftp://x/", "a*b.com", "https://u:p@x.com/"):
        with pytest.raises(ValueError, match="webhook_allow"):
            GatewaySettings(webhook_allow=(bad,)).validate()


def test_settings_read_from_the_environment():
    from videomesh.launch import load_settings

    s = load_settings("gateway", env={"VIDEOMESH_GATEWAY_WEBHOOK_ALLOW": "https://a.test/hook,*.b.test",
                                      "VIDEOMESH_GATEWAY_WEBHOOK_ALLOW_PRIVATE": "1"})  # fmt: skip
    assert s.webhook_allow == ("https://a.test/hook", "*.b.test") and s.webhook_allow_private is True
    assert load_settings("gateway", env={}).webhook_allow_private is False


# --- at CreateVideo -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hook_mesh(tmp_path_factory):
    m = InProcessMesh(
        tmp_path_factory.mktemp("hooks"),
        gateway={"webhook_allow": ("*.allowed.test",), "webhook_attempts": 1},
    )
    yield m
    m.stop()


def _create(mesh, key: str, url: str):
    with grpc.insecure_channel(mesh.address) as ch:
        req = gateway_pb2.CreateVideoRequest(
            spec=common_pb2.VideoSpec(prompt="a red ball moves left", seed=3, num_steps=1), webhook_url=url
        )
        return gateway_pb2_grpc.VideoServiceStub(ch).CreateVideo(
            req, metadata=[("authorization", f"Bearer {key}")], timeout=30
        )


def _refused(mesh, key, url) -> str:
    with pytest.raises(grpc.RpcError) as e:
        _create(mesh, key, url)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "webhook_url" in [f for f, _ in details_of(e.value)["violations"]]
    return e.value.details()


def test_create_refuses_loopback_even_when_registered(hook_mesh):
    key = hook_mesh.tenants.add("loop", "pro", webhook_url="http://127.0.0.1:8080/admin")
    assert "loopback" in _refused(hook_mesh, key, "http://127.0.0.1:8080/admin")
    assert "not allowed" in _refused(hook_mesh, key, "http://127.0.0.1:9000/other")  # not registered
    assert "not allowed" in _refused(hook_mesh, key, "http://localhost:8080/admin")
    meta = hook_mesh.tenants.add("meta", "pro", webhook_url="http://169.254.169.254/latest/meta-data/")
    assert "link-local" in _refused(hook_mesh, meta, "http://169.254.169.254/latest/meta-data/")


def test_create_refuses_a_100_kb_url(hook_mesh):
    key = hook_mesh.tenants.add("longurl", "pro")
    details = _refused(hook_mesh, key, "https://x.allowed.test/" + "a" * 100_000)
    assert "2048" in details and len(details) < 500  # the URL itself is not echoed back


def test_create_refuses_unregistered_url_and_says_what_is_allowed(hook_mesh, monkeypatch):
    fake_dns(monkeypatch, {"elsewhere.example.com": PUBLIC})
    key = hook_mesh.tenants.add("unreg", "pro", webhook_url="https://mine.example.com/hook")
    details = _refused(hook_mesh, key, "https://elsewhere.example.com/hook")
    assert "registered for your tenant" in details and "allow-list" in details


def test_create_accepts_registered_and_allow_listed_public_urls(hook_mesh, monkeypatch):
    fake_dns(
        monkeypatch,
        {"hooks.customer.test": PUBLIC, "cb.allowed.test": PUBLIC, "int.allowed.test": "10.9.8.7"},
    )
    _no_outbound(monkeypatch)
    key = hook_mesh.tenants.add("reg", "pro", webhook_url="https://hooks.customer.test/videomesh")
    sender = hook_mesh.gateway.webhooks
    failed = sender.failed
    v = _create(hook_mesh, key, "https://HOOKS.customer.test:443/videomesh")
    assert v.status == common_pb2.QUEUED
    assert hook_mesh.gateway.store.load(v.id).webhook == "https://HOOKS.customer.test:443/videomesh"
    w = _create(hook_mesh, key, "https://cb.allowed.test/any/path")
    assert w.status == common_pb2.QUEUED
    assert "private" in _refused(hook_mesh, key, "https://int.allowed.test/x")  # allow-listed, but internal
    for vid in (v.id, w.id):  # end them here, so that their deliveries run under this test's fake DNS
        hook_mesh.gateway.cancel("reg", vid)
    assert _wait(lambda: sender.failed == failed + 2, timeout=30)


def _no_outbound(monkeypatch):
    """The public test address never gets a connection: it is refused as if nothing listened."""
    real = socket.create_connection

    def create_connection(address, *a, **k):
        if address[0] == PUBLIC:
            raise ConnectionRefusedError("no outbound connections from tests")
        return real(address, *a, **k)

    monkeypatch.setattr(socket, "create_connection", create_connection)


def test_registered_webhook_that_rebinds_to_loopback_is_not_delivered(hook_mesh, monkeypatch, caplog):
    """Public at CreateVideo, 127.0.0.1 when the job ends: nothing is posted, the refusal is logged."""
    server, got = _server(204)
    port = server.server_port
    fake_dns(monkeypatch, {"rebind.customer.test": lambda n: PUBLIC if n == 1 else "127.0.0.1"})
    key = hook_mesh.tenants.add("rebind", "pro", webhook_url=f"http://rebind.customer.test:{port}/hook")
    caplog.set_level(logging.ERROR, logger="videomesh.webhooks")
    sender = hook_mesh.gateway.webhooks
    refused = sender.refused
    try:
        v = _create(hook_mesh, key, f"http://rebind.customer.test:{port}/hook")
        deadline = time.monotonic() + 60
        while sender.refused == refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hook_mesh.gateway.get("rebind", v.id).status in (common_pb2.SUCCEEDED, common_pb2.NEEDS_REVIEW)
        assert sender.refused == refused + 1 and got == []
        assert any("127.0.0.1, a loopback address" in r.getMessage() for r in caplog.records)
    finally:
        server.shutdown()


# --- delivery -----------------------------------------------------------------------------------
def _server(status: int, location: str = ""):
    got: list[tuple[str, str]] = []

    class H(http.server.BaseHTTPRequestHandler):
        def _any(self):
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            got.append((self.command, self.path))
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET = do_PUT = _any  # noqa: N815

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, got


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_redirect_is_not_followed():
    internal, internal_got = _server(200)
    outer, outer_got = _server(302, location=f"http://127.0.0.1:{internal.server_port}/admin")
    sender = WebhookSender(attempts=3, backoff=0.05, timeout=2.0, allow_private=True)
    try:
        sender.send(f"http://127.0.0.1:{outer.server_port}/hook", "s", {"type": "video.succeeded"})
        assert _wait(lambda: sender.failed == 1)
        time.sleep(0.3)  # a retry (backoff 0.05 s) or a follow-up request would have come by now
        assert outer_got == [("POST", "/hook")]  # posted once, not retried
        assert internal_got == []  # the redirect target never hears from the gateway
        assert sender.delivered == 0
    finally:
        sender.close()
        internal.shutdown()
        outer.shutdown()


def test_delivery_with_private_targets_allowed_posts_once():
    server, got = _server(204)
    sender = WebhookSender(attempts=2, backoff=0.05, allow_private=True)
    try:
        sender.send(f"http://localhost:{server.server_port}/h?token=x", "s", {"a": 1})
        assert _wait(lambda: sender.delivered == 1) and got == [("POST", "/h?token=x")]
    finally:
        sender.close()
        server.shutdown()


def test_delivery_refuses_loopback_by_default():
    server, got = _server(204)
    sender = WebhookSender(attempts=2, backoff=0.05)
    try:
        sender.send(f"http://127.0.0.1:{server.server_port}/h", "s", {"a": 1})
        assert _wait(lambda: sender.failed == 1)
        assert got == [] and sender.refused == 1
    finally:
        sender.close()
        server.shutdown()


def test_dns_rebinding_between_check_and_connect(monkeypatch):
    """The name answers public for the check and 127.0.0.1 right after (TTL 0): the POST must go to
    the address that was checked, never to a second lookup's answer."""
    server, got = _server(204)
    calls = fake_dns(monkeypatch, {"rebind.test": lambda n: PUBLIC if n == 1 else "127.0.0.1"})
    connected: list = []
    real_connect = socket.create_connection

    def create_connection(address, *a, **k):
        connected.append(address[0])
        if address[0] == PUBLIC:  # no network here: the public host does not answer
            raise ConnectionRefusedError("unreachable in the test")
        return real_connect(address, *a, **k)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    sender = WebhookSender(attempts=1, backoff=0.05, timeout=2.0)
    try:
        sender.send(f"http://rebind.test:{server.server_port}/hook", "s", {"a": 1})
        assert _wait(lambda: sender.failed == 1)
        assert got == []  # loopback never got the POST
        assert connected == [PUBLIC] and calls["rebind.test"] == 1  # one lookup; connected to what it checked
    finally:
        sender.close()
        server.shutdown()


def test_a_tenant_directory_blip_never_signs_a_webhook_with_an_empty_key(monkeypatch):
    """With the tenants in PostgreSQL, the lookup of the webhook's secret may meet the database down:
    it is retried, and never replaced by an empty signing key."""
    import threading
    from types import SimpleNamespace

    from gateway.runner import JobRunner
    from gateway.tenants import Tenant
    from videomesh.errors import Unavailable
    from videomesh.v1 import common_pb2, gateway_pb2

    sent = []
    answers = []

    def get(name):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    tenant = Tenant("acme", "pro", "https://hooks.example.com/vm", "whsec_real")
    gw = SimpleNamespace(tenants=SimpleNamespace(get=get),
                         webhooks=SimpleNamespace(send=lambda url, secret, payload: sent.append((url, secret))))  # fmt: skip
    runner = SimpleNamespace(gw=gw, stopping=threading.Event())
    runner.stopping.wait = lambda t: None  # no real back-off in a unit test
    job = SimpleNamespace(id="v1", tenant="acme", webhook="", tier="pro")
    video = gateway_pb2.Video(id="v1", status=common_pb2.SUCCEEDED)

    answers[:] = [Unavailable("db down"), Unavailable("db down"), tenant]
    JobRunner.terminal(runner, job, video)
    assert sent == [("https://hooks.example.com/vm", "whsec_real")]

    sent.clear()
    answers[:] = [Unavailable("db down")] * 4
    JobRunner.terminal(runner, job, video)
    assert sent == []  # not sent (and logged), rather than signed with ""
