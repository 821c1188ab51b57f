"""Benchmarks and report scripts (they import every layer, so they live at the top, in infra):

- ``ingest``: ingest throughput and peak memory of a synthetic atlas (``python -m atlasflow.infra.bench.ingest``)
- ``loader``: loader throughput / shuffle quality / memory vs tiledbsoma-ml (``atlasflow bench loader``)
- ``train``: step time per attention path and batch layout (``python -m atlasflow.infra.bench.train``)
- ``peers``: atlasflow against scDataset, BioNeMo SCDL and tiledbsoma-ml, interleaved on the same cells,
  with the read + tokenize bound (``python -m atlasflow.infra.bench.peers``)
- ``eval_report``: the README's evaluation runs (``python -m atlasflow.infra.bench.eval_report``)
- ``encodings``: the encodings shoot-out (``python -m atlasflow.infra.bench.encodings``)
- ``obs_reads``: obs read once per source vs once per block (``python -m atlasflow.infra.bench.obs_reads``)
- ``util``: hardware/version header and the peak RSS of a process tree
"""
