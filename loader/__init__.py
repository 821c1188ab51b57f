"""atlasflow.loader: stream tokenized, shuffled, exactly partitioned batches from an atlas store.

    from atlasflow.loader import LoaderConfig, make_loader
    loader = make_loader("atlas/", LoaderConfig(tokenizer="rank", batch_size=32, num_workers=2))
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        for batch in loader:  # dict of torch tensors, incl. batch["soma_joinid"]
            ...

See plan.py (epoch definition, partitioning, balancing), tokenize.py (token definitions and
truncation), thinning.py (depth augmentation: ``LoaderConfig(thin_range=(0.05, 1.0))``),
config.py (memory knobs) and state.py (resume).
"""

from .api import AtlasLoader, make_loader
from .config import LoaderConfig
from .dataset import CellStream, resolve_rank_world
from .encodings import ENCODINGS, Encoding, get_encoding
from .memory import tune_allocator
from .meta_tokens import MetaVocab
from .split import assign_splits, split_of
from .thinning import thin_block
from .tokenize import TokenBlock, Tokenizer, gene_hash, prepend_tokens
from .vocab import CLS, EOS, MASK, PAD, SPECIALS, Vocab

__all__ = [
    "AtlasLoader", "CLS", "CellStream", "ENCODINGS", "EOS", "Encoding", "LoaderConfig", "MASK", "MetaVocab", "PAD",
    "SPECIALS", "TokenBlock", "Tokenizer", "Vocab", "assign_splits", "gene_hash", "get_encoding", "make_loader",
    "prepend_tokens", "resolve_rank_world", "split_of", "thin_block", "tune_allocator",
]
