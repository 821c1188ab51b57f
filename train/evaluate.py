"""``atlasflow eval``: does the pretrained model help? Cell-type scores against simple baselines.

One split for every row: cells are split by group (``dataset_id`` or ``donor_id``; for .h5ad
inputs without the column, the file is the group), no group on both sides. Unless the test groups
are named, they are picked in a fixed order that puts groups the model never saw in pretraining
first, until ``test_fraction`` of the cells are in test. Leakage is checked against the
pretraining store: test groups whose dataset ids, or whose source files (content fingerprints),
were in the pretraining data are listed and warned about.

Rows (same train/test cells): (a) kNN (k=15) and logistic regression on the model's embeddings,
(b) the same on PCA(50) of log1p-normalized HVG counts, (c) logistic regression on those counts,
(d) the fine-tuned classifier (head on the encoder, trained on the training cells under Ray).
Test cells whose label never occurs in training are dropped (counted in the report). Outputs:
``eval.json``, ``eval.md``, ``embedding.png`` (2-D t-SNE of the embeddings by label and by split)
and ``scores.png`` (bar chart).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

EVAL_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    label: str = "cell_type"
    split_by: str = "dataset_id"
    test_groups: tuple[str, ...] = ()
    test_fraction: float = 0.3
    label_map: dict = field(default_factory=dict)  # {} = labels as they are; else unmapped labels are dropped
    k: int = 15
    n_pcs: int = 50
    n_hvg: int = 2000
    pooling: str = "mean"  # the fine-tuned head's pooling and the plotted embedding
    embedding_poolings: tuple[str, ...] = ("cls", "mean")  # one pair of (a) rows each
    finetune_steps: int = 150  # 0 = no fine-tuned row
    finetune_mode: str = "frozen"
    finetune_workers: int = 1
    seed: int = 0
    block_cells: int = 4096
    plot: bool = True

    def __post_init__(self):
        object.__setattr__(self, "test_groups", tuple(str(g) for g in self.test_groups))
        if not self.label:
            raise ValueError("EvalConfig.label: name the obs column with the cell-type labels")
        if not self.split_by:
            raise ValueError("EvalConfig.split_by: name the grouping column (dataset_id, donor_id)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"EvalConfig.test_fraction: must lie in (0, 1), got {self.test_fraction}")
        for name, lo in (("k", 1), ("n_pcs", 2), ("n_hvg", 2), ("finetune_steps", 0), ("finetune_workers", 1),
                         ("seed", 0), ("block_cells", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"EvalConfig.{name}: must be an int >= {lo}, got {v!r}")
        object.__setattr__(self, "embedding_poolings", tuple(self.embedding_poolings))
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"EvalConfig.pooling: must be 'cls' or 'mean', got {self.pooling!r}")
        if not self.embedding_poolings or not set(self.embedding_poolings) <= {"cls", "mean"}:
            raise ValueError(f"EvalConfig.embedding_poolings: a non-empty subset of cls/mean, "
                             f"got {self.embedding_poolings!r}")
        if self.finetune_mode not in ("frozen", "full"):
            raise ValueError(f"EvalConfig.finetune_mode: must be 'frozen' or 'full', got {self.finetune_mode!r}")
        if not isinstance(self.label_map, dict):
            raise ValueError(f"EvalConfig.label_map: must be a dict, got {type(self.label_map).__name__}")


@dataclass
class EvalSet:
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray  # source name per cell
    emb: dict  # pooling -> [n, d] embeddings
    block: object  # TokenBlock, for the fine-tuned classifier
    X: sp.csr_matrix  # counts over the union of the sources' genes
    totals: np.ndarray  # each cell's count total over all of its source's genes
    feature_ids: list
    fingerprints: dict  # source name -> set of content fingerprints
    dropped_unlabelled: int = 0


def _source_name(src) -> str:
    from .query import QueryConfig

    return src.describe() if isinstance(src, QueryConfig) else os.path.basename(os.path.normpath(str(src)))


def _fingerprints(src) -> set:
    """Content fingerprint of an .h5ad source (the one ingest records); store and Census cells carry
    their dataset_id, which the dataset_id check covers exactly."""
    if isinstance(src, (str, os.PathLike)) and str(src).endswith(".h5ad"):
        from atlasflow.ingest.h5ad import fingerprint

        return {fingerprint(str(src))}
    return set()


def load_eval_set(model, sources, cfg: EvalConfig) -> EvalSet:
    """Tokenize, embed and collect counts of every labelled cell of the sources."""
    from atlasflow.loader import TokenBlock

    from .embed import EmbedConfig, iter_input, tokenize

    pools = tuple(dict.fromkeys((cfg.pooling, *cfg.embedding_poolings)))
    ecfg = {p: EmbedConfig(pooling=p, block_cells=cfg.block_cells) for p in pools}
    col_of: dict[str, int] = {}
    labels, groups, names, embs, blocks, mats, totals, fps = [], [], [], [], [], [], [], {}
    dropped = 0
    for src in sources:
        name = _source_name(src)
        fps[name] = _fingerprints(src)
        tok = seen = None
        for ids, obs, X, fids in iter_input(src, cfg.block_cells):
            if cfg.label not in obs.columns:
                raise ValueError(f"EvalConfig.label: source {name} has no obs column {cfg.label!r} "
                                 f"(columns: {', '.join(map(str, obs.columns))})")
            if fids is not seen:
                tok, _ = model.tokenizer_for(fids)
                seen = fids
                cols = np.array([col_of.setdefault(f, len(col_of)) for f in fids], dtype=np.int64)
            lab = obs[cfg.label].astype(str).to_numpy(dtype=object)
            if cfg.label_map:
                lab = np.array([cfg.label_map.get(v) for v in lab], dtype=object)
            keep = np.array([v is not None for v in lab], dtype=bool)
            dropped += int((~keep).sum())
            if not keep.any():
                continue
            X = sp.csr_matrix(X)[keep]
            grp = obs[cfg.split_by].astype(str).to_numpy() if cfg.split_by in obs.columns else np.full(len(obs), name)
            blk = tokenize(tok, X, ids[keep])
            embs.append({p: model.embed_block(blk, ecfg[p]) for p in pools})
            blocks.append(blk)
            labels.append(lab[keep].astype(str))
            groups.append(np.asarray(grp, dtype=str)[keep])
            names.append(np.full(int(keep.sum()), name))
            totals.append(np.asarray(X.sum(axis=1)).ravel())
            coo = X.tocoo()
            mats.append((coo.row, cols[coo.col], coo.data, X.shape[0]))
    if not labels:
        raise ValueError(f"eval: no labelled cells in {[_source_name(s) for s in sources]} "
                         f"(label={cfg.label!r}, label_map keys={sorted(cfg.label_map)[:6]})")
    n_genes = len(col_of)
    parts = [sp.csr_matrix((d, (r, c)), shape=(n, n_genes), dtype=np.float32) for r, c, d, n in mats]
    return EvalSet(np.concatenate(labels), np.concatenate(groups), np.concatenate(names),
                   {p: np.concatenate([e[p] for e in embs]) for p in pools},
                   TokenBlock.concat(blocks), sp.vstack(parts, format="csr"), np.concatenate(totals),
                   list(col_of), fps, dropped)


def pretraining_data(model) -> dict:
    """Dataset ids and source fingerprints the checkpoint was pretrained on (its store, its snapshot).

    With a dataset-level pretraining split only the ``train`` datasets count, and a source counts
    only if some of its cells were in them.
    """
    from atlasflow.loader import split_of
    from atlasflow.store import open_store

    d = model.config.data
    store = open_store(d.store, d.timestamp_ms or None)
    obs = store.obs(["dataset_id", "source_id"])
    ds = obs["dataset_id"].astype(str)
    if d.split and d.split_by == "dataset_id":  # the loader's default fractions (DataConfig has none)
        obs = obs[ds.map(lambda v: split_of(v) == d.split).to_numpy(bool)]
    sources = store.manifest.sources
    fps = {sources[s].fingerprint for s in set(obs["source_id"].astype(str)) if s in sources}
    return {"store": d.store, "dataset_ids": set(obs["dataset_id"].astype(str)), "split": d.split or None,
            "fingerprints": fps}


def choose_split(groups: np.ndarray, cfg: EvalConfig, seen: set) -> set:
    """Test groups: the named ones, else unseen-in-pretraining groups first (hash order) up to test_fraction."""
    from atlasflow.loader.split import group_unit

    uniq, counts = np.unique(groups, return_counts=True)
    if len(uniq) < 2:
        raise ValueError(f"EvalConfig.split_by: {cfg.split_by!r} has a single group ({uniq.tolist()}); a "
                         f"group split needs >= 2 (use donor_id, or several sources)")
    if cfg.test_groups:
        unknown = sorted(set(cfg.test_groups) - set(uniq.tolist()))
        if unknown:
            raise ValueError(f"EvalConfig.test_groups: {unknown} not among the {cfg.split_by} groups "
                             f"{uniq.tolist()[:10]}")
        test = set(cfg.test_groups)
    else:
        order = sorted(range(len(uniq)), key=lambda i: (uniq[i] in seen, group_unit(uniq[i])))
        test, n = set(), 0
        for i in order:
            if n >= cfg.test_fraction * len(groups) or len(test) == len(uniq) - 1:
                break
            test.add(str(uniq[i]))
            n += int(counts[i])
    if len(test) == len(uniq):
        raise ValueError("EvalConfig.test_groups: every group is in test; leave at least one for training")
    return test


def run_eval(checkpoint: str, store, out: str = "atlasflow_eval", cfg: EvalConfig | None = None,
             medians_store: str | None = None, finetuned: str | None = None) -> dict:
    """Evaluate ``checkpoint`` on ``store``: a store path, an .h5ad, a QueryConfig, or a list of them.

    Returns the table as a dict (also written to out/eval.json, eval.md and the PNGs).
    ``finetuned``: an existing fine-tuned checkpoint to score instead of fine-tuning here.
    """
    from .baselines import baseline_rows, embedding_rows, scores
    from .embed import PretrainedModel

    cfg = cfg or EvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = PretrainedModel(checkpoint, medians_store)
    sources = list(store) if isinstance(store, (list, tuple)) else [store]
    es = load_eval_set(model, sources, cfg)
    try:
        pre = pretraining_data(model)
    except Exception as exc:
        pre = {"store": model.config.data.store, "error": f"{type(exc).__name__}: {exc}", "dataset_ids": set(),
               "fingerprints": set()}
    seen_src = {n for n, f in es.fingerprints.items() if f & pre["fingerprints"]}
    seen = set(pre["dataset_ids"]) | {g for g, s in zip(es.groups, es.sources) if s in seen_src}
    test_groups = choose_split(es.groups, cfg, seen)
    is_test = np.isin(es.groups, list(test_groups))
    train_labels = set(es.labels[~is_test].tolist())
    unseen_label = is_test & ~np.isin(es.labels, list(train_labels))
    te, tr = np.flatnonzero(is_test & ~unseen_label), np.flatnonzero(~is_test)
    if len(te) == 0:
        raise ValueError(f"eval: no test cell has a label seen in training (test groups {sorted(test_groups)})")
    leaked = sorted(g for g in test_groups if g in seen)
    leakage = {"pretraining_store": pre["store"], "pretraining_split": pre.get("split"),
               "test_groups_in_pretraining": leaked,
               "test_cells_in_pretraining": int(np.isin(es.groups[te], leaked).sum()),
               "check": "dataset_id values, and .h5ad content fingerprints, vs the cells the checkpoint was pretrained on"}
    if "error" in pre:
        leakage["warning"] = f"pretraining store unreadable, leakage not checked: {pre['error']}"
    elif leaked:
        leakage["warning"] = (f"{len(leaked)} test group(s) were in the pretraining data: {leaked[:5]}; embedding "
                              f"rows may be optimistic")
    if "warning" in leakage:
        print(f"[atlasflow eval] WARNING: {leakage['warning']}")

    ytr, yte = es.labels[tr], es.labels[te]
    # Baselines see the genes measured in both training and test cells: a gene absent from one
    # side (another panel or genome build) carries no transferable signal.
    Xtr, Xte = es.X[tr], es.X[te]
    shared = np.flatnonzero((np.asarray((Xtr > 0).sum(0)).ravel() > 0) & (np.asarray((Xte > 0).sum(0)).ravel() > 0))
    rows = []
    for p in cfg.embedding_poolings:
        rows += embedding_rows(es.emb[p][tr], es.emb[p][te], ytr, yte, name=f"atlasflow embedding ({p} pooling)",
                               k=cfg.k, seed=cfg.seed)
    brows, binfo = baseline_rows(Xtr[:, shared], Xte[:, shared], ytr, yte, totals_tr=es.totals[tr],
                                 totals_te=es.totals[te], n_hvg=cfg.n_hvg, n_pcs=cfg.n_pcs, k=cfg.k, seed=cfg.seed)
    rows += brows
    # Reference point: what predicting the most frequent training label scores on this test set.
    major = max(sorted(set(ytr.tolist())), key=lambda c: int((ytr == c).sum()))
    rows.append({"features": "none (reference)", "classifier": f"majority training label ({major})",
                 **scores(yte, np.full(len(yte), major, dtype=object))})
    ft_info = None
    if finetuned or cfg.finetune_steps:
        from .finetune import FinetuneConfig, load_classifier, predict, run_finetune_tokens

        if not finetuned:
            # a fresh fine-tune per evaluation: Ray Train would treat the same storage path + name as a resume
            shutil.rmtree(out / "finetune" / "eval-finetune", ignore_errors=True)
            fcfg = FinetuneConfig(label=cfg.label, mode=cfg.finetune_mode, pooling=cfg.pooling,
                                  steps=cfg.finetune_steps, seed=cfg.seed, num_workers=cfg.finetune_workers,
                                  storage_path=str(out / "finetune"), name="eval-finetune")
            res = run_finetune_tokens(checkpoint, es.block.take(tr), ytr, fcfg)
            finetuned = res["checkpoint"]
        clf, classes, meta = load_classifier(finetuned)
        pred = predict(clf, classes, es.block.take(te))
        mode, pool = meta["config"]["mode"], meta["config"]["pooling"]
        rows.append({"features": f"fine-tuned atlasflow ({mode} encoder, {pool} pooling)", "classifier": "linear head",
                     **scores(yte, pred)})
        ft_info = {"checkpoint": str(finetuned), "mode": mode, "steps": meta["config"]["steps"]}
    table = {
        "format_version": EVAL_FORMAT_VERSION, "checkpoint": str(checkpoint),
        "sources": [_source_name(s) for s in sources], "label": cfg.label, "split_by": cfg.split_by,
        "train_groups": sorted(set(es.groups[tr].tolist())), "test_groups": sorted(test_groups),
        "n_train": int(len(tr)), "n_test": int(len(te)),
        "test_cells_dropped_unseen_label": int(unseen_label.sum()), "cells_dropped_unlabelled": es.dropped_unlabelled,
        "labels_train": _counts(ytr), "labels_test": _counts(yte),
        "genes_shared_train_test": int(len(shared)), "n_hvg": binfo["n_hvg"], "n_pcs": binfo["n_pcs"],
        "leakage": leakage, "finetune": ft_info, "config": {k: v for k, v in asdict(cfg).items()}, "rows": rows,
    }
    (out / "eval.json").write_text(json.dumps(table, indent=1, default=list))
    (out / "eval.md").write_text(to_markdown(table))
    if cfg.plot:
        from .eval_plots import plot_embedding, plot_scores

        table["embedding_png"] = str(plot_embedding(es.emb[cfg.pooling], es.labels, is_test, out / "embedding.png", cfg.seed,
                                                        f"atlasflow embedding ({cfg.pooling} pooling, t-SNE)"))
        table["scores_png"] = str(plot_scores(rows, out / "scores.png", title=f"{cfg.label}: test {sorted(test_groups)}"))
        (out / "eval.json").write_text(json.dumps(table, indent=1, default=list))
    return table


def _counts(y) -> dict:
    u, c = np.unique(np.asarray(y, dtype=str), return_counts=True)
    return {str(a): int(b) for a, b in zip(u, c)}


def to_markdown(table: dict) -> str:
    lines = [f"Test groups ({table['split_by']}): {', '.join(table['test_groups'])}; "
             f"train: {len(table['train_groups'])} group(s). Cells: {table['n_train']} train, {table['n_test']} test.",
             "", "| features | classifier | accuracy | macro-F1 |", "|---|---|---:|---:|"]
    for r in table["rows"]:
        lines.append(f"| {r['features']} | {r['classifier']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
    warn = table["leakage"].get("warning")
    if warn:
        lines += ["", f"**Leakage warning:** {warn}"]
    return "\n".join(lines) + "\n"
