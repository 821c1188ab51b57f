"""Ingestion of H5AD atlases and CELLxGENE Census into an atlasflow store, with Ray workers."""

from .pipeline import IngestReport, ingest_paths

__all__ = ["IngestReport", "ingest_paths"]
