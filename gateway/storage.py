"""Object storage for finished videos. The local-directory backend is the embedded default.

Objects are written under a temporary name and renamed into place only when complete, so
a failed upload never leaves a half-written file visible as a result.
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from videomesh.errors import NotFound


@dataclass(frozen=True)
class StoredObject:
    uri: str
    url: str
    sha256: str
    md5: str
    size: int


def digests(path: Path) -> tuple[str, str, int]:
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return sha.hexdigest(), md5.hexdigest(), size


class Storage(ABC):
    @abstractmethod
    def put_file(
        self, key: str, path: Path, *, content_type: str = "video/mp4", metadata: dict | None = None
    ) -> StoredObject: ...

    @abstractmethod
    def url(self, key: str) -> str: ...

    @abstractmethod
    def copy(self, src_key: str, dst_key: str) -> StoredObject: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def read(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in order, `chunk` at a time (NotFound if it is not there)."""


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise ValueError(f"object key escapes the storage root: {key!r}")
        return p

    def put_file(
        self, key: str, path: Path, *, content_type: str = "video/mp4", metadata: dict | None = None
    ) -> StoredObject:
        sha, md5, size = digests(path)
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)
        return StoredObject(uri=dest.as_uri(), url=dest.as_uri(), sha256=sha, md5=md5, size=size)

    def copy(self, src_key: str, dst_key: str) -> StoredObject:
        src = self._path(src_key)
        if not src.exists():
            raise NotFound(f"object {src_key!r} not found")
        return self.put_file(dst_key, src)

    def url(self, key: str) -> str:
        p = self._path(key)
        if not p.exists():
            raise NotFound(f"object {key!r} not found")
        return p.as_uri()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def read(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"object {key!r} not found") from None
        with f:
            while block := f.read(chunk):
                yield block
