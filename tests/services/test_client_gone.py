"""A client that goes away in the middle of a streaming call (cancelled, deadline, its process killed)
is not a server error: the service says so in one line, without an 'unhandled error' traceback."""

import logging
import queue
import time

from tests.helpers import start_service
from videomesh.client import channel
from videomesh.v1 import qc_pb2, qc_pb2_grpc


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_a_client_cancelling_mid_stream_is_not_an_internal_error():
    server, stop = start_service("qc")
    try:
        ch = channel(server.address)
        stub = qc_pb2_grpc.QualityCheckStub(ch)
        requests: queue.Queue = queue.Queue()

        def stream():
            yield qc_pb2.InspectRequest(settings=qc_pb2.InspectSettings(fps=8.0, total_frames=4))
            while True:  # then nothing: the client never finishes its stream
                item = requests.get()
                if item is None:
                    return
                yield item

        caplog = _Lines()
        logger = logging.getLogger("videomesh.serving")
        old_level = logger.level
        logger.addHandler(caplog)
        logger.setLevel(logging.INFO)
        try:
            call = stub.Inspect.future(stream())
            time.sleep(0.5)  # the server is reading the request stream
            call.cancel()
            requests.put(None)
            deadline = time.monotonic() + 5
            while "the client ended the call" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            logger.removeHandler(caplog)
            logger.setLevel(old_level)
        assert "the client ended the call" in caplog.text
        assert "unhandled error" not in caplog.text
        ch.close()
    finally:
        stop()
