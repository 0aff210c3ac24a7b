"""A client that goes away in the middle of a streaming call (cancelled, deadline, its process killed)
is not a server error: the service says so in one line, without an 'unhandled error' traceback."""

import queue
import threading
import time

from tests.helpers import start_service
from videomesh import serving
from videomesh.client import channel
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


def test_a_client_cancelling_mid_stream_is_not_an_internal_error(monkeypatch):
    said = _Recorder()
    monkeypatch.setattr(serving, "log", said)
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
        ended = ("info", "/videomesh.v1.QualityCheck/Inspect: the client ended the call")
        deadline = time.monotonic() + 60
        while ended not in said.lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ended in said.lines, f"{call.code()}: {said.lines}"
        assert not [line for line in said.lines if line[0] == "exception"], said.lines
        ch.close()
    finally:
        stop()
