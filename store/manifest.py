"""The store manifest: which sources are in the store, their cell ranges and status.

Kept as JSON in the Experiment's TileDB metadata, so it is versioned with the arrays: a reader
pinned to a timestamp sees the manifest of that moment. It is written by the ingest driver only,
under the store's writer lease (store/lease.py), and a source's status turns ``complete`` only after all its cells are written (written last).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from .schema import check_format

MANIFEST_FORMAT_VERSION = 2  # 2: SourceEntry.path (a later ingest finishes a dead run's source), counts fields
_READABLE_VERSIONS = (1, MANIFEST_FORMAT_VERSION)  # 1 reads with path "" (not resumable by others)

PENDING, COMPLETE, FAILED = "pending", "complete", "failed"


@dataclass
class SourceEntry:
    source_id: str
    kind: str  # "h5ad" | "census" | "synthetic"
    name: str  # file name, or census query description
    fingerprint: str  # content hash (h5ad) or query hash (census)
    size_bytes: int = 0
    status: str = PENDING
    n_cells: int = 0
    joinid_start: int = -1
    joinid_stop: int = -1  # half-open
    counts_field: str = ""
    normalized: bool = False
    nnz: int = 0
    raw_sum: float = 0.0
    genes_mapped: int = 0
    genes_unmapped: int = 0
    unmapped_examples: list[str] = field(default_factory=list)
    error: str = ""
    updated_at: float = 0.0
    total_counts: float = 0.0  # files: every count of the chosen matrix
    dropped_counts: float = 0.0  # of those, on genes the reference does not know (stored = total - dropped)
    genes_report: dict = field(default_factory=dict)  # features summed / renamed / dropped, and their counts
    path: str = ""  # absolute source path at ingest (files only): how another run resumes a pending source


@dataclass
class Manifest:
    format_version: int = MANIFEST_FORMAT_VERSION
    organism: str = "homo_sapiens"
    next_joinid: int = 0
    sources: dict[str, SourceEntry] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------
    def complete(self) -> list[SourceEntry]:
        return sorted((s for s in self.sources.values() if s.status == COMPLETE), key=lambda s: s.joinid_start)

    def pending(self) -> list[SourceEntry]:
        """Sources whose writing started but never finished (the run died, or is running now)."""
        return [s for s in self.sources.values() if s.status == PENDING]

    def failed(self) -> list[SourceEntry]:
        return [s for s in self.sources.values() if s.status == FAILED]

    def by_fingerprint(self, fingerprint: str) -> SourceEntry | None:
        for s in self.sources.values():
            if s.fingerprint == fingerprint and s.status != FAILED:
                return s
        return None

    def complete_ranges(self) -> list[tuple[int, int]]:
        """Half-open soma_joinid ranges of committed cells, merged and sorted."""
        from .runs import Runs

        return Runs.from_ranges([(s.joinid_start, s.joinid_stop) for s in self.complete() if s.n_cells]).ranges()

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.complete())

    # -- mutation (driver only) ----------------------------------------------------------
    def reserve(self, entry: SourceEntry) -> SourceEntry:
        """Assign a fresh joinid range to a validated source, or reuse a pending one."""
        prior = self.by_fingerprint(entry.fingerprint)
        if prior is not None and prior.status == PENDING and prior.n_cells == entry.n_cells:
            # A run died while writing this source: rewrite the same range (same cells, same ids).
            entry.joinid_start, entry.joinid_stop = prior.joinid_start, prior.joinid_stop
            if prior.source_id != entry.source_id:
                del self.sources[prior.source_id]
        else:
            entry.joinid_start = self.next_joinid
            entry.joinid_stop = self.next_joinid + entry.n_cells
            self.next_joinid = entry.joinid_stop
        entry.status = PENDING
        entry.updated_at = time.time()
        self.sources[entry.source_id] = entry
        return entry

    def set_status(self, source_id: str, status: str, **fields) -> None:
        s = self.sources[source_id]
        s.status = status
        for k, v in fields.items():
            setattr(s, k, v)
        s.updated_at = time.time()

    # -- (de)serialization -----------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "store") -> "Manifest":
        d = json.loads(text)
        version = d.get("format_version")
        check_format("manifest", version, _READABLE_VERSIONS, where)
        d["format_version"] = MANIFEST_FORMAT_VERSION  # written back as the current version
        sources = {k: SourceEntry(**v) for k, v in d.pop("sources").items()}
        return cls(sources=sources, **d)
