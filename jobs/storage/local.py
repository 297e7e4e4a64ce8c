"""A local directory as the output store: a finished temp file is published with ``os.link``,
which fails if the name is taken, so an image is never overwritten or seen half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from jobs.errors import ObjectExists, StorageError
from jobs.storage.base import CHUNK, check_digest, check_key, check_prefix, invalid, os_error


class LocalStore:
    """A directory; a finished temp file is published with ``os.link``, which fails if taken."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = Path(root).expanduser().resolve()

    def uri(self, key: str) -> str:
        return str(self.base / check_key(key))

    def put_new(self, key: str, data: bytes, content_type: str, sha256_hex: str) -> None:
        path = self._path(key)
        check_digest(data, sha256_hex, str(path))  # S3 checks this server-side; we do it here
        temp = self._write_temp(path, lambda out: out.write(data))
        try:
            os.link(temp, path)
        except FileExistsError:
            if self.sha256_of(key) != sha256_hex.lower():
                raise ObjectExists(f"{path} already exists with other bytes") from None
        except OSError as exc:
            raise os_error(exc, path) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        _fsync_dir(path.parent)

    def copy_new(self, source: str, key: str, sha256_hex: str, size: int) -> None:
        origin, path = self._path(source), self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(origin, path)
        except FileExistsError:
            if self.sha256_of(key) != sha256_hex.lower():
                raise ObjectExists(f"{path} already exists with other bytes") from None
            return
        except FileNotFoundError:
            raise invalid(f"cannot copy {origin}: it is not there") from None
        except OSError:
            # No hard links here (another device, a filesystem without them): copy the bytes.
            data = self.get(source)
            if data is None:
                raise invalid(f"cannot copy {origin}: it is not there") from None
            self.put_new(key, data, "", sha256_hex)
            return
        if path.stat().st_size != size:
            path.unlink()
            raise StorageError(f"refusing to copy {origin}: it is not the size it was stored with")
        _fsync_dir(path.parent)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, path) from exc

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        self._replace(path, self._write_temp(path, lambda out: out.write(data)))

    def put_file(self, key: str, path: str, content_type: str) -> None:
        target = self._path(key)
        try:
            with open(path, "rb") as source:
                temp = self._write_temp(target, lambda out: shutil.copyfileobj(source, out, CHUNK))
        except OSError as exc:
            raise os_error(exc, Path(path)) from exc
        self._replace(target, temp)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error(exc, path) from exc

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as source:
                source.seek(start)
                return source.read(max(0, end - start))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error(exc, path) from exc

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            with open(path, "rb") as source:
                while chunk := source.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            return
        except OSError as exc:
            raise os_error(exc, path) from exc

    def sha256_of(self, key: str) -> str | None:
        path = self._path(key)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as source:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error(exc, path) from exc
        return digest.hexdigest()

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Like S3: every file whose key starts with ``prefix``, in key order; temp files hidden."""
        folder = self.base.joinpath(*check_prefix(prefix).split("/")[:-1])
        if not folder.is_dir():
            return
        keys: list[str] = []
        for directory, _dirs, files in os.walk(folder):
            for name in files:
                if name.startswith(".") and name.endswith(".part"):
                    continue
                key = Path(directory, name).relative_to(self.base).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def list_children(self, prefix: str) -> Iterator[str]:
        folder = self.base.joinpath(*[p for p in check_prefix(prefix).split("/") if p])
        if not folder.is_dir():
            return
        yield from sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())

    def _path(self, key: str) -> Path:
        path = self.base.joinpath(*check_key(key).split("/"))
        if self.base not in path.parents:
            raise StorageError(f"key {key!r} escapes {self.base}")
        return path

    def _write_temp(self, path: Path, write: Callable[[BinaryIO], object]) -> Path:
        """Write, flush and fsync a hidden temp file next to ``path`` (same filesystem)."""
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # os.open with 0o666 honours the umask (mkstemp would force 0600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise os_error(exc, path) from exc
        return temp

    def _replace(self, path: Path, temp: Path) -> None:
        try:
            temp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise os_error(exc, path) from exc
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable; best effort (not every OS/filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
