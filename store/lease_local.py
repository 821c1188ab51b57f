"""Writer-lease records in a directory on a local disk or NFS (the S3 twin is ``lease_s3.py``)."""

from __future__ import annotations

import os
import uuid


class LocalLeaseDir:
    """Records in a directory on a local disk or NFS (exclusive create by ``os.link``)."""

    def __init__(self, path: str):
        self.path = path

    def __str__(self) -> str:
        return self.path

    def _file(self, gen: int) -> str:
        return os.path.join(self.path, f"gen-{gen:012d}.json")

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(int(n[4:-5]) for n in names if n.startswith("gen-") and n.endswith(".json"))

    def exists(self, gen: int) -> bool:
        return os.path.exists(self._file(gen))

    def read(self, gen: int) -> bytes | None:
        try:
            with open(self._file(gen), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def _tmp(self, data: bytes) -> str:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the store's writer lease directory {self.path}: {exc}") from exc
        tmp = os.path.join(self.path, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def create(self, gen: int, data: bytes) -> bool:
        """Create generation ``gen`` with ``data`` unless it exists; complete on appearance."""
        tmp = self._tmp(data)
        try:
            os.link(tmp, self._file(gen))  # atomic and exclusive, on NFS too (unlike O_EXCL on NFSv2)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS may report an error for a link whose reply was lost: the link count tells.
            if os.stat(tmp).st_nlink == 2:
                return True
            raise
        finally:
            os.unlink(tmp)

    def replace(self, gen: int, data: bytes) -> None:
        os.replace(self._tmp(data), self._file(gen))  # only ever our own record

    def delete(self, gen: int) -> None:
        try:
            os.unlink(self._file(gen))
        except FileNotFoundError:
            pass
