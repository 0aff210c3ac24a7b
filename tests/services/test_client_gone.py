"""A client that goes away in the middle of a streaming call (cancelled, deadline, its process killed)
is not a server error: the service says so in one line, without an 'unhandled error' traceback."""

import logging
import queue
import time

from tests.helpers import start_service
from videomesh import serving
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
        logger = (
            serving.log
        )  # the module's own logger (after Ray's logging set-up, getLogger may hand out another)
        old_level, old_disabled = logger.level, logger.disabled
        logger.addHandler(caplog)
        logger.setLevel(logging.INFO)
        logger.disabled = False  # another test's logging.config (Ray's) may have disabled existing loggers
        old_disable = logging.root.manager.disable
        logging.disable(logging.NOTSET)
        try:
            call = stub.Inspect.future(stream())
            # cancel only once the server's handler runs (a call cancelled before that never reaches it)
            deadline = time.monotonic() + 30
            while server.rpc_metrics.calls["Inspect"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)  # and is reading the request stream
            call.cancel()
            requests.put(None)
            deadline = time.monotonic() + 15
            while "the client ended the call" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            logger.removeHandler(caplog)
            logger.setLevel(old_level)
            logger.disabled = old_disabled
            logging.disable(old_disable)
        assert "the client ended the call" in caplog.text
        assert "unhandled error" not in caplog.text
        ch.close()
    finally:
        stop()
