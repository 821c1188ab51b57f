"""``atlasflow eval``: does the pretrained model help? Cell-type scores against simple baselines and a
randomly initialised control of the same architecture.

One split for every row: cells are split by group (``dataset_id`` or ``donor_id``; for .h5ad
inputs without the column, the file is the group), no group on both sides. Unless the test groups
are named, they are picked in a fixed order that puts groups the model never saw in pretraining
first, until ``test_fraction`` of the cells are in test. Leakage is checked against the
pretraining store: test groups whose dataset ids, or whose source files (content fingerprints),
were in the pretraining data are listed and warned about.

Every row uses only the genes detected in both the training and the test cells (the baselines'
features and the model's tokens alike: a gene one side never measures carries no transferable
signal, and tokens of it shift the rank of every other gene).

Transfer table (train on the training groups, score on the test groups): (a) kNN (k=15) and
logistic regression on the model's embeddings and on the random-init control's, (b) the same on
PCA(50) of log1p-normalized HVG counts, (c) logistic regression on those counts, (d) the
fine-tuned classifier of the model and of the control (``finetune``: full fine-tune, early
stopping, depth augmentation), (e) the majority training label. Rows of a trained model are
repeated over ``seeds`` (pretraining checkpoints, one per seed when several are given; control
initialisations; fine-tuning seeds) and reported as mean ± sd. Embedding quality on the test
cells themselves, as cz-benchmarks measures it (``eval_metrics``): 5-fold CV label prediction and
Leiden-clustering ARI/NMI; and scib-metrics bio-conservation / batch-correction scores over all
cells (batch = source), each against PCA. Test cells whose label never occurs in training are
dropped (counted in the report). Outputs: ``eval.json``, ``eval.md``, ``embedding.png`` (t-SNE of
the embeddings by label and by split) and ``scores.png`` (bar chart with sd).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..model import POOLINGS, check_pooling
from .eval_tables import EVAL_FORMAT_VERSION, assemble, to_markdown  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)



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
    # one pair of (a) rows each; rank_mean only for a model of a ranked encoding (rank, rank_value)
    embedding_poolings: tuple[str, ...] = ("cls", "mean", "rank_mean")
    finetune_steps: int = 600  # at most (early stopping); 0 = no fine-tuned rows
    finetune_mode: str = "full"
    finetune_workers: int = 1
    finetune_in_process: bool = False  # no Ray (one worker here): quicker for many small fine-tunes
    finetune: dict = field(default_factory=dict)  # further FinetuneConfig settings (encoder_lr, thin_range...)
    seed: int = 0  # baselines' seed; also the first trained seed when seeds is empty
    seeds: tuple[int, ...] = ()  # trained rows' seeds (default: (seed,))
    control: bool = True  # random-init control rows
    finetune_control: bool = True  # the control's fine-tuned row too (False: its frozen rows only)
    shared_genes: bool = True  # tokens only over genes detected in both training and test cells
    cv_folds: int = 5  # cz-benchmarks label prediction on the test cells; 0 = off
    cluster: bool = True  # ARI / NMI of a clustering of the test cells' embeddings
    scib: bool = True  # scib-metrics scores (skipped, with a note, when scib-metrics is not installed)
    block_cells: int = 4096
    plot: bool = True
    meta_tokens: str = "keep"  # a model with metadata tokens: keep (<unk> for unknown values) or drop them

    def __post_init__(self):
        object.__setattr__(self, "test_groups", tuple(str(g) for g in self.test_groups))
        if not self.label:
            raise ValueError("EvalConfig.label: name the obs column with the cell-type labels")
        if not self.split_by:
            raise ValueError("EvalConfig.split_by: name the grouping column (dataset_id, donor_id)")
        if self.meta_tokens not in ("keep", "drop"):
            raise ValueError(f"EvalConfig.meta_tokens: must be 'keep' or 'drop', got {self.meta_tokens!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"EvalConfig.test_fraction: must lie in (0, 1), got {self.test_fraction}")
        object.__setattr__(self, "seeds", tuple(int(v) for v in self.seeds) or (int(self.seed),))
        for name, lo in (("k", 1), ("n_pcs", 2), ("n_hvg", 2), ("finetune_steps", 0), ("finetune_workers", 1),
                         ("seed", 0), ("block_cells", 1), ("cv_folds", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"EvalConfig.{name}: must be an int >= {lo}, got {v!r}")
        object.__setattr__(self, "embedding_poolings", tuple(self.embedding_poolings))
        check_pooling(self.pooling, "EvalConfig.pooling")
        if not self.embedding_poolings or not set(self.embedding_poolings) <= set(POOLINGS):
            raise ValueError(f"EvalConfig.embedding_poolings: a non-empty subset of {'/'.join(POOLINGS)}, "
                             f"got {self.embedding_poolings!r}")
        if self.finetune_mode not in ("frozen", "full"):
            raise ValueError(f"EvalConfig.finetune_mode: must be 'frozen' or 'full', got {self.finetune_mode!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"EvalConfig.seeds: must be distinct, got {self.seeds}")
        if self.cv_folds == 1:
            raise ValueError("EvalConfig.cv_folds: 0 (off) or >= 2")
        if not isinstance(self.finetune, dict):
            raise ValueError(f"EvalConfig.finetune: a dict of FinetuneConfig settings, got {type(self.finetune).__name__}")
        if not isinstance(self.label_map, dict):
            raise ValueError(f"EvalConfig.label_map: must be a dict, got {type(self.label_map).__name__}")


@dataclass
class EvalSet:
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray  # source name per cell
    X: sp.csr_matrix  # counts over the union of the sources' genes (columns = feature_ids)
    totals: np.ndarray  # each cell's count total over all of its source's genes
    feature_ids: list
    fingerprints: dict  # source name -> set of content fingerprints
    dropped_unlabelled: int = 0


def source_name(src) -> str:
    from atlasflow.store.query import QueryConfig

    return src.describe() if isinstance(src, QueryConfig) else os.path.basename(os.path.normpath(str(src)))


def _fingerprints(src) -> set:
    """Content fingerprint of an .h5ad source (the one ingest records); store and Census cells carry
    their dataset_id, which the dataset_id check covers exactly."""
    if isinstance(src, (str, os.PathLike)) and str(src).endswith(".h5ad"):
        from atlasflow.ingest.h5ad import fingerprint

        return {fingerprint(str(src))}
    return set()


def load_eval_set(sources, cfg: EvalConfig) -> EvalSet:
    """Counts, labels and groups of every labelled cell of the sources (tokenized later, once the
    split says which genes both sides share)."""
    from .pretrained import iter_input

    col_of: dict[str, int] = {}
    labels, groups, names, mats, totals, fps = [], [], [], [], [], {}
    dropped = 0
    for src in sources:
        name = source_name(src)
        fps[name] = _fingerprints(src)
        seen = None
        for ids, obs, X, fids in iter_input(src, cfg.block_cells):
            if cfg.label not in obs.columns:
                raise ValueError(f"EvalConfig.label: source {name} has no obs column {cfg.label!r} "
                                 f"(columns: {', '.join(map(str, obs.columns))})")
            if fids is not seen:
                seen = fids
                cols = np.array([col_of.setdefault(str(f), len(col_of)) for f in fids], dtype=np.int64)
            lab = obs[cfg.label].astype(str).to_numpy(dtype=object)
            if cfg.label_map:
                lab = np.array([cfg.label_map.get(v) for v in lab], dtype=object)
            keep = np.array([v is not None for v in lab], dtype=bool)
            dropped += int((~keep).sum())
            if not keep.any():
                continue
            X = sp.csr_matrix(X)[keep]
            grp = obs[cfg.split_by].astype(str).to_numpy() if cfg.split_by in obs.columns else np.full(len(obs), name)
            labels.append(lab[keep].astype(str))
            groups.append(np.asarray(grp, dtype=str)[keep])
            names.append(np.full(int(keep.sum()), name))
            totals.append(np.asarray(X.sum(axis=1)).ravel())
            coo = X.tocoo()
            mats.append((coo.row, cols[coo.col], coo.data, X.shape[0]))
    if not labels:
        raise ValueError(f"eval: no labelled cells in {[source_name(s) for s in sources]} "
                         f"(label={cfg.label!r}, label_map keys={sorted(cfg.label_map)[:6]})")
    n_genes = len(col_of)
    parts = [sp.csr_matrix((d, (r, c)), shape=(n, n_genes), dtype=np.float32) for r, c, d, n in mats]
    X = sp.vstack(parts, format="csr")
    X.sort_indices()
    return EvalSet(np.concatenate(labels), np.concatenate(groups), np.concatenate(names), X,
                   np.concatenate(totals), list(col_of), fps, dropped)


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


def _score_seeds(cfg: EvalConfig, ckpts: list[str], ctx: dict, out: Path, finetuned: str | None):
    """Every seed's rows for the model (its checkpoint for that seed) and, with ``cfg.control``, a
    random-init control of the same architecture -> (rows per seed, fine-tune records, the first
    seed's embeddings for the plot)."""
    per_seed, ft_info, embs = [], [], None
    for i, seed in enumerate(cfg.seeds):
        ck = ckpts[i % len(ckpts)]
        runs = [("atlasflow", ck)]
        if cfg.control:
            from .eval_metrics import random_init_checkpoint

            runs.append(("random-init control", random_init_checkpoint(ck, str(out / "control" / f"seed{seed}"), seed)))
        seed_out = {"transfer": [], "cv": [], "cluster": [], "scib": []}
        for kind, c in runs:
            res = _score_model(kind, c, seed, cfg, ctx, out, finetuned if kind == "atlasflow" else None)
            for key in seed_out:
                seed_out[key] += res[key]
            if res["finetune"]:
                ft_info.append({"model": kind, "seed": seed, **res["finetune"]})
            if kind == "atlasflow" and i == 0:
                embs = res["emb"]
        per_seed.append(seed_out)
    return per_seed, ft_info, embs


def run_eval(checkpoint, store, out: str = "atlasflow_eval", cfg: EvalConfig | None = None,
             medians_store: str | None = None, finetuned: str | None = None) -> dict:
    """Evaluate ``checkpoint`` on ``store``: a store path, an .h5ad, a QueryConfig, or a list of them.

    ``checkpoint``: one checkpoint, or a list of them (one per pretraining seed, paired with
    ``cfg.seeds`` in order; a single checkpoint serves every seed). Returns the tables as a dict
    (also written to out/eval.json, eval.md and the PNGs). ``finetuned``: an existing fine-tuned
    checkpoint to score instead of fine-tuning here (one seed, no control fine-tune).
    """
    from .baselines import baseline_rows, scores
    from .pretrained import PretrainedModel

    cfg = cfg or EvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = [str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else [str(checkpoint)]
    if len(ckpts) > 1 and len(ckpts) != len(cfg.seeds):
        raise ValueError(f"EvalConfig.seeds: {len(ckpts)} checkpoints need {len(ckpts)} seeds, got {cfg.seeds}")
    model = PretrainedModel(ckpts[0], medians_store, meta_tokens=cfg.meta_tokens)
    sources = list(store) if isinstance(store, (list, tuple)) else [store]
    es = load_eval_set(sources, cfg)
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
    leakage = _leakage(pre, test_groups, seen, es.groups[te])

    ytr, yte = es.labels[tr], es.labels[te]
    # Every row sees the genes measured in both training and test cells: a gene absent from one
    # side (another panel or genome build) carries no transferable signal.
    Xtr, Xte = es.X[tr], es.X[te]
    shared = np.flatnonzero((np.asarray((Xtr > 0).sum(0)).ravel() > 0) & (np.asarray((Xte > 0).sum(0)).ravel() > 0))
    genes = {es.feature_ids[j] for j in shared} if cfg.shared_genes else None
    n_tok = int(sum(1 for f in (genes if genes is not None else es.feature_ids) if f in model.token_of))
    log.info("tokens over %d genes (%d detected in both training and test cells, %d of them in the checkpoint "
             "vocabulary of %d)", n_tok, len(shared), n_tok, len(model.vocab.gene_feature_ids))
    brows, binfo = baseline_rows(Xtr[:, shared], Xte[:, shared], ytr, yte, totals_tr=es.totals[tr],
                                 totals_te=es.totals[te], n_hvg=cfg.n_hvg, n_pcs=cfg.n_pcs, k=cfg.k, seed=cfg.seed)
    # Reference point: what predicting the most frequent training label scores on this test set.
    major = max(sorted(set(ytr.tolist())), key=lambda c: int((ytr == c).sum()))
    mrow = {"features": "none (reference)", "classifier": f"majority training label ({major})",
            **scores(yte, np.full(len(yte), major, dtype=object))}
    pca_all = _pca_all(es, shared, cfg)
    ctx = {"es": es, "tr": tr, "te": te, "genes": genes, "is_test": is_test, "medians_store": medians_store}
    per_seed, ft_info, embs = _score_seeds(cfg, ckpts, ctx, out, finetuned)
    table = assemble(cfg, ckpts, [source_name(s) for s in sources], es, tr, te, test_groups, unseen_label, ytr, yte,
                     shared, n_tok, binfo, leakage, per_seed, brows, mrow, ft_info, pca_all)
    (out / "eval.json").write_text(json.dumps(table, indent=1, default=list))
    (out / "eval.md").write_text(to_markdown(table))
    if cfg.plot:
        from .eval_plots import plot_embedding, plot_scores

        table["embedding_png"] = str(plot_embedding(embs[cfg.pooling], es.labels, is_test, out / "embedding.png",
                                                    cfg.seed, f"atlasflow embedding ({cfg.pooling} pooling, t-SNE)"))
        table["scores_png"] = str(plot_scores(table["rows"], out / "scores.png",
                                              title=f"{cfg.label}: test {sorted(test_groups)}"))
        (out / "eval.json").write_text(json.dumps(table, indent=1, default=list))
    return table


def _leakage(pre: dict, test_groups: set, seen: set, test_cell_groups) -> dict:
    leaked = sorted(g for g in test_groups if g in seen)
    leakage = {"pretraining_store": pre["store"], "pretraining_split": pre.get("split"),
               "test_groups_in_pretraining": leaked,
               "test_cells_in_pretraining": int(np.isin(test_cell_groups, leaked).sum()),
               "check": "dataset_id values, and .h5ad content fingerprints, vs the cells the checkpoint was pretrained on"}
    if "error" in pre:
        leakage["warning"] = f"pretraining store unreadable, leakage not checked: {pre['error']}"
    elif leaked:
        leakage["warning"] = (f"{len(leaked)} test group(s) were in the pretraining data: {leaked[:5]}; embedding "
                              f"rows may be optimistic")
    if "warning" in leakage:
        log.warning("%s", leakage["warning"])
    return leakage


def _pca_all(es: EvalSet, shared: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """PCA of log1p HVG counts of every cell (shared genes): the unintegrated reference of the
    within-test-set and scib tables (no classifier is trained across the split on it)."""
    from .baselines import highly_variable, log1p_normalize, pca_features

    n = log1p_normalize(es.X[:, shared], es.totals)
    h = n[:, highly_variable(n, cfg.n_hvg)]
    return pca_features(h, h[:1], cfg.n_pcs, cfg.seed)[0]


def _score_model(kind: str, ckpt: str, seed: int, cfg: EvalConfig, ctx: dict, out: Path,
                 finetuned: str | None) -> dict:
    """Rows of one model (pretrained or control) at one seed: transfer, cv, cluster, scib."""
    from .baselines import embedding_rows, scores
    from .pretrained import PretrainedModel, tokenize
    from .eval_metrics import clustering_scores, cv_label_prediction, scib_available, scib_scores

    es, tr, te, genes = ctx["es"], ctx["tr"], ctx["te"], ctx["genes"]
    ytr, yte = es.labels[tr], es.labels[te]
    model = PretrainedModel(ckpt, ctx["medians_store"], meta_tokens=cfg.meta_tokens)
    tok, _ = model.tokenizer_for(es.feature_ids, genes)
    block = tokenize(tok, es.X, np.arange(es.X.shape[0]))
    pools = tuple(dict.fromkeys((*cfg.embedding_poolings, cfg.pooling)))
    pools = tuple(p for p in pools if p != "rank_mean" or model.encoding.ranked or p == cfg.pooling)
    emb = model.embed_poolings(block, pools)
    name = "atlasflow embedding" if kind == "atlasflow" else "random-init control embedding"
    res = {"transfer": [], "cv": [], "cluster": [], "scib": [], "finetune": None, "emb": emb}
    for p in (p for p in cfg.embedding_poolings if p in pools):
        res["transfer"] += embedding_rows(emb[p][tr], emb[p][te], ytr, yte, name=f"{name} ({p} pooling)",
                                          k=cfg.k, seed=seed)
    z = emb[cfg.pooling]
    feat = f"{name} ({cfg.pooling} pooling)"
    if cfg.cv_folds:
        res["cv"] = [{"features": feat, **r} for r in cv_label_prediction(z[te], yte, cfg.cv_folds, seed)]
    if cfg.cluster:
        res["cluster"] = [{"features": feat, "classifier": "clustering", **clustering_scores(z[te], yte, seed)}]
    if cfg.scib and scib_available():
        both = np.concatenate([tr, te])
        res["scib"] = [{"features": feat, "classifier": "scib-metrics",
                        **scib_scores(z[both], es.labels[both], es.sources[both])}]
    if finetuned or (cfg.finetune_steps and (kind == "atlasflow" or cfg.finetune_control)):
        from .finetune import FinetuneConfig, load_classifier, predict, run_finetune_counts

        if not finetuned:
            tag = f"{'pre' if kind == 'atlasflow' else 'ctrl'}-seed{seed}"
            # a fresh fine-tune per evaluation: Ray Train would treat the same storage path + name as a resume
            shutil.rmtree(out / "finetune" / tag, ignore_errors=True)
            fcfg = FinetuneConfig.from_dict({
                "label": cfg.label, "mode": cfg.finetune_mode, "pooling": cfg.pooling, "steps": cfg.finetune_steps,
                "seed": seed, "num_workers": cfg.finetune_workers, "in_process": cfg.finetune_in_process,
                "storage_path": str(out / "finetune"), "name": tag, **cfg.finetune})
            r = run_finetune_counts(ckpt, es.X[tr], es.feature_ids, ytr, fcfg, groups=es.groups[tr], genes=genes,
                                    model=model)
            finetuned = r["checkpoint"]
        clf, classes, meta = load_classifier(finetuned)
        pred = predict(clf, classes, block.take(te))
        mode, pool = meta["config"]["mode"], meta["config"]["pooling"]
        who = "atlasflow" if kind == "atlasflow" else "random-init control"
        ft_scores = scores(yte, pred)
        res["transfer"].append({"features": f"fine-tuned {who} ({mode} encoder, {pool} pooling)",
                                "classifier": "linear head", **ft_scores})
        # each fine-tune takes minutes: its score as it lands, not only in the final report
        log.info("fine-tuned %s, seed %d: test accuracy %.3f, macro-F1 %.3f (best step %s of %s)", who, seed,
                 ft_scores["accuracy"], ft_scores["macro_f1"], meta.get("best_step"), meta["config"]["steps"])
        res["finetune"] = {"checkpoint": str(finetuned), "mode": mode, "max_steps": meta["config"]["steps"],
                           "best_step": meta.get("best_step"), "stopped_at": meta.get("stopped_at"),
                           "best_val_loss": meta.get("best_val_loss"), "validation": meta.get("validation"),
                           "thinning": meta.get("thinning")}
    return res
