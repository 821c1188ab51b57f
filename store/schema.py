"""On-disk layout of an atlasflow store: one TileDB-SOMA Experiment.

obs columns are plain strings (no dictionary/enumeration encoding) on purpose: tiledbsoma 2.3
loses or garbles enumeration values when several processes extend them at once (see
shared/NOTES.md); plain strings make obs writes from parallel Ray workers independent fragments,
which TileDB supports concurrently.
"""

from __future__ import annotations

import pyarrow as pa

STORE_FORMAT_VERSION = 1
MEASUREMENT = "RNA"
X_LAYER = "raw"
GENE_STATS_KEY = "atlasflow_gene_stats"  # SOMA DataFrame member of the Experiment
MANIFEST_KEY = "atlasflow.manifest"  # Experiment metadata (JSON)
def check_format(what: str, found, readable, where: str, hint: str = "") -> None:
    """The one version check of every versioned artifact (store, manifest, lease, gene stats, loader
    state, vocabulary, config, baselines, checkpoint, fine-tuned head): ``found`` must be among
    ``readable`` (an int or a collection of ints); else a ValueError naming the place and the field."""
    ok = tuple(readable) if isinstance(readable, (tuple, list, set, frozenset)) else (readable,)
    try:
        known = int(found) in ok
    except (TypeError, ValueError):
        known = False
    if not known:
        raise ValueError(f"{where}: {what} format_version {found!r} unsupported (this atlasflow reads "
                         f"{', '.join(map(str, sorted(ok)))}){hint}")


FORMAT_KEY = "atlasflow.store_format_version"
ORGANISM_KEY = "atlasflow.organism"

# Census obs columns we carry (string-valued), in Census order.
CENSUS_STRING_COLUMNS = [
    "dataset_id",
    "assay",
    "assay_ontology_term_id",
    "cell_type",
    "cell_type_ontology_term_id",
    "development_stage",
    "development_stage_ontology_term_id",
    "disease",
    "disease_ontology_term_id",
    "donor_id",
    "self_reported_ethnicity",
    "self_reported_ethnicity_ontology_term_id",
    "sex",
    "sex_ontology_term_id",
    "suspension_type",
    "tissue",
    "tissue_ontology_term_id",
    "tissue_type",
    "tissue_general",
    "tissue_general_ontology_term_id",
]

OBS_SCHEMA = pa.schema(
    [(c, pa.large_string()) for c in CENSUS_STRING_COLUMNS]
    + [
        ("is_primary_data", pa.bool_()),
        ("raw_sum", pa.float64()),
        ("nnz", pa.int64()),
        # provenance
        ("source_id", pa.large_string()),
        ("source_file", pa.large_string()),
        ("source_row", pa.int64()),
    ]
)

VAR_SCHEMA = pa.schema(
    [
        ("feature_id", pa.large_string()),
        ("feature_name", pa.large_string()),
        ("feature_length", pa.int64()),
        ("feature_type", pa.large_string()),
    ]
)

GENE_STATS_SCHEMA = pa.schema(
    [
        ("nnz", pa.int64()),  # cells in which the gene is nonzero
        ("nonzero_median", pa.float64()),  # exact median of x / raw_sum * 1e4 over those cells
    ]
)

# X tiling: all genes of a row in one space tile, so a block of cells is a contiguous run of data
# tiles. Measured on 40k cells x 20k genes (57M nnz): random reads of 4 x 512-cell chunks 18.9k
# cells/s vs 10.7k with tiledbsoma's default 2048 x 2048 tiles; sequential 33k vs 25k cells/s.
# Filters: byte-shuffled gene ids and counts before zstd (as in the Census: 22% smaller than the
# defaults, 14% less read CPU), row ids zstd alone: they are constant along a cell, so zstd packs
# them as small as the Census' double-delta does (114.5 vs 114.9 MB for 40k cells of the bench
# store), and double-delta decoding was a third of a random read's CPU (4 x 256-cell chunks with
# the loader's read settings: 18.4 vs 29 us/cell).
# Capacity (nonzeros per data tile) 25,000: a read decodes whole data tiles, so each of the loader's
# random chunks pays for the part-tiles at its two ends. Measured 2026-12-03 on 50k cells x 20k genes
# (1,200 nnz per cell, one store per capacity, median of 5 interleaved rounds of 10 reads of 1,024
# cells, CPU per cell): 4 x 256-cell chunks (the loader's default) 35.7 / 32.0 / 30.6 / 35.3 us at
# 100k / 50k / 25k / 12.5k; 2 x 512 32.4 / 27.3 / 28.4 / 31.3; one contiguous 1,024-cell range
# 26.1 / 27.8 / 26.7 / 30.4. The same disk size.
_ZSTD = {"_type": "ZstdFilter", "level": 3}
X_PLATFORM_CONFIG = {"tiledb": {"create": {
    "dims": {"soma_dim_0": {"tile": 2048, "filters": [_ZSTD]},
             "soma_dim_1": {"tile": 65536, "filters": ["ByteShuffleFilter", _ZSTD]}},
    "attrs": {"soma_data": {"filters": ["ByteShuffleFilter", _ZSTD]}},
    "capacity": 25_000,
}}}

# Value used for obs columns a source does not have.
MISSING = "unknown"

# Upper bound on joinids (cells / genes) the arrays can ever be resized to.
MAX_CELLS = 2**40
MAX_GENES = 2**21
