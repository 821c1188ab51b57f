"""The atlas store: one TileDB-SOMA Experiment with a versioned manifest and gene statistics."""

from .genes import GeneMapping, gene_reference, map_genes, organism_key
from .manifest import COMPLETE, FAILED, MANIFEST_FORMAT_VERSION, PENDING, Manifest, SourceEntry
from .schema import GENE_STATS_SCHEMA, MEASUREMENT, OBS_SCHEMA, STORE_FORMAT_VERSION, VAR_SCHEMA, X_LAYER
from .store import (Store, StoreLocator, StoreWriter, create_store, in_ranges, is_store, open_store, write_cells,
                    write_cells_csr)

__all__ = [
    "COMPLETE", "FAILED", "GENE_STATS_SCHEMA", "GeneMapping", "MANIFEST_FORMAT_VERSION", "MEASUREMENT",
    "Manifest", "OBS_SCHEMA", "PENDING", "STORE_FORMAT_VERSION", "SourceEntry", "Store", "StoreLocator",
    "StoreWriter", "VAR_SCHEMA", "X_LAYER", "create_store", "gene_reference", "in_ranges", "is_store",
    "map_genes", "open_store", "organism_key", "write_cells", "write_cells_csr",
]
