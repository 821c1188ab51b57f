"""The encodings shoot-out: every encoding x objective pretrained with the same model, context, batch,
steps and seeds on the same store, then scored by the evaluation protocol (``atlasflow eval``) on a
dataset no model pretrained on. Writes shootout.json, shootout.md and shootout.png under --work.

    python -m atlasflow.infra.bench.encodings --work /tmp/atlasflow_shootout [--variants rank,bin,...]
        [--seeds 0,1,2] [--steps 300] [--finetune-steps 150] [--max-len 256] [--preset debug] [--no-scib]

Variants are ``encoding`` (MLM) or ``encoding:ntp`` (next-token prediction), see
``atlasflow.loader.encodings``; ``+meta`` adds metadata tokens (``data.meta_columns``) for the obs
column ``dataset_id`` and ``assay``. Protocol (the pretraining issue's): pretrain on the PBMC sources
SoupX + Kang + scirpy (``../shared/data``), one run per seed; evaluate with cell types harmonized to
B / CD4 T / CD8 T, train on SoupX, test on Garnett/Zheng 2017 (never pretrained on): the fine-tuned
head, the frozen embedding (kNN, logistic regression), the random-init control of the same
architecture, PCA / logistic regression on HVGs, cz-benchmarks CV and clustering on the test cells,
scib-metrics; mean +/- sd over the seeds. Also the bin occupancy of the binned encodings on the
pretraining store.

Budget (2 cores, debug preset 2 x 64, max_len 256, batch 16, 300 steps, fine-tunes <= 150 steps):
about 1 minute per pretraining run and 3 to 4 for a variant's evaluation. The same command with
``--preset gpu --max-len 2048 --steps 20000`` (and a GPU machine) is the large-scale version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from .eval_report import GARNETT, LABEL_MAP, SOUPX, _dataset_value, pbmc_store, pretrain
from .util import environment

DEFAULT_VARIANTS = ("rank", "bin", "ebin", "value", "rank_value", "uce", "rank:ntp", "rank+meta")
META_COLUMNS = ("dataset_id", "assay")


def parse_variant(v: str) -> dict:
    from atlasflow.loader.encodings import get_encoding

    meta = v.endswith("+meta")
    base = v[: -len("+meta")] if meta else v
    enc, _, objective = base.partition(":")
    get_encoding(enc)
    objective = objective or "mlm"
    if objective not in ("mlm", "ntp"):
        raise ValueError(f"--variants: {v!r}: objective must be mlm or ntp")
    if objective == "ntp" and not get_encoding(enc).causal_ok:
        raise ValueError(f"--variants: {v!r}: next-token prediction needs an ordered encoding (rank, rank_value, uce)")
    return {"name": v, "tokenizer": enc, "objective": objective, "meta": meta}


def _row(rows, features: str, classifier: str | None = None) -> dict | None:
    for r in rows or []:
        if r["features"].startswith(features) and (classifier is None or r["classifier"].startswith(classifier)):
            return r
    return None


def _pm(r: dict | None, key: str) -> dict | None:
    if r is None:
        return None
    return {"mean": r[key], "sd": r.get(key + "_sd", 0.0), "n": r.get("n_seeds", 1)}


def summarize(tab: dict) -> dict:
    """The numbers of one variant's evaluation the comparison reads (mean / sd / seeds each)."""
    rows, cv, cl, sc = tab["rows"], tab.get("cv_test_cells"), tab.get("clustering_test_cells"), tab.get("scib_all_cells")
    sc = sc if isinstance(sc, list) else []
    emb, ctl = "atlasflow embedding (mean pooling)", "random-init control embedding (mean pooling)"
    out = {
        "finetuned": {k: _pm(_row(rows, "fine-tuned atlasflow"), k) for k in ("accuracy", "macro_f1")},
        "finetuned_control": {k: _pm(_row(rows, "fine-tuned random-init control"), k) for k in ("accuracy", "macro_f1")},
        "frozen_lr": {k: _pm(_row(rows, emb, "logistic"), k) for k in ("accuracy", "macro_f1")},
        "frozen_knn": {k: _pm(_row(rows, emb, "kNN"), k) for k in ("accuracy", "macro_f1")},
        "frozen_cls_lr": {k: _pm(_row(rows, "atlasflow embedding (cls pooling)", "logistic"), k)
                          for k in ("accuracy", "macro_f1")},
        "control_frozen_lr": {k: _pm(_row(rows, ctl, "logistic"), k) for k in ("accuracy", "macro_f1")},
        "cv_accuracy": _pm(_row(cv, emb), "accuracy"), "control_cv_accuracy": _pm(_row(cv, ctl), "accuracy"),
        "ari": _pm(_row(cl, emb), "ari"), "nmi": _pm(_row(cl, emb), "nmi"), "control_ari": _pm(_row(cl, ctl), "ari"),
        "scib_total": _pm(_row(sc, emb), "total"), "scib_bio": _pm(_row(sc, emb), "bio_conservation"),
        "scib_batch": _pm(_row(sc, emb), "batch_correction"), "control_scib_total": _pm(_row(sc, ctl), "total"),
    }
    base = {"pca_knn": _row(rows, "PCA(", "kNN"), "pca_lr": _row(rows, "PCA(", "logistic"),
            "hvg_lr": _row(rows, "log1p-normalized counts"), "majority": _row(rows, "none (reference)"),
            "pca_cv": _row(cv, "PCA("), "pca_cluster": _row(cl, "PCA("), "pca_scib": _row(sc, "PCA(")}
    out["baselines"] = {k: ({kk: v[kk] for kk in ("accuracy", "macro_f1", "ari", "nmi", "total") if kk in v}
                            if v else None) for k, v in base.items()}
    return out


def bin_occupancy_of(store: str, tokenizer: str, max_len: int, cells: int = 2000) -> dict:
    """Occupancy of bins 1..n_bins-1 over the first ``cells`` cells of the store, and its entropy."""
    import numpy as np

    from atlasflow.loader import LoaderConfig, make_loader
    from atlasflow.loader.encodings.ebin import bin_occupancy

    loader = make_loader(store, LoaderConfig(tokenizer=tokenizer, max_len=max_len, batch_size=50, shuffle=False))
    parts, n = [], 0
    for b in loader:
        parts.append(b["bins"][b["attention_mask"]].numpy())
        n += len(b["soma_joinid"])
        if n >= cells:
            break
    occ = bin_occupancy(np.concatenate(parts), n_bins=51)
    nz = occ[occ > 0]
    return {"cells": n, "bins_used": int((occ > 0).sum()), "largest_bin_share": float(occ.max()),
            "entropy_bits": float(-(nz * np.log2(nz)).sum()), "max_entropy_bits": float(np.log2(50)),
            "occupancy": [round(float(x), 4) for x in occ]}


def run_variant(v: dict, store: str, data: Path, work: Path, seeds, steps: int, finetune_steps: int,
                max_len: int, preset: str, scib: bool) -> dict:
    from atlasflow.train.tasks.evaluate import EvalConfig, run_eval

    over = {"data.tokenizer": v["tokenizer"], "objective.kind": v["objective"], "data.max_len": max_len,
            "run.num_workers": 1, "run.cpus_per_worker": float(os.cpu_count() or 1)}
    if v["meta"]:
        over["data.meta_columns"] = list(META_COLUMNS)
    safe = v["name"].replace(":", "_").replace("+", "_")
    runs = []
    for s in seeds:
        runs.append(pretrain(store, work / "runs", f"{safe}_{preset}_L{max_len}_s{s}", steps,
                             {**over, "data.seed": int(s)}, preset))
    cfg = EvalConfig(label="cell_type", split_by="dataset", label_map=LABEL_MAP, finetune_steps=finetune_steps,
                     seeds=tuple(seeds), finetune_in_process=True, scib=scib, plot=False,
                     test_groups=(_dataset_value(data / GARNETT),),
                     finetune={"eval_every": max(5, finetune_steps // 6), "patience": 3})
    t0 = time.time()
    tab = run_eval([r["checkpoint"] for r in runs], [str(data / SOUPX), str(data / GARNETT)],
                   str(work / f"eval_{safe}"), cfg)
    out = {**v, "pretraining": runs, "eval_seconds": round(time.time() - t0, 1), "summary": summarize(tab)}
    if v["meta"]:  # the same checkpoints without their metadata tokens: does the model lean on them?
        drop = EvalConfig(**{**cfg.__dict__, "meta_tokens": "drop", "finetune_steps": 0})
        tab = run_eval([r["checkpoint"] for r in runs], [str(data / SOUPX), str(data / GARNETT)],
                       str(work / f"eval_{safe}_dropped"), drop)
        out["summary_dropped"] = summarize(tab)
    secs = [r["seconds"] for r in runs if r.get("seconds")]
    out["pretrain_seconds_median"] = statistics.median(secs) if secs else None
    tps = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
    out["tokens_per_s_median"] = statistics.median(tps) if tps else None
    out["tokens_seen_median"] = statistics.median([r["tokens_seen"] for r in runs if r.get("tokens_seen")] or [0])
    return out


def _fmt(x: dict | None) -> str:
    if not x:
        return "—"
    return f"{x['mean']:.3f} ± {x['sd']:.3f}" if x.get("n", 1) > 1 else f"{x['mean']:.3f}"


def to_markdown(out: dict) -> str:
    res = out["variants"]
    lines = [f"Seeds {out['seeds']}; {out['steps']} pretraining steps, max_len {out['max_len']}, preset "
             f"{out['preset']}; fine-tunes <= {out['finetune_steps']} steps. Load average at start "
             f"{out['environment'].get('loadavg')}, at end {out.get('loadavg_end')}.", "",
             "| variant | fine-tuned acc | control fine-tuned | frozen mean + LR | control frozen | frozen kNN | "
             "CV acc (test cells) | control CV | ARI | scib total | tokens seen | tokens/s | pretrain s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res:
        s = r["summary"]
        lines.append(f"| {r['name']} | {_fmt(s['finetuned']['accuracy'])} | {_fmt(s['finetuned_control']['accuracy'])} | "
                     f"{_fmt(s['frozen_lr']['accuracy'])} | {_fmt(s['control_frozen_lr']['accuracy'])} | "
                     f"{_fmt(s['frozen_knn']['accuracy'])} | {_fmt(s['cv_accuracy'])} | "
                     f"{_fmt(s['control_cv_accuracy'])} | {_fmt(s['ari'])} | "
                     f"{_fmt(s['scib_total'])} | {r['tokens_seen_median']:,.0f} | "
                     f"{(r['tokens_per_s_median'] or 0):,.0f} | {r['pretrain_seconds_median']} | {r['eval_seconds']} |")
        if r.get("summary_dropped"):
            d = r["summary_dropped"]
            lines.append(f"| {r['name']}, tokens dropped at eval | — | — | {_fmt(d['frozen_lr']['accuracy'])} | "
                         f"{_fmt(d['control_frozen_lr']['accuracy'])} | {_fmt(d['frozen_knn']['accuracy'])} | "
                         f"{_fmt(d['cv_accuracy'])} | {_fmt(d['control_cv_accuracy'])} | {_fmt(d['ari'])} | "
                         f"{_fmt(d['scib_total'])} | | | | |")
    lines += ["", "| variant | fine-tuned macro-F1 | control fine-tuned macro-F1 | frozen mean + LR macro-F1 | NMI | "
              "control ARI | scib bio | scib batch | control scib total |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res:
        s = r["summary"]
        lines.append(f"| {r['name']} | {_fmt(s['finetuned']['macro_f1'])} | {_fmt(s['finetuned_control']['macro_f1'])} | "
                     f"{_fmt(s['frozen_lr']['macro_f1'])} | {_fmt(s['nmi'])} | {_fmt(s['control_ari'])} | "
                     f"{_fmt(s['scib_bio'])} | {_fmt(s['scib_batch'])} | {_fmt(s['control_scib_total'])} |")
    b = res[0]["summary"]["baselines"] if res else {}
    if b:
        def acc(k, key="accuracy"):
            return f"{b[k][key]:.3f}" if b.get(k) and key in b[k] else "—"
        lines += ["", f"Baselines (same split, same for every variant): PCA(50) kNN {acc('pca_knn')}, PCA(50) LR "
                      f"{acc('pca_lr')}, LR on HVGs {acc('hvg_lr')}, majority label {acc('majority')}; PCA CV "
                      f"{acc('pca_cv')}, PCA ARI {acc('pca_cluster', 'ari')}, PCA scib total {acc('pca_scib', 'total')}."]
    for k, v in out.get("bin_occupancy", {}).items():
        lines.append(f"- bin occupancy `{k}`: {v['bins_used']} of 50 bins used, largest {v['largest_bin_share']:.2f}, "
                     f"entropy {v['entropy_bits']:.2f} of {v['max_entropy_bits']:.2f} bits ({v['cells']} cells)")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = out["variants"]
    keys = [("finetuned", "fine-tuned"), ("finetuned_control", "control fine-tuned"),
            ("frozen_lr", "frozen mean + LR"), ("control_frozen_lr", "control frozen")]
    x = np.arange(len(res))
    w = 0.2
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(res)), 4))
    for i, (k, label) in enumerate(keys):
        m = [r["summary"][k]["accuracy"]["mean"] if r["summary"][k]["accuracy"] else 0 for r in res]
        sd = [r["summary"][k]["accuracy"]["sd"] if r["summary"][k]["accuracy"] else 0 for r in res]
        ax.bar(x + (i - 1.5) * w, m, w, yerr=sd, label=label, capsize=2)
    b = res[0]["summary"]["baselines"] if res else {}
    for k, label, style in (("pca_lr", "PCA(50) + LR", "--"), ("majority", "majority label", ":")):
        if b.get(k):
            ax.axhline(b[k]["accuracy"], color="k", linestyle=style, linewidth=1, label=label)
    ax.set_xticks(x, [r["name"] for r in res], rotation=20)
    ax.set_ylabel("accuracy on Garnett (held out)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.set_title(f"encodings shoot-out: {out['steps']} steps, max_len {out['max_len']}, seeds {out['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlasflow.infra.bench.encodings", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="./atlasflow_shootout")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--preset", default="debug")
    p.add_argument("--no-scib", action="store_true")
    p.add_argument("--data", help="folder of the real .h5ad files (default: $ATLASFLOW_SHARED_DATA or ../shared/data)")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, store = pbmc_store(work, args.data)
    out = {"format": "atlasflow.bench.encodings", "version": 1, "environment": environment(), "seeds": list(seeds),
           "steps": args.steps, "max_len": args.max_len, "preset": args.preset, "finetune_steps": args.finetune_steps,
           "store": store, "variants": [], "bin_occupancy": {}}
    for tok in sorted({v["tokenizer"] for v in variants} & {"bin", "ebin"}):
        out["bin_occupancy"][tok] = bin_occupancy_of(store, tok, args.max_len)
    for v in variants:
        out["variants"].append(run_variant(v, store, data, work, seeds, args.steps, args.finetune_steps,
                                           args.max_len, args.preset, not args.no_scib))
        out["loadavg_end"] = list(os.getloadavg())
        (work / "shootout.json").write_text(json.dumps(out, indent=1, default=str))  # after every variant
    (work / "shootout.md").write_text(to_markdown(out))
    plot(out, work / "shootout.png")
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
