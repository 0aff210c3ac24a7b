"""A client that goes away in the middle of a streaming call (cancelled, deadline, its process killed)
is not a server error: the service says so in one line, without an 'unhandled error' traceback."""

import queue
import threading
import time

from tests.helpers import start_service
from videomesh import serving
from videomesh.client import channel
from videomesh.metrics import REGISTRY
from videomesh.v1 import qc_pb2, qc_pb2_grpc


class _Recorder:
    """Stands in for serving's logger: what _abort said, whatever another test's logging set-up (Ray's
    dictConfig disables existing loggers) did to the real one meanwhile."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def _say(self, level, msg, *args, **_):
        self.lines.append((level, msg % args))

    def info(self, msg, *args, **kw):
        self._say("info", msg, *args, **kw)

    def exception(self, msg, *args, **kw):
        self._say("exception", msg, *args, **kw)

    def __getattr__(self, name):  # debug, warning, ...: recorded too
        return lambda msg, *args, **kw: self._say(name, msg, *args, **kw)


def _inspect_codes() -> dict[str, float]:
    """The QC servers' Inspect answers so far, by status code (this process's metrics)."""
    return {
        s.labels["code"]: s.value
        for m in REGISTRY.collect()
        if m.name == "videomesh_rpc_requests"
        for s in m.samples
        if s.name.endswith("_total")
        and s.labels.get("method") == "Inspect"
        and s.labels.get("service") == "qc"
    }


def test_a_client_cancelling_mid_stream_is_not_an_internal_error(monkeypatch):
    said = _Recorder()
    monkeypatch.setattr(serving, "log", said)
    before = _inspect_codes()

    def _answered() -> dict[str, float]:
        now = _inspect_codes()
        return {code: n - before.get(code, 0) for code, n in now.items() if n > before.get(code, 0)}

    server, stop = start_service("qc")
    try:
        ch = channel(server.address)
        stub = qc_pb2_grpc.QualityCheckStub(ch)
        requests: queue.Queue = queue.Queue()
        waiting = threading.Event()

        def stream():
            yield qc_pb2.InspectRequest(settings=qc_pb2.InspectSettings(fps=8.0, total_frames=4))
            waiting.set()  # the first message is sent; the client never finishes its stream
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        call = stub.Inspect.future(stream())
        # cancel only once the server's handler runs (a call cancelled before that never reaches it)
        deadline = time.monotonic() + 30
        while server.rpc_metrics.calls["Inspect"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.rpc_metrics.calls["Inspect"] == 1, "the handler never started"
        assert waiting.wait(30)
        time.sleep(0.5)  # and is reading the request stream
        call.cancel()
        requests.put(None)
        # the server is through with the call once it has counted its status
        deadline = time.monotonic() + 60
        while not _answered() and time.monotonic() < deadline:
            time.sleep(0.05)
        codes = _answered()
        assert sum(codes.values()) == 1, codes
        assert not [line for line in said.lines if line[0] == "exception"], said.lines  # no traceback
        assert not {"INTERNAL", "UNKNOWN"} & set(codes), codes
        ended = ("info", "/videomesh.v1.QualityCheck/Inspect: the client ended the call")
        # grpc-python may complete the pending read of the cancelled stream as a clean end before it marks
        # the call cancelled (grpc/_server.py: receive_message sets CLOSED, receive_close_on_server then
        # CANCELLED), so the servicer can see "no frames" and answer INVALID_ARGUMENT to nobody; when the
        # cancellation is seen first, the server says so in its one line
        assert ended in said.lines or set(codes) == {"INVALID_ARGUMENT"}, (codes, said.lines)
        ch.close()
    finally:
        stop()


def test_an_error_for_a_client_already_gone_is_said_once_and_not_answered(monkeypatch):
    """The race above, made deterministic: the servicer's own error (here the 'no frames' of a stream
    that looked ended) for a call whose client is gone is the client ending the call, not an answer."""
    from videomesh.errors import InvalidArgument

    said = _Recorder()
    monkeypatch.setattr(serving, "log", said)
    aborted = []
    gone = type(
        "Ctx", (), {"is_active": lambda self: False, "abort_with_status": lambda self, st: aborted.append(st)}
    )()
    assert serving._abort(gone, InvalidArgument("no frames to inspect", field="frames"), "/m/Inspect") is None
    assert said.lines == [("info", "/m/Inspect: the client ended the call")] and aborted == []
