"""``LeasedStoreWriter``: the driver's ``StoreWriter`` fenced by its writer lease.

Every mutation (var, array shapes, manifest) first checks the lease. Manifest writes are also
compare-and-set on a token: the lease token that wrote the manifest last is kept in the same
metadata write (``WRITER_KEY``); a writer refuses to commit when the stored token is not the one
it saw last. The writer "claims" the store as soon as it is built (one manifest write with its
token), so a previous holder that lost the lease but still runs fails its next commit even if its
own lease check were to pass.
"""

from __future__ import annotations

import json
import time

import tiledbsoma as soma

from . import schema
from .lease import WRITER_KEY, LeaseLost, WriterLease
from .store import StoreWriter, soma_context


def stored_writer_token(uri: str) -> str | None:
    """The lease token that wrote the store's manifest last (None: written without a lease)."""
    with soma.Experiment.open(uri, context=soma_context()) as exp:
        text = exp.metadata.get(WRITER_KEY)
    return None if text is None else json.loads(text)["token"]


class LeasedStoreWriter(StoreWriter):
    def __init__(self, uri: str, lease: WriterLease, organism: str = "homo_sapiens", create: bool = True):
        lease.check()
        self.lease = lease
        super().__init__(uri, organism=organism, create=create)
        self._seen_token = stored_writer_token(self.uri)
        time.sleep(0.002)  # metadata writes are ordered by millisecond: never share create_store's
        self.commit()
        if stored_writer_token(self.uri) != lease.token:
            # TileDB orders metadata writes by timestamp: a previous writer's later-stamped write
            # would hide ours (clocks of the two hosts apart by more than the takeover gap).
            raise LeaseLost(f"{self.uri}: the manifest written under lease generation {lease.generation} is not "
                            f"the one read back; are the clocks of the writing hosts synchronized?")

    def register_genes(self, feature_ids):
        self.lease.check()
        return super().register_genes(feature_ids)

    def _resize_x(self) -> None:
        self.lease.check()
        super()._resize_x()

    def commit(self) -> None:
        self.lease.check()
        stored = stored_writer_token(self.uri)
        if stored != self._seen_token:
            raise LeaseLost(f"{self.uri}: the manifest was written by lease token {stored} since this writer "
                            f"(lease generation {self.lease.generation}) last wrote it; not overwriting it")
        stamp = json.dumps({"token": self.lease.token, "generation": self.lease.generation,
                            "host": self.lease.record.host, "pid": self.lease.record.pid, "at": time.time()})
        with soma.Experiment.open(self.uri, "w", context=soma_context()) as exp:  # one write: same timestamp
            exp.metadata[schema.MANIFEST_KEY] = self.manifest.to_json()
            exp.metadata[WRITER_KEY] = stamp
        self._seen_token = self.lease.token
