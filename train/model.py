"""A pre-LN transformer over gene tokens (``CellEncoder``), built from the encoding's declarations.

Input embedding = gene embedding (+ position embedding where the encoding's order carries
information) (+ expression-bin embedding | projected value, the encoding's per-token channel); heads
per MLM target: gene id (tied to the gene embedding), bin, value (``loader.encodings``). With
``causal`` (next-token prediction, tGPT) every token attends only to itself and the tokens before it
in its cell. The ``<cls>`` output is the cell embedding of a bidirectional model; a causal model's
``<cls>`` sees nothing, so its "cls" pooling is the last token's state (the one that saw the whole
cell) and "mean" the mean over its gene tokens (tGPT's feature).

Attention sees only tokens of the same cell: every model input carries ``segment_ids`` (0 = pad,
k >= 1 = k-th cell of the row), so one code path serves padded batches (one cell per row) and packed
rows (several cells per row). Two paths:
  * ``sdpa``: the [R, L] layout, one F.scaled_dot_product_attention call per layer with a boolean
    mask: key padding for padded batches, block-diagonal (same segment) for packed rows. It pays
    for pad slots and for the off-diagonal blocks, which packing into rows just above the longest
    cell (``pack.pack_row_len``) keeps small; the CPU path.
  * ``varlen``: the real tokens flattened to [T, d] with cumulative cell offsets (cu_seqlens): no
    FLOP on padding, attention costs sum(n_i^2). The kernel (``varlen_kernel``): torch's
    ``torch.nn.attention.varlen.varlen_attn`` (flash, CUDA, bf16/fp16), else ``flash_attn``'s
    ``flash_attn_varlen_func``; without one (CPU, fp32) one SDPA per cell, the exact reference.
``auto``: varlen for packed rows when a kernel exists for the device and dtype, else sdpa.
No real token ever attends to a pad or to another cell, and pads never reach the loss; pad queries
get a harmless output (never an all-False mask row, so no NaN) that nothing reads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atlasflow.loader.vocab import CLS, EOS, MASK, N_SPECIAL, PAD  # noqa: F401  (the one definition)

from .config import ModelConfig


POOLINGS = ("cls", "mean", "rank_mean")


def check_pooling(pooling: str, where: str, encoding=None) -> None:
    """A pooling ``CellEncoder.pool`` knows; "rank_mean" needs a ranked encoding (when one is given)."""
    if pooling not in POOLINGS:
        raise ValueError(f"{where}: must be one of {'|'.join(POOLINGS)}, got {pooling!r}")
    if pooling == "rank_mean" and encoding is not None and not encoding.ranked:
        raise ValueError(f"{where}: 'rank_mean' weighs genes by their rank in the cell; the {encoding.name!r} "
                         "encoding does not order genes by expression (use 'mean')")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.p_attn = cfg.dropout

    def forward(self, x: torch.Tensor, attn) -> torch.Tensor:
        x = x + self.drop(self.proj(self._attend(self.ln1(x), attn)))
        return x + self.drop(self.ff(self.ln2(x)))

    def _attend(self, h: torch.Tensor, attn) -> torch.Tensor:
        p = self.p_attn if self.training else 0.0
        if attn[0] == "varlen":  # h: [T, d] flattened real tokens
            _, cu, max_len, kernel, _ = attn
            q, k, v = self.qkv(h).unflatten(-1, (3, self.n_heads, -1)).unbind(-3)  # [T, H, Dh]
            if kernel is not None:  # torch's varlen_attn has no dropout: attention dropout is skipped
                return kernel(q, k, v, cu, cu, max_len, max_len).flatten(-2)
            sizes = cu.diff().tolist()
            # split (not slicing): its backward is one cat, where slices would each allocate a [T, d] grad
            causal = attn[4]
            cells = [F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in qkv), dropout_p=p,
                                                    is_causal=causal)
                     for qkv in zip(q.split(sizes), k.split(sizes), v.split(sizes))]  # one cell each, no mask
            return torch.cat([c[0].transpose(0, 1) for c in cells]).flatten(-2)
        mask = attn[1]
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh]
        if isinstance(mask, str):  # "causal"
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(b, n, -1)


class CellEncoder(nn.Module):
    """Transformer over tokenized cells of the encoding ``tokenizer`` (``loader.encodings``).

    ``n_tokens`` = 4 specials + vocabulary genes + the encoding's own tokens; ``max_len`` bounds
    positions; ``gene_end`` = 4 + number of vocabulary genes (ids in [4, gene_end) are genes: the only
    tokens masked and drawn as random replacements; None: every id from 4 up).
    """

    def __init__(self, cfg: ModelConfig, tokenizer: str, n_tokens: int, max_len: int, n_bins: int = 51, *,
                 causal: bool = False, gene_end: int | None = None, cell_head: bool = False,
                 contrast_head: bool = False):
        super().__init__()
        from atlasflow.loader.encodings import get_encoding

        enc = get_encoding(tokenizer)
        if n_tokens <= N_SPECIAL:
            raise ValueError(f"n_tokens: must exceed the {N_SPECIAL} special tokens, got {n_tokens}")
        if causal and not enc.causal_ok:
            raise ValueError(f"causal: next-token prediction needs an ordered encoding with gene-id targets; "
                             f"{tokenizer!r} is not one")
        self.cfg, self.tokenizer, self.encoding, self.causal = cfg, tokenizer, enc, bool(causal)
        self.n_tokens, self.max_len, self.n_bins = n_tokens, max_len, n_bins
        self.gene_end = int(gene_end) if gene_end is not None else n_tokens
        d = cfg.d_model
        self.gene_emb = nn.Embedding(n_tokens, d, padding_idx=PAD)
        if enc.positional:
            self.pos_emb = nn.Embedding(max_len, d)
        if enc.side == "bins":
            self.bin_emb = nn.Embedding(n_bins + 1, d)  # index n_bins = masked bin
        elif enc.side == "values":
            self.value_proj = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        # Heads: gene ids (tied to the gene embedding); one more (named ``head``) for a bin or value target.
        if "gene" in enc.targets:
            self.head_bias = nn.Parameter(torch.zeros(n_tokens))
        others = [t for t in enc.targets if t != "gene"]
        if len(others) > 1:
            raise ValueError(f"encoding {tokenizer}: at most one non-gene target, got {others}")
        self.other_target = others[0] if others else None
        if self.other_target is not None:
            self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d),
                                      nn.Linear(d, n_bins if self.other_target == "bin" else 1))
        self.apply(self._init)
        # The cell head (objective.cell_weight): the cell's gene set from its mean-pooled vector alone.
        # Built after the rest is initialised, so every other weight equals a model without it (same seed).
        self.has_cell_head = bool(cell_head)
        if self.has_cell_head:
            self.cell_proj = nn.Linear(d, d)
            self._init(self.cell_proj)
            self.cell_bias = nn.Parameter(torch.zeros(self.gene_end - N_SPECIAL))
        # The contrastive term's projection head (objective.contrast_weight), SimCLR's: the loss is taken on
        # its output, the embedding used downstream is the pooled vector before it. Built last, like the cell head.
        self.has_contrast_head = bool(contrast_head)
        if self.has_contrast_head:
            self.contrast_proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            self.contrast_proj.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # -- encoder -------------------------------------------------------------------------
    def forward(self, inputs: dict) -> torch.Tensor:
        """Hidden states [R, L, d] for model inputs (see ``pack.model_inputs``)."""
        ids, seg = inputs["input_ids"], inputs["segment_ids"]
        x = self.gene_emb(ids)
        enc = self.encoding
        if enc.positional:
            x = x + self.pos_emb(inputs["position_ids"].clamp(max=self.max_len - 1))
        if enc.side == "bins":
            x = x + self.bin_emb(inputs["bins"])
        elif enc.side == "values":
            x = x + self.value_proj(inputs["values"].unsqueeze(-1).to(x.dtype)) * (ids != PAD).unsqueeze(-1)
        kernel = varlen_kernel(x, self.causal)
        if self.cfg.attention == "varlen" or (self.cfg.attention == "auto" and inputs.get("packed", False)
                                              and kernel is not None):
            real = seg > 0
            cu, max_len = _cu_seqlens(seg)
            h = x[real]
            attn = ("varlen", cu, max_len, kernel, self.causal)
            for blk in self.blocks:
                h = blk(h, attn)
            x = x.new_zeros(x.shape).masked_scatter(real.unsqueeze(-1), self.ln_f(h).to(x.dtype))
            return x
        if bool((seg == 1).all()):  # full rows of one cell each: no mask (causal: SDPA's own is_causal)
            mask = "causal" if self.causal else None
        elif bool((seg <= 1).all()) and not self.causal:  # one cell per row: key padding (pad queries: ignored)
            mask = (seg > 0)[:, None, None, :]
        else:  # packed rows: block-diagonal; pad queries see only pads, so no row is all-False
            mask = (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(1)
            if self.causal:  # and only earlier tokens (the diagonal stays: no empty row either)
                n = seg.shape[1]
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
        for blk in self.blocks:
            x = blk(x, ("sdpa", mask))
        return self.ln_f(x)

    def predict(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions for selected hidden states [N, d], per target: "gene" logits [N, n_tokens],
        "bin" logits [N, n_bins], "value" [N]."""
        out = {}
        if "gene" in self.encoding.targets:
            out["gene"] = hidden @ self.gene_emb.weight.t() + self.head_bias
        if self.other_target is not None:
            h = self.head(hidden)
            out[self.other_target] = h.squeeze(-1) if self.other_target == "value" else h
        return out

    def cell_gene_logits(self, cells: torch.Tensor) -> torch.Tensor:
        """Logits [C, n_genes] over the vocabulary genes (ids ``N_SPECIAL + column``) for cell vectors
        [C, d]: a bilinear decoder tied to the gene embedding (scGPT's GEPC, for a gene set)."""
        genes = self.gene_emb.weight[N_SPECIAL:self.gene_end]
        return self.cell_proj(cells) @ genes.t() + self.cell_bias

    # -- cell embeddings -----------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batch: dict, pooling: str = "mean") -> torch.Tensor:
        """Cell embeddings [B, d] for a loader batch, pooled as ``pool`` does (default: the mean over gene tokens)."""
        from .pack import model_inputs

        check_pooling(pooling, "pooling", self.encoding)
        dev = next(self.parameters()).device
        inputs = model_inputs({k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}, pack=False)
        return self.pool(self.forward(inputs), inputs, pooling).float()

    def pool(self, h: torch.Tensor, inputs: dict, pooling: str) -> torch.Tensor:
        """Cell vectors [B, d] from hidden states of unpacked inputs (``POOLINGS``): "cls" (a causal
        model: its last token), "mean" over the gene tokens (not specials, not an encoding's own
        tokens), "rank_mean" (ranked encodings) the mean over the gene tokens weighted by 1/sqrt(r),
        r the gene's rank in the cell (1 = its most over-expressed gene): a cell's few top-ranked genes,
        its identity genes in Geneformer's ordering, outweigh its hundreds of low-ranked ones."""
        if pooling == "cls" and self.causal:  # the last real token: the only one that saw the whole cell
            last = (inputs["segment_ids"] > 0).sum(1) - 1
            return h[torch.arange(h.shape[0], device=h.device), last]
        if pooling == "cls":
            return h[:, 0]
        ids = inputs["input_ids"]
        genes = ((ids >= N_SPECIAL) & (ids < self.gene_end)).to(h.dtype)
        if pooling == "rank_mean":
            check_pooling(pooling, "pooling", self.encoding)
            genes = genes / genes.cumsum(1).clamp(min=1).sqrt()
        genes = genes.unsqueeze(-1)
        return (h * genes).sum(1) / genes.sum(1).clamp(min=1e-12)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def varlen_kernel(x: torch.Tensor, causal: bool = False):
    """The varlen attention kernel for activations like ``x``, or None (then: block-diagonal SDPA).

    Flash kernels exist only on CUDA and only for half precision (bf16 autocast counts).
    Signature: (q, k, v, cu_q, cu_k, max_q, max_k) with q, k, v [T, H, Dh] -> [T, H, Dh]; ``causal``
    is bound in (torch: window (-1, 0); flash_attn: causal=True).
    """
    if not x.is_cuda or not (x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        if not causal:
            return varlen_attn
        return lambda q, k, v, cu_q, cu_k, max_q, max_k: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k,
                                                                     window_size=(-1, 0))
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v, cu_q, cu_k, max_q, max_k: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                                                            causal=causal)


def cell_index(seg: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cell index [R, L], number of cells) of padded or packed segment ids: cells numbered row by row,
    then by segment; -1 off-cell."""
    per_row = seg.amax(1)
    base = per_row.cumsum(0) - per_row
    return torch.where(seg > 0, base.unsqueeze(1) + seg - 1, torch.full_like(seg, -1)), int(per_row.sum())


def mean_pool_cells(h: torch.Tensor, seg: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell vectors [C, d], cell index [R, L] as ``cell_index``) for padded or packed hidden states: the
    mean of ``h`` over each cell's positions where ``keep``."""
    cid, n_cells = cell_index(seg)
    sel = keep & (seg > 0)
    idx = cid[sel]
    # float32 sums: bf16 counts are not exact past 256 tokens
    sums = torch.zeros(n_cells, h.shape[-1], device=h.device).index_add_(0, idx, h[sel].float())
    counts = torch.zeros(n_cells, device=h.device).index_add_(0, idx, torch.ones(idx.shape, device=h.device))
    return sums / counts.clamp(min=1).unsqueeze(1), cid


def _cu_seqlens(seg: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative token offsets of the cells in row-major order of the real tokens."""
    rows = torch.arange(seg.shape[0], device=seg.device).unsqueeze(1).expand_as(seg)
    key = (rows * (seg.shape[1] + 1) + seg)[seg > 0]
    _, counts = torch.unique_consecutive(key, return_counts=True)
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(counts.max()) if counts.numel() else 0


def flops_per_token(cfg: ModelConfig, context: int, n_tokens: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward; 2 FLOPs per multiply-add)."""
    d, f = cfg.d_model, cfg.d_ff
    per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * context * d  # projections + QK^T and AV
    return 3.0 * cfg.n_layers * per_layer + 3.0 * 2 * d * n_tokens * 0.15  # MLM head on masked tokens only
