"""kernels.warm() compiles exactly the signatures the loader uses: after it, streaming a store in any
tokenizer compiles nothing new (so an image that ran warm() never compiles on a first batch)."""

from __future__ import annotations

from atlasflow.loader import LoaderConfig, make_loader
from atlasflow.loader import kernels as K

from test_loader_fixtures import real_store

KERNELS = (K.rank_tokens, K.seq_tokens, K.csr_from_coo_rows, K.cols_sorted_within_rows)


def test_warm_covers_every_signature_the_loader_uses(tmp_path_factory):
    uri, _, _ = real_store(tmp_path_factory)  # has gene stats: the rank tokenizer runs too
    K.warm()
    before = {k.py_func.__name__: set(k.signatures) for k in KERNELS}
    for tok in ("rank", "bin", "value"):
        for batch in make_loader(uri, LoaderConfig(tokenizer=tok, batch_size=20, window_cells=80, read_cells=40,
                                                   chunk_cells=16)):
            assert len(batch["soma_joinid"]) == 20
    after = {k.py_func.__name__: set(k.signatures) for k in KERNELS}
    assert after == before
    assert all(before.values())
