"""atlasflow.ingest"""
