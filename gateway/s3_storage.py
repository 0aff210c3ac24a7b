"""S3 object storage through the `minio` client (MinIO, AWS S3, SeaweedFS, any S3-compatible store).

Uploads stream from the finished file in multipart chunks; an S3 object only becomes
visible when its upload completes, so a failed upload never leaves a half-written result.
SHA-256 and MD5 travel as object metadata for audit. Links are presigned GETs that expire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from gateway.storage import Storage, StoredObject, digests
from videomesh.errors import NotFound, Unavailable

log = logging.getLogger("videomesh.storage.s3")


class S3Storage(Storage):
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *, secure: bool = False,
                 url_expiry: float = 3600.0, attempts: int = 3, backoff: float = 0.5, part_size: int = 8 * 1024 * 1024,
                 public_url: str = "", region: str = ""):  # fmt: skip
        """`public_url` (scheme://host[:port]): where users download from when that is not `endpoint` (an
        ingress or proxy in front of the store that passes the Host header through). A presigned link
        signs its host, so links are signed for that address, offline, for `region` (default: the bucket's
        region as the store reports it at start-up)."""
        from minio import Minio

        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region or None)  # fmt: skip
        self.signer = self.client
        self._public = public_endpoint(public_url) if public_url else None
        self._keys = (access_key, secret_key)
        self.bucket = bucket
        self.url_expiry = url_expiry
        self.attempts = attempts
        self.backoff = backoff
        self.part_size = part_size
        self._retry(
            lambda: self.client.bucket_exists(bucket) or self.client.make_bucket(bucket), "create bucket"
        )
        if self._public:
            host, https = self._public
            # minio asks the store for a bucket's region (GetBucketLocation) unless it is given one; the public
            # host may not be reachable from here, so the signer gets the region the internal client found
            found = region or self._retry(lambda: self.client._get_region(bucket), "bucket region lookup")
            self.signer = Minio(host, access_key=self._keys[0], secret_key=self._keys[1], secure=https,
                                region=found)  # fmt: skip

    def _retry(self, fn, what: str):
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - network and S3 errors alike are retried, then reported
                if _is_not_found(err):
                    raise NotFound(f"object not found: {err}") from err
                if attempt == self.attempts:
                    raise Unavailable(
                        f"object storage: {what} failed after {attempt} attempts: {err}",
                        reason="STORAGE_UNAVAILABLE",
                    ) from err
                log.warning("object storage: %s failed (attempt %d): %s", what, attempt, err)
                time.sleep(self.backoff * 2 ** (attempt - 1))

    def put_file(
        self, key: str, path: Path, *, content_type: str = "video/mp4", metadata: dict | None = None
    ) -> StoredObject:
        sha, md5, size = digests(path)
        meta = {"sha256": sha, "md5": md5, **(metadata or {})}
        self._retry(lambda: self.client.fput_object(self.bucket, key, str(path), content_type=content_type, metadata=meta,
                                                    part_size=self.part_size), f"upload of {key}")  # fmt: skip
        return StoredObject(
            uri=f"s3://{self.bucket}/{key}", url=self.url(key), sha256=sha, md5=md5, size=size
        )

    def url(self, key: str) -> str:
        return self.signer.presigned_get_object(self.bucket, key, expires=timedelta(seconds=self.url_expiry))

    def copy(self, src_key: str, dst_key: str) -> StoredObject:
        from minio.commonconfig import CopySource

        st = self._retry(lambda: self.client.stat_object(self.bucket, src_key), f"stat of {src_key}")
        self._retry(
            lambda: self.client.copy_object(self.bucket, dst_key, CopySource(self.bucket, src_key)),
            f"copy to {dst_key}",
        )
        meta = {k.lower().removeprefix("x-amz-meta-"): v for k, v in (st.metadata or {}).items()}
        return StoredObject(uri=f"s3://{self.bucket}/{dst_key}", url=self.url(dst_key), sha256=meta.get("sha256", ""),
                            md5=meta.get("md5", ""), size=st.size)  # fmt: skip

    def stat(self, key: str) -> dict:
        st = self._retry(lambda: self.client.stat_object(self.bucket, key), f"stat of {key}")
        return {"size": st.size, "metadata": {k.lower(): v for k, v in (st.metadata or {}).items()}}

    def delete(self, key: str) -> None:
        self._retry(lambda: self.client.remove_object(self.bucket, key), f"delete of {key}")

    def read(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        resp = self._retry(lambda: self.client.get_object(self.bucket, key), f"download of {key}")
        try:
            yield from resp.stream(chunk)
        finally:
            resp.close()
            resp.release_conn()


def public_endpoint(url: str) -> tuple[str, bool]:
    """'https://videos.example.com[:port]' -> ('videos.example.com[:port]', True); ValueError otherwise."""
    u = urlsplit(url)
    try:
        u.port  # noqa: B018 - ValueError for a port that is not a number in 0..65535
    except ValueError:
        u = None
    if (
        u is None
        or u.scheme not in ("http", "https")
        or not u.hostname
        or "@" in u.netloc
        or u.path not in ("", "/")
        or u.query
        or u.fragment
    ):
        raise ValueError(f"s3_public_url must be http(s)://host[:port] with nothing after it; got {url!r}")
    return u.netloc, u.scheme == "https"


def _is_not_found(err: Exception) -> bool:
    return getattr(err, "code", "") in ("NoSuchKey", "NoSuchObject")
