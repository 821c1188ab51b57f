"""``atlasflow query``: cut a cell set from CELLxGENE Census (or a local mirror) or from an atlasflow store.

The query is resolved in two streaming passes, so memory is bounded by the selected joinids (8
bytes per cell), their labels and one block of X:

1. obs scan (``soma_joinid`` + the label column, Arrow batches) -> the matching joinids and int32
   label codes (12 bytes per matching cell, whatever the label strings), then an
   optional per-label cap and/or stratified fraction with a seeded RNG (the same seed gives the same
   cells on every run, whatever the batch boundaries);
2. X (and the kept obs columns) read for blocks of ``block_cells`` selected cells.

Outputs: an .h5ad (X appended block by block through anndata's backed sparse dataset), a new
atlasflow store (one manifest source of kind ``query``, gene stats computed), or a loader over the
query directly (no copy; a store, or a local Census mirror with the bin/value tokenizers; no
subsampling since the loader selects by obs filter).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

log = logging.getLogger(__name__)

H5AD_CHUNK_VALUES = 1 << 16  # values per HDF5 chunk of X's data / indices / indptr
QUERY_FORMAT_VERSION = 1  # written into outputs (h5ad uns / store source name) so results are traceable
SOURCES = ("store", "census")


@dataclass(frozen=True)
class QueryConfig:
    source: str = "store"  # store | census
    uri: str = ""  # store path, or Census mirror root (census)
    census_version: str = ""  # census only, when no uri ("stable", "2025-01-30", ...)
    organism: str = "homo_sapiens"
    obs_filter: str = ""  # SOMA value filter on obs; "" = all cells
    genes: tuple[str, ...] = ()  # Ensembl ids to keep; () = all genes
    obs_columns: tuple[str, ...] = ()  # obs columns written; () = all
    label: str = ""  # column for per-label counts, caps and stratification
    per_label_cap: int = 0  # 0 = no cap
    fraction: float = 1.0  # stratified subsample: this fraction of every label (after the cap)
    seed: int = 0
    block_cells: int = 4096

    def __post_init__(self):
        object.__setattr__(self, "genes", tuple(self.genes))
        object.__setattr__(self, "obs_columns", tuple(self.obs_columns))
        if self.source not in SOURCES:
            raise ValueError(f"QueryConfig.source: must be one of {SOURCES}, got {self.source!r}")
        if self.source == "store" and not self.uri:
            raise ValueError("QueryConfig.uri: a store query needs the store path")
        if self.source == "census" and not (self.uri or self.census_version):
            raise ValueError("QueryConfig.census_version: give a Census version or a mirror uri")
        if self.source == "census" and self.uri and self.census_version:
            raise ValueError("QueryConfig.census_version: give census_version or uri, not both")
        for name in ("per_label_cap", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QueryConfig.{name}: must be an int >= 0, got {v!r}")
        if isinstance(self.block_cells, bool) or not isinstance(self.block_cells, int) or self.block_cells < 1:
            raise ValueError(f"QueryConfig.block_cells: must be an int >= 1, got {self.block_cells!r}")
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ValueError(f"QueryConfig.fraction: must lie in (0, 1], got {self.fraction}")
        if (self.per_label_cap or self.fraction < 1.0) and not self.label:
            raise ValueError("QueryConfig.label: per_label_cap / fraction subsample per label; name the label column")

    def describe(self) -> str:
        where = self.uri or f"census {self.census_version}"
        return f"{self.source}:{where} filter={self.obs_filter or 'all'}"

    def key(self) -> str:
        """The query's fingerprint (a store source written by this query is recognised by it). Hashed
        under the field's earlier name, obs_value_filter, so queries written before the rename keep
        their fingerprints and are never stored twice."""
        d = asdict(self)
        d["obs_value_filter"] = d.pop("obs_filter")
        return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=16).hexdigest()


@dataclass
class Selection:
    """The resolved query: sorted joinids, their labels, the gene columns."""

    joinids: np.ndarray  # int64, ascending
    codes: np.ndarray | None  # int32 label codes, aligned with joinids
    var: pd.DataFrame  # the kept genes: var rows indexed by var soma_joinid (feature_id, feature_name, ...)
    categories: list = field(default_factory=list)  # label of each code
    counts: dict[str, int] = field(default_factory=dict)  # cells per label after subsampling
    matched: int = 0  # cells matching the filter before subsampling

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.codes is None else np.asarray(self.categories, dtype=object)[self.codes]

    @property
    def n_cells(self) -> int:
        return len(self.joinids)

    def counts_table(self) -> str:
        if not self.counts:
            return f"{self.n_cells} cells (no label column)"
        width = max(len(k) for k in self.counts)
        lines = [f"  {k:<{width}}  {v}" for k, v in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join([f"{self.n_cells} cells of {self.matched} matching, per label:", *lines])


@contextlib.contextmanager
def open_experiment(cfg: QueryConfig):
    """The SOMA Experiment to read, and the joinid ranges that may be read (None = all)."""
    if cfg.source == "store":
        from atlasflow.store import open_store

        store = open_store(cfg.uri)
        with store.experiment() as exp:
            yield exp, store.complete_ranges()
    else:
        from atlasflow.ingest.census import CensusSpec

        spec = CensusSpec(cfg.census_version or None, cfg.uri or None, cfg.organism)
        with spec.open() as census:
            yield spec.experiment(census), None


def _check_obs_columns(exp, cols, fld: str) -> None:
    names = set(exp.obs.schema.names)
    for c in cols:
        if c and c not in names:
            raise ValueError(f"QueryConfig.{fld}: obs has no column {c!r} (columns: {', '.join(sorted(names))})")


def subsample(labels: np.ndarray, cap: int, fraction: float, seed: int) -> np.ndarray:
    """Positions kept: at most ``cap`` per label, then round(fraction * n) per label, seeded.

    Each label draws from its own RNG stream keyed by (seed, label), so the cells chosen for one
    label do not depend on which other labels matched.
    """
    categories, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return subsample_codes(codes, categories.tolist(), cap, fraction, seed)


def subsample_codes(codes: np.ndarray, categories: list, cap: int, fraction: float, seed: int) -> np.ndarray:
    """``subsample`` over integer label codes (``categories[code]`` is the label): one polars group-by
    gives every label's positions at once (a pass per label over an object array was quadratic in
    the number of labels: 20 s for 600 labels on 1M cells)."""
    groups = (pl.DataFrame({"code": np.asarray(codes)}).with_row_index("pos")
              .group_by("code").agg(pl.col("pos")))  # positions stay ascending within a group
    flat = groups["pos"].explode().to_numpy().astype(np.int64)
    cuts = np.cumsum(groups["pos"].list.len().to_numpy())[:-1]
    keep = []
    for code, pos in zip(groups["code"].to_list(), np.split(flat, cuts)):
        n = len(pos)
        if cap:
            n = min(n, cap)
        if fraction < 1.0:
            n = max(1, int(round(fraction * n)))
        if n < len(pos):
            h = int.from_bytes(hashlib.blake2b(f"{seed}:{categories[code]}".encode(), digest_size=8).digest(), "big")
            pos = np.random.default_rng(h).choice(pos, size=n, replace=False)
        keep.append(pos)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def select(cfg: QueryConfig) -> Selection:
    """Resolve the query (obs scan + subsampling + gene subset). Raises if it matches nothing."""
    from atlasflow.store.store import in_ranges

    with open_experiment(cfg) as (exp, ranges):
        _check_obs_columns(exp, [cfg.label, *cfg.obs_columns], "label / obs_columns")
        ids, labs, seen = [], [], {}
        cols = ["soma_joinid"] + ([cfg.label] if cfg.label else [])
        try:
            for tbl in exp.obs.read(column_names=cols, value_filter=cfg.obs_filter or None):
                j = tbl["soma_joinid"].to_numpy()
                keep = np.ones(len(j), bool) if ranges is None else in_ranges(j, ranges)
                ids.append(j[keep])
                if cfg.label:
                    labs.append(_codes(tbl[cfg.label].filter(pa.array(keep)), seen))
        except Exception as exc:
            if cfg.obs_filter and any(w in str(exc).lower() for w in ("filter", "parse", "column", "attribute")):
                raise ValueError(f"QueryConfig.obs_filter: {cfg.obs_filter!r} is not a valid value "
                                 f"filter on obs ({exc})") from exc
            raise
        var = exp.ms["RNA"].var.read().concat().to_pandas().set_index("soma_joinid").sort_index()
    joinids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(joinids, kind="stable")
    joinids = joinids[order]
    codes = np.concatenate(labs)[order] if cfg.label and labs else None
    categories = list(seen)
    matched = len(joinids)
    if matched == 0:
        raise ValueError(f"query matches no cells ({cfg.describe()}); check obs_filter and the source")
    if codes is not None and (cfg.per_label_cap or cfg.fraction < 1.0):
        pos = subsample_codes(codes, categories, cfg.per_label_cap, float(cfg.fraction), cfg.seed)
        joinids, codes = joinids[pos], codes[pos]
    if cfg.genes:
        missing = sorted(set(cfg.genes) - set(var["feature_id"]))
        if len(missing) == len(set(cfg.genes)):
            raise ValueError(f"QueryConfig.genes: none of the {len(cfg.genes)} genes is in the source's var "
                             f"(e.g. {missing[:3]})")
        if missing:
            log.warning("%d requested genes not in var, skipped (e.g. %s)", len(missing), missing[:5])
        var = var[var["feature_id"].isin(cfg.genes)]
    counts = {} if codes is None else \
        {categories[k]: n for k, n in pl.Series("code", codes).value_counts(name="n").sort("code").rows()}
    return Selection(joinids.astype(np.int64), codes, var, categories, counts, matched)


def _codes(col, seen: dict) -> np.ndarray:
    """Global int32 codes of a string column chunk (``seen``: label -> code, grown in place)."""
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(pc.cast(col, pa.large_string()).combine_chunks())
    local = np.array([seen.setdefault(str(v), len(seen)) for v in enc.dictionary.to_pylist()], dtype=np.int32)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return local[idx] if len(idx) else np.zeros(0, dtype=np.int32)


def iter_blocks(cfg: QueryConfig, sel: Selection, obs_columns: tuple[str, ...] | None = None):
    """(joinids, obs DataFrame, CSR counts [n, len(sel.var)] float32) for blocks of selected cells."""
    var_ids = sel.var.index.to_numpy(np.int64)
    col_of = np.full(int(var_ids.max()) + 1 if len(var_ids) else 0, -1, dtype=np.int64)
    col_of[var_ids] = np.arange(len(var_ids))
    cols = obs_columns if obs_columns is not None else cfg.obs_columns
    with open_experiment(cfg) as (exp, _):
        names = None if not cols else ["soma_joinid", *[c for c in cols if c != "soma_joinid"]]
        for a in range(0, sel.n_cells, cfg.block_cells):
            ids = sel.joinids[a:a + cfg.block_cells]
            obs = exp.obs.read(coords=(ids,), column_names=names).concat().to_pandas()
            obs = obs.set_index("soma_joinid").loc[ids]
            coords = (ids,) if len(var_ids) == len(col_of) else (ids, var_ids)
            parts = list(exp.ms["RNA"].X["raw"].read(coords=coords).tables())
            tbl = pa.concat_tables(parts) if parts else None
            n = len(ids)
            if tbl is None or tbl.num_rows == 0:
                yield ids, obs, sp.csr_matrix((n, len(var_ids)), dtype=np.float32)
                continue
            r = np.searchsorted(ids, tbl["soma_dim_0"].to_numpy())
            c = col_of[tbl["soma_dim_1"].to_numpy()]
            v = tbl["soma_data"].to_numpy().astype(np.float32)
            m = sp.csr_matrix((v, (r, c)), shape=(n, len(var_ids)), dtype=np.float32)
            m.sum_duplicates()
            m.sort_indices()
            yield ids, obs, m


def _obs_for_h5ad(obs: pd.DataFrame) -> pd.DataFrame:
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    obs.index.name = "soma_joinid"
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    return obs


def to_h5ad(cfg: QueryConfig, out: str, sel: Selection | None = None) -> Selection:
    """Write the query to ``out`` (.h5ad): counts in X (CSR float32), Ensembl ids as var index.

    X grows block by block on disk; only obs (the kept columns) is assembled in memory.
    """
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    sel = sel or select(cfg)
    var = sel.var.reset_index().rename(columns={"soma_joinid": "source_var_joinid"}).set_index("feature_id")
    var.index = var.index.astype(str)
    obs_parts = []
    with h5py.File(out, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        # X grows by appends, so its datasets are chunked; h5py's guess for an empty dataset is
        # 1,024 values (4 KB), which makes every backed row read walk a B-tree of ~1k-value chunks
        # (scDataset over a 200k-cell export: 0.5k cells/s; 64k-value chunks: 8k; contiguous: 10k).
        write_elem(f, "X", sp.csr_matrix((0, len(var)), dtype=np.float32),
                   dataset_kwargs={"chunks": (H5AD_CHUNK_VALUES,)})
        X = sparse_dataset(f["X"])
        for ids, obs, m in iter_blocks(cfg, sel):
            X.append(m)
            obs_parts.append(obs)
        obs = _obs_for_h5ad(pd.concat(obs_parts))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        uns = {"atlasflow_query": {"format_version": QUERY_FORMAT_VERSION, "query": json.dumps(asdict(cfg)),
                                   "counts": json.dumps(sel.counts)}}
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
        write_elem(f, "uns", uns)
    ad.read_h5ad(out, backed="r").file.close()  # fail here, not in the user's notebook, if unreadable
    return sel


def to_store(cfg: QueryConfig, out: str, sel: Selection | None = None) -> Selection:
    """Write the query as a new atlasflow store (one source of kind ``query``) and compute gene stats."""
    from atlasflow.store.lease import writer_lease

    sel = sel or select(cfg)
    with writer_lease(out) as lease:  # one writer per store (store/lease.py)
        _write_store(cfg, out, sel, lease)
    return sel


def _write_store(cfg: QueryConfig, out: str, sel: Selection, lease) -> None:
    from atlasflow.ingest.obs import to_store_obs
    from atlasflow.store import SourceEntry, write_cells
    from atlasflow.store.lease_writer import LeasedStoreWriter
    from atlasflow.store.stats import compute_gene_stats

    w = LeasedStoreWriter(out, lease, organism=cfg.organism.lower().replace(" ", "_"))
    gene_joinids = w.register_genes(list(sel.var["feature_id"].astype(str)))
    key = cfg.key()
    entry = w.reserve(SourceEntry(source_id=f"query-{key[:12]}", kind="query",
                                  name=f"atlasflow query v{QUERY_FORMAT_VERSION} {cfg.describe()}", fingerprint=key,
                                  n_cells=sel.n_cells, counts_field='ms["RNA"].X["raw"]',
                                  genes_mapped=len(gene_joinids)))
    off, nnz, total = 0, 0, 0.0
    for ids, obs, m in iter_blocks(cfg, sel, obs_columns=()):
        coo = m.tocoo()
        rs = np.asarray(m.sum(axis=1)).ravel().astype(np.float64)
        obs = obs.drop(columns=["raw_sum", "nnz", "source_id", "source_file", "source_row"], errors="ignore")
        table = to_store_obs(obs, source_id=entry.source_id, source_file=cfg.describe(), source_rows=ids,
                             nnz=np.diff(m.indptr), raw_sum=rs, default_dataset_id=entry.source_id)
        write_cells(out, entry.joinid_start + off, table, coo.row.astype(np.int64), gene_joinids[coo.col],
                    coo.data)
        off += len(ids)
        nnz += m.nnz
        total += float(rs.sum())
    w.complete(entry.source_id, nnz=nnz, raw_sum=total)
    compute_gene_stats(out)


def to_loader(cfg: QueryConfig, loader_cfg=None):
    """A loader over the query itself (no copy), selecting cells by obs filter (no subsampling).

    Store queries read the store; Census queries read a local mirror (``uri``) in place through
    ``CensusView``, with the ``bin`` or ``value`` tokenizer (``rank`` needs gene medians, which only
    a store has: write the query with ``to_store`` first).
    """
    from atlasflow.loader import LoaderConfig, make_loader
    from atlasflow.loader.encodings import get_encoding

    loader_cfg = loader_cfg or LoaderConfig()
    if cfg.per_label_cap or cfg.fraction < 1.0:
        raise ValueError("QueryConfig.per_label_cap: the loader selects cells by obs filter only; write the "
                         "subsample with to_store or to_h5ad")
    if cfg.genes:
        raise ValueError("QueryConfig.genes: the loader reads every gene; write a gene subset with to_store")
    if cfg.source == "census":
        if not cfg.uri:
            raise ValueError("QueryConfig.uri: a loader over Census reads a local mirror (uri=ROOT, as "
                             "cellxgene_census.open_soma(uri=...)); write remote Census queries with to_store")
        if get_encoding(loader_cfg.tokenizer).needs_medians:
            raise ValueError(f"LoaderConfig.tokenizer: {loader_cfg.tokenizer!r} needs per-gene medians, which a "
                             "Census experiment does not have; use 'bin', 'ebin', 'value' or 'uce', or write the query with to_store (gene "
                             "stats are computed there)")
    select(cfg)  # refuse an empty query with the query's own message
    obs_filter = cfg.obs_filter or None
    if loader_cfg.obs_filter and obs_filter:
        obs_filter = f"({loader_cfg.obs_filter}) and ({obs_filter})"
    obs_filter = obs_filter or loader_cfg.obs_filter
    if cfg.source == "census":
        from atlasflow.store.census_view import CensusView

        return make_loader(CensusView(cfg.uri, cfg.organism, loader_cfg.timestamp_ms), loader_cfg,
                           obs_filter=obs_filter)
    return make_loader(cfg.uri, loader_cfg, obs_filter=obs_filter)
