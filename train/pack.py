"""Turn a loader batch into model inputs: padded (one cell per row) or packed (several per row).

A loader batch pads every cell to the longest in the batch. Packing places the cells into rows of
``row_len`` tokens (by default just above the batch's longest cell, ``pack_row_len``), first-fit by
decreasing length, so a row holds e.g. one 1,900-token cell and two short ones; ``segment_ids`` (1..k per row, 0 = pad) keep attention block-diagonal and
``position_ids`` restart at 0 for every cell (the rank position of each gene is preserved).
"""

from __future__ import annotations

import torch

# Per-token fields that are moved along with the tokens (whichever are present).
TOKEN_FIELDS = ("input_ids", "values", "bins", "targets", "value_targets", "mlm_mask")


def model_inputs(batch: dict, pack: bool, row_len: int | None = None, pad_to: int | None = None) -> dict:
    """Model inputs from a loader batch: token fields + segment_ids, position_ids, cell_pos, n_tokens.

    ``cell_pos`` [B, 2] = (row, column) of each cell's first token (its <cls>), in batch order.
    ``row_len`` (packed only): fixed row length; None = ``pack_row_len`` of the batch.
    ``pad_to`` (unpacked only) pads rows to a fixed length: the pad-to-max_len baseline.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    if pack:
        if row_len is None:
            row_len = pack_row_len(lengths.tolist())
        out = _pack(batch, mask, lengths, row_len)
    else:
        out = _pad(batch, mask, lengths, pad_to)
    if "views" in batch:  # the contrastive objective's pairing: cell i and cell i + B/2 (cell_pos order)
        out["views"] = batch["views"]
    return out


def _pad(batch: dict, mask: torch.Tensor, lengths: torch.Tensor, pad_to: int | None) -> dict:
    b, n = mask.shape
    out = {k: batch[k] for k in TOKEN_FIELDS if k in batch}
    if pad_to is not None and pad_to > n:
        out = {k: torch.nn.functional.pad(v, (0, pad_to - n)) for k, v in out.items()}
        mask = torch.nn.functional.pad(mask, (0, pad_to - n))
        n = pad_to
    out["segment_ids"] = mask.long()
    out["position_ids"] = torch.arange(n, device=mask.device).expand(b, n)
    out["cell_pos"] = torch.stack([torch.arange(b, device=mask.device), torch.zeros(b, dtype=torch.long,
                                                                                    device=mask.device)], 1)
    out["n_tokens"] = int(lengths.sum())
    return out


def pack_row_len(lengths: list[int], stretch_steps: int = 8) -> int:
    """Row length for packing one batch: the longest cell, or up to 25% more when that needs fewer
    slots (rows x length), smallest on ties.

    Block-diagonal attention costs tokens x row length, so rows stay near the longest cell rather
    than data.max_len (2048 rows cost 5x more attention for 400-token batches); the slack lets
    first-fit fill rows (bench store, unbucketed batches of 32: pad 7.9% at the longest cell,
    3.8% with the slack, for 9% more attention work).
    """
    if not lengths:
        return 1
    longest, best = max(lengths), None
    for j in range(stretch_steps + 1):
        n = -(-longest * (32 + j) // 32)  # ceil(longest * (1 + j/32))
        slots = (max(r for r, _ in first_fit_decreasing(lengths, n)) + 1) * n
        if best is None or slots < best[0]:
            best = (slots, n)
    return best[1]


def first_fit_decreasing(lengths: list[int], row_len: int) -> list[tuple[int, int]]:
    """(row, offset) for each length, first-fit in order of decreasing length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        n = lengths[i]
        if n > row_len:
            raise ValueError(f"lengths: a cell of {n} tokens does not fit rows of {row_len} (data.max_len)")
        for r, room in enumerate(free):
            if room >= n:
                place[i] = (r, row_len - room)
                free[r] -= n
                break
        else:
            place[i] = (len(free), 0)
            free.append(row_len - n)
    return place


def _pack(batch: dict, mask: torch.Tensor, lengths: torch.Tensor, row_len: int) -> dict:
    b, n = mask.shape
    dev = mask.device
    place = first_fit_decreasing(lengths.tolist(), row_len)
    rows = torch.tensor([p[0] for p in place], dtype=torch.long, device=dev)
    offs = torch.tensor([p[1] for p in place], dtype=torch.long, device=dev)
    n_rows = int(rows.max()) + 1 if b else 0
    col = torch.arange(n, device=dev)
    dst = (rows * row_len + offs).unsqueeze(1) + col  # [B, n] flat destination of each source token
    dst = dst[mask]
    out = {}
    for k in TOKEN_FIELDS:
        if k in batch:
            v = batch[k]
            buf = v.new_zeros(n_rows * row_len)
            buf[dst] = v[mask]
            out[k] = buf.view(n_rows, row_len)
    # segment id = 1 + rank of the cell among the cells of its row (by offset)
    seg_of_cell = torch.zeros(b, dtype=torch.long, device=dev)
    for r in range(n_rows):
        idx = (rows == r).nonzero().squeeze(1)
        seg_of_cell[idx[offs[idx].argsort()]] = torch.arange(1, len(idx) + 1, device=dev)
    seg = torch.zeros(n_rows * row_len, dtype=torch.long, device=dev)
    seg[dst] = seg_of_cell.unsqueeze(1).expand(b, n)[mask]
    pos = torch.zeros(n_rows * row_len, dtype=torch.long, device=dev)
    pos[dst] = col.expand(b, n)[mask]
    out["segment_ids"] = seg.view(n_rows, row_len)
    out["position_ids"] = pos.view(n_rows, row_len)
    out["cell_pos"] = torch.stack([rows, offs], 1)
    out["n_tokens"] = int(lengths.sum())
    out["packed"] = True
    return out


def pad_fraction(inputs: dict) -> float:
    total = inputs["segment_ids"].numel()
    return 1.0 - inputs["n_tokens"] / total if total else 0.0
