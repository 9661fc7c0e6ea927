"""One storage code path for local directories and object-store URIs (s3://, gs://) via pyarrow.fs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Store:
    """A filesystem and a root path on it; all paths below are relative to the root."""

    uri: str
    fs: pafs.FileSystem
    root: str

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write(self, rel: str, data: bytes) -> None:
        """Write atomically: to a hidden temporary name, then rename (readers skip '.' names)."""
        final = self.path(rel)
        parent, name = final.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def list(self, rel: str) -> list[str]:
        """Names (not paths) of the visible entries directly under `rel`; [] if it does not exist."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector)]
        return sorted(n for n in names if not n.startswith((".", "_")))

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """An exclusive lock across processes, released if the holder dies (flock on local disk)."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            raise NotImplementedError(f"{self.uri}: locking needs a local or NFS path")
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def open_store(uri: str) -> Store:
    """A Store for a local path (created if missing) or a pyarrow-supported URI."""
    if "://" in uri and not uri.startswith("file://"):
        fs, root = pafs.FileSystem.from_uri(uri)
        return Store(uri, fs, root)
    # Absolute, so the same Store means the same place in Ray workers, whose cwd differs.
    root = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    os.makedirs(root, exist_ok=True)
    return Store(root, pafs.LocalFileSystem(), root)
