"""A pre-LN transformer encoder over gene tokens (``CellEncoder``).

Input embedding = gene embedding + (rank position | expression-bin embedding | projected value),
depending on the tokenizer. The ``<cls>`` output is the cell embedding.

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
            _, cu, max_len, kernel = attn
            q, k, v = self.qkv(h).unflatten(-1, (3, self.n_heads, -1)).unbind(-3)  # [T, H, Dh]
            if kernel is not None:  # torch's varlen_attn has no dropout: attention dropout is skipped
                return kernel(q, k, v, cu, cu, max_len, max_len).flatten(-2)
            sizes = cu.diff().tolist()
            # split (not slicing): its backward is one cat, where slices would each allocate a [T, d] grad
            cells = [F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in qkv), dropout_p=p)
                     for qkv in zip(q.split(sizes), k.split(sizes), v.split(sizes))]  # one cell each, no mask
            return torch.cat([c[0].transpose(0, 1) for c in cells]).flatten(-2)
        mask = attn[1]
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(b, n, -1)


class CellEncoder(nn.Module):
    """Transformer encoder of tokenized cells.

    ``n_tokens`` = 4 specials + number of vocabulary genes; ``max_len`` bounds rank positions.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: str, n_tokens: int, max_len: int, n_bins: int = 51):
        super().__init__()
        if tokenizer not in ("rank", "bin", "value"):
            raise ValueError(f"tokenizer: must be rank|bin|value, got {tokenizer!r}")
        if n_tokens <= N_SPECIAL:
            raise ValueError(f"n_tokens: must exceed the {N_SPECIAL} special tokens, got {n_tokens}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.n_tokens, self.max_len, self.n_bins = n_tokens, max_len, n_bins
        d = cfg.d_model
        self.gene_emb = nn.Embedding(n_tokens, d, padding_idx=PAD)
        if tokenizer == "rank":
            self.pos_emb = nn.Embedding(max_len, d)
        elif tokenizer == "bin":
            self.bin_emb = nn.Embedding(n_bins + 1, d)  # index n_bins = masked bin
        else:
            self.value_proj = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        # MLM head: gene ids (tied to the gene embedding), bins, or a scalar value.
        if tokenizer == "rank":
            self.head_bias = nn.Parameter(torch.zeros(n_tokens))
        else:
            self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d),
                                      nn.Linear(d, n_bins if tokenizer == "bin" else 1))
        self.apply(self._init)

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
        if self.tokenizer == "rank":
            x = x + self.pos_emb(inputs["position_ids"].clamp(max=self.max_len - 1))
        elif self.tokenizer == "bin":
            x = x + self.bin_emb(inputs["bins"])
        else:
            x = x + self.value_proj(inputs["values"].unsqueeze(-1).to(x.dtype)) * (ids != PAD).unsqueeze(-1)
        kernel = varlen_kernel(x)
        if self.cfg.attention == "varlen" or (self.cfg.attention == "auto" and inputs.get("packed", False)
                                              and kernel is not None):
            real = seg > 0
            cu, max_len = _cu_seqlens(seg)
            h = x[real]
            attn = ("varlen", cu, max_len, kernel)
            for blk in self.blocks:
                h = blk(h, attn)
            x = x.new_zeros(x.shape).masked_scatter(real.unsqueeze(-1), self.ln_f(h).to(x.dtype))
            return x
        if bool((seg <= 1).all()):  # one cell per row: a key-padding mask (pad queries see the cell; ignored)
            mask = None if bool((seg == 1).all()) else (seg > 0)[:, None, None, :]
        else:  # packed rows: block-diagonal; pad queries see only pads, so no row is all-False
            mask = (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(1)
        for blk in self.blocks:
            x = blk(x, ("sdpa", mask))
        return self.ln_f(x)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM predictions for selected hidden states [N, d]: logits [N, C] or values [N]."""
        if self.tokenizer == "rank":
            return hidden @ self.gene_emb.weight.t() + self.head_bias
        out = self.head(hidden)
        return out.squeeze(-1) if self.tokenizer == "value" else out

    # -- cell embeddings -----------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batch: dict, pooling: str = "cls") -> torch.Tensor:
        """Cell embeddings [B, d] for a loader batch: the <cls> output, or the mean over gene tokens."""
        from .pack import model_inputs

        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling: must be 'cls' or 'mean', got {pooling!r}")
        dev = next(self.parameters()).device
        inputs = model_inputs({k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}, pack=False)
        h = self.forward(inputs)
        if pooling == "cls":
            return h[:, 0].float()
        genes = (inputs["input_ids"] >= N_SPECIAL).unsqueeze(-1).to(h.dtype)
        return ((h * genes).sum(1) / genes.sum(1).clamp(min=1)).float()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def varlen_kernel(x: torch.Tensor):
    """The varlen attention kernel for activations like ``x``, or None (then: block-diagonal SDPA).

    Flash kernels exist only on CUDA and only for half precision (bf16 autocast counts).
    Signature: (q, k, v, cu_q, cu_k, max_q, max_k) with q, k, v [T, H, Dh] -> [T, H, Dh].
    """
    if not x.is_cuda or not (x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        return varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v, cu_q, cu_k, max_q, max_k: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


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
