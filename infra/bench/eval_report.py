"""Reproduce the evaluation runs quoted in the README; writes report.json and report.md.

    python -m atlasflow.infra.bench.eval_report --work /tmp/atlasflow_eval [--only real|synthetic] [--steps N]
        [--seeds 0,1,2] [--pretrain-seeds 3] [--preset debug] [--max-len 1024] [--cell-weight W] [--contrast-weight W]
        [--reverse]

real: pretrain (MLM, CPU, Ray Train) on the unlabelled-or-other PBMC sources of ../shared/data
(SoupX PBMC4k, Kang 2018, scirpy Wu 2020), once per pretraining seed, then score cell types with
labels harmonized to {B, CD4 T, CD8 T}: train on SoupX, test on Garnett/Zheng 2017 (never
pretrained on); with ``--reverse`` also the other way round, where the test source WAS in
pretraining (the leakage check flags it). Every trained row runs once per seed (pretraining
checkpoint i pairs with seed i; with fewer pretraining seeds than seeds, checkpoints are reused
in turn, and the report says so), next to a random-init control of the same architecture.
synthetic: a synthetic atlas store, pretraining restricted to the ``train`` split of dataset_id,
evaluated with a dataset-level split that holds out datasets the model never saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# The real datasets: ATLASFLOW_SHARED_DATA, else ../shared/data beside the checkout (--data overrides both).
SHARED_DATA = Path(os.environ.get("ATLASFLOW_SHARED_DATA")
                   or Path(__file__).resolve().parents[2].parent / "shared" / "data")
SOUPX = "soupx_pbmc4k_2170cells_counts.h5ad"
GARNETT = "garnett_zheng2017_pbmc_800cells_counts.h5ad"
KANG = "harmony_kang2018_ctrl_stim_2000cells_counts.h5ad"
SCIRPY = "scirpy_wu2020_200cells_counts.h5ad"
# Harmonized PBMC labels; MNP, NK and '?' have no counterpart in the FACS-sorted Garnett set.
LABEL_MAP = {"B": "B", "T_CD4": "CD4 T", "T_CD8": "CD8 T",
             "B cells": "B", "CD4 T cells": "CD4 T", "CD8 T cells": "CD8 T"}


def _finished(runs: Path, name: str, steps: int) -> str | None:
    """The latest checkpoint of an earlier run of this report with at least ``steps`` steps."""
    for ck in sorted((runs / name).glob("checkpoint_*"), reverse=True):
        st = ck / "train_state.json"
        if st.is_file() and json.loads(st.read_text()).get("step", 0) >= steps:
            return str(ck)
    return None


def pretrain(store: str, runs: Path, name: str, steps: int, overrides: dict | None = None,
             preset: str = "debug") -> dict:
    from atlasflow.train import load_preset, read_part, run_training

    done = _finished(runs, name, steps)
    if done:  # re-running the report re-evaluates without pretraining again
        st = read_part(done, "train_state.json")
        last = st["history"][-1]
        return {"checkpoint": done, "steps": steps, "final_loss": last.get("loss"),
                "masked_accuracy": last.get("masked_accuracy"), "seconds": st.get("bench_seconds"), "reused": True,
                **_signals(last)}

    cfg = load_preset(preset).with_overrides({
        "data.store": store, "run.storage_path": str(runs), "run.name": name, "train.max_steps": steps,
        "train.epochs": 1000, "train.ckpt_every": steps, "train.log_every": max(1, steps // 10),
        "optim.warmup_steps": max(1, steps // 20), **(overrides or {})})
    t0 = time.time()
    out = run_training(cfg)
    seconds = round(time.time() - t0, 1)
    return {"checkpoint": out["checkpoint"], "steps": out["step"], "final_loss": out["metrics"].get("loss"),
            "masked_accuracy": out["metrics"].get("masked_accuracy"), "seconds": seconds,
            **_signals(out["metrics"])}


def _signals(last: dict) -> dict:
    """The learning signals and throughput of a run's last logged step."""
    return {k: last.get(k) for k in ("unigram_loss", "position_unigram_loss", "cell_loss", "cell_unigram_loss",
                                     "contrast_loss", "contrast_chance",
                                     "tokens_seen", "cells_seen", "tokens_per_s", "cells_per_s")}


def pbmc_store(work: Path, data_dir: str | None = None) -> tuple[Path, str]:
    """(the real-data folder, the pretraining store of SoupX + Kang + scirpy under ``work``, built once)."""
    from atlasflow.ingest import ingest_paths
    from atlasflow.store import open_store
    from atlasflow.store.stats import compute_gene_stats

    data = Path(data_dir) if data_dir else SHARED_DATA
    for f in (SOUPX, GARNETT, KANG, SCIRPY):
        if not (data / f).is_file():
            raise FileNotFoundError(f"real-data run: {data / f} missing (the ../shared/data checkout)")
    store = str(work / "pbmc_pretrain_store")
    if not Path(store).exists():
        rep = ingest_paths(store, [str(data / f) for f in (SOUPX, KANG, SCIRPY)], progress=False)
        if not rep.ok and not rep.skipped:
            raise RuntimeError(f"ingest failed: {rep.to_dict()}")
    try:  # an interrupted earlier run may have stopped between ingest and stats
        open_store(store).gene_stats()
    except LookupError:
        compute_gene_stats(store)
    return data, store


def run_real(work: Path, steps: int, finetune_steps: int, seeds=(0, 1, 2), pretrain_seeds: int = 3,
             preset: str = "debug", max_len: int = 1024, reverse: bool = False, scib: bool = True,
             data_dir: str | None = None, cell_weight: float | None = None,
             contrast_weight: float | None = None, control_finetune: bool = True) -> dict:
    from atlasflow.train.tasks.evaluate import EvalConfig, run_eval

    data, store = pbmc_store(work, data_dir)
    pres = []
    from atlasflow.train import load_preset

    obj = load_preset(preset).objective
    cw = obj.cell_weight if cell_weight is None else float(cell_weight)
    xw = obj.contrast_weight if contrast_weight is None else float(contrast_weight)
    for s in list(seeds)[:max(1, pretrain_seeds)]:
        name = f"pbmc_{preset}_L{max_len}_s{s}" + (f"_cw{cw:g}" if cw else "") + (f"_xw{xw:g}" if xw else "")
        pres.append(pretrain(store, work / "runs", name,
                             steps, {"data.max_len": max_len, "data.seed": int(s), "run.num_workers": 1,
                                     "objective.cell_weight": cw, "objective.contrast_weight": xw,
                                     # Ray gives a worker OMP_NUM_THREADS = its CPUs: one worker, every core
                                     "run.cpus_per_worker": float(os.cpu_count() or 1)}, preset))
    out = {"pretraining": {"sources": [SOUPX, KANG, SCIRPY], "preset": preset, "max_len": max_len,
                           "cell_weight": cw, "contrast_weight": xw, "seeds": list(seeds)[:len(pres)], "runs": pres},
           "evals": {}}
    cfg = EvalConfig(label="cell_type", split_by="dataset", label_map=LABEL_MAP, finetune_steps=finetune_steps,
                     seeds=tuple(seeds), finetune_in_process=True, scib=scib, finetune_control=control_finetune,
                     finetune={"eval_every": max(5, finetune_steps // 6), "patience": 3})
    ckpts = [p["checkpoint"] for p in pres]
    ckpts = [ckpts[i % len(ckpts)] for i in range(len(seeds))]
    pairs = [("soupx_to_garnett", SOUPX, GARNETT)] + ([("garnett_to_soupx", GARNETT, SOUPX)] if reverse else [])
    for name, train_src, test_src in pairs:
        test_group = _dataset_value(data / test_src)
        t0 = time.time()
        tab = run_eval(ckpts, [str(data / train_src), str(data / test_src)], str(work / name),
                       EvalConfig(**{**cfg.__dict__, "test_groups": (test_group,)}))
        tab["seconds"] = round(time.time() - t0, 1)
        out["evals"][name] = tab
    return out


def _dataset_value(path: Path) -> str:
    import anndata as ad

    a = ad.read_h5ad(path, backed="r")
    try:
        return str(a.obs["dataset"].astype(str).iloc[0])
    finally:
        a.file.close()


def run_synthetic(work: Path, steps: int, finetune_steps: int, n_cells: int = 6000, n_genes: int = 2000,
                  n_datasets: int = 10) -> dict:
    from atlasflow.ingest.synth import synthesize
    from atlasflow.store.stats import compute_gene_stats

    from atlasflow.train.tasks.evaluate import EvalConfig, run_eval

    store = str(work / "synth_store")
    if not Path(store).exists():
        synthesize(store, n_cells, n_genes, n_datasets, 0, layout="store")
        compute_gene_stats(store)
    pre = pretrain(store, work / "runs", "synth", steps, {"data.split": "train"})
    t0 = time.time()
    tab = run_eval(pre["checkpoint"], store, str(work / "synth_eval"),
                   EvalConfig(label="cell_type", split_by="dataset_id", finetune_steps=finetune_steps,
                              finetune_in_process=True))
    tab["seconds"] = round(time.time() - t0, 1)
    return {"pretraining": {"store": store, "n_cells": n_cells, "n_genes": n_genes, "n_datasets": n_datasets,
                            "split": "train (dataset_id)", **pre}, "eval": tab}


def report_markdown(out: dict) -> str:
    from atlasflow.train.tasks.evaluate import to_markdown

    parts = []
    real = out.get("real")
    if real:
        p = real["pretraining"]
        parts.append(f"## Real data: pretraining on {', '.join(p['sources'])} ({p['preset']} preset, max_len "
                     f"{p['max_len']}, cell_weight {p.get('cell_weight', 0)}, contrast_weight "
                     f"{p.get('contrast_weight', 0)}, {len(p['runs'])} seed(s) {p['seeds']})\n")
        for r in p["runs"]:
            parts.append(f"- {r['checkpoint']}: {r['steps']} steps, loss {r.get('final_loss')}, masked acc "
                         f"{r.get('masked_accuracy')}, cell loss {r.get('cell_loss')} (baseline "
                         f"{r.get('cell_unigram_loss')}), contrast loss {r.get('contrast_loss')} (chance "
                         f"{r.get('contrast_chance')}), {r.get('seconds')} s\n")
        for name, tab in real["evals"].items():
            parts.append(f"\n### {name} ({tab.get('seconds')} s)\n\n{to_markdown(tab)}")
    syn = out.get("synthetic")
    if syn:
        parts.append(f"\n## Synthetic\n\n{to_markdown(syn['eval'])}")
    return "".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlasflow.infra.bench.eval_report", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="./atlasflow_eval_report")
    p.add_argument("--only", choices=("real", "synthetic"))
    p.add_argument("--steps", type=int, default=600, help="pretraining optimizer steps")
    from atlasflow.train.tasks.finetune_config import FinetuneConfig

    p.add_argument("--finetune-steps", type=int, default=FinetuneConfig().steps,
                   help="at most (early stopping); default: atlasflow finetune's")
    p.add_argument("--seeds", default="0,1,2", help="seeds of every trained row")
    p.add_argument("--pretrain-seeds", type=int, default=3, help="pretraining runs (<= number of seeds)")
    p.add_argument("--preset", default="debug")
    p.add_argument("--max-len", type=int, default=1024, help="pretraining context (tokens per cell)")
    p.add_argument("--cell-weight", type=float, help="objective.cell_weight (default: the preset's)")
    p.add_argument("--contrast-weight", type=float, help="objective.contrast_weight (default: the preset's)")
    p.add_argument("--reverse", action="store_true", help="also garnett -> soupx (test source pretrained on)")
    p.add_argument("--no-scib", action="store_true")
    p.add_argument("--no-control-finetune", action="store_true",
                   help="the random-init control's frozen rows only (each fine-tune costs minutes)")
    p.add_argument("--data", help="folder of the real .h5ad files (default: $ATLASFLOW_SHARED_DATA or ../shared/data)")
    args = p.parse_args(argv)
    from atlasflow.infra.cli import configure_logging

    configure_logging(logging.INFO)  # the library's progress (each fine-tune's score as it lands) on stderr
    seeds = tuple(int(v) for v in args.seeds.split(","))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    if args.only in (None, "real"):
        out["real"] = run_real(work, args.steps, args.finetune_steps, seeds, args.pretrain_seeds, args.preset,
                               args.max_len, args.reverse, not args.no_scib, args.data, args.cell_weight,
                               args.contrast_weight, not args.no_control_finetune)
    if args.only in (None, "synthetic"):
        out["synthetic"] = run_synthetic(work, args.steps, args.finetune_steps)
    text = json.dumps(out, indent=1, default=str)
    (work / "report.json").write_text(text)
    (work / "report.md").write_text(report_markdown(out))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
