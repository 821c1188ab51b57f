"""infra/: every YAML parses, and every `atlasflow ...` command it runs exists in our CLI with
those flags (parsed by the real argparse parser of the `atlasflow` command)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from atlasflow.infra.cli import build_parser

INFRA = Path(__file__).resolve().parents[1] / "infra"
YAMLS = sorted(INFRA.rglob("*.yaml"))


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def atlasflow_commands(text: str) -> list[list[str]]:
    """argv lists of the `atlasflow` invocations in a shell string (split at && ; | and newlines)."""
    out = []
    for part in re.split(r"&&|\|\||;|\||\n", text):
        argv = shlex.split(part.strip())
        if ">" in argv:  # drop a redirection
            argv = argv[:argv.index(">")]
        # a subcommand invocation (names/labels "atlasflow" and `atlasflow --help` are not)
        if len(argv) >= 2 and argv[0] == "atlasflow" and not argv[1].startswith("-"):
            out.append(argv)
    return out


def _commands(path: Path) -> list[list[str]]:
    cmds = []
    for doc in yaml.safe_load_all(path.read_text()):
        for s in _strings(doc):
            cmds += atlasflow_commands(s)
    return cmds


def test_there_are_manifests():
    names = {p.relative_to(INFRA).as_posix() for p in YAMLS}
    assert {"cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob-ingest.yaml", "k8s/rayjob-train.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses_and_commands_exist(path, capsys):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: empty"
    parser = build_parser()
    for argv in _commands(path):
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{path.name}: `{shlex.join(argv)}` is not accepted by the atlasflow CLI: "
                        f"{capsys.readouterr().err.strip()}")
        assert callable(args.func)


def test_jobs_run_ingest_stats_and_train_with_shared_storage():
    ingest = _commands(INFRA / "k8s" / "rayjob-ingest.yaml")
    train = _commands(INFRA / "k8s" / "rayjob-train.yaml")
    assert [a[1] for a in ingest] == ["ingest", "store"]
    parser = build_parser()
    (targv,) = train
    t = parser.parse_args(targv[1:])
    assert t.command == "train" and t.preset == "gpu"
    store = parser.parse_args(ingest[0][1:]).store
    assert t.store == store  # train reads what ingest wrote
    # storage_path must be on the volume every pod of the train job mounts
    doc = yaml.safe_load((INFRA / "k8s" / "rayjob-train.yaml").read_text())
    spec = doc["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(t.storage_path.startswith(m + "/") for m in mounts), (t.storage_path, mounts)
    gpus = sum(g["replicas"] for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])
    assert gpus == t.num_workers


def test_command_extraction_catches_a_bad_flag():
    (argv,) = atlasflow_commands("cd /x && atlasflow train --preset debug --no-such-flag 1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv[1:])


def test_dockerfile_installs_atlasflow():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+gpu", text, re.M)
    assert "pip install" in text and "atlasflow --help" in text
    for folder in ("store", "ingest", "loader", "train", "infra"):
        assert re.search(rf"^COPY .*\b{folder} {folder}$", text, re.M), folder


def test_gpu_check_runs_its_logic_on_cpu(tmp_path):
    """The prepared GPU script: the gpu preset's packed path with its baselines, held-out loss and
    throughput summary, the comparison variants (padded SDPA, FSDP on one rank), the varlen-vs-reference
    difference and the loader bench per worker count, on CPU (fp32, small model): the JSON it prints is
    the runs it made."""
    import json

    from atlasflow.infra.gpu_check import run_check
    from atlasflow.train import load_preset, read_part

    rep = run_check(str(tmp_path), steps=12, cells=800, genes=200, datasets=4, cpu=True,
                    variants=("sdpa_padded", "fsdp_1rank"), variant_steps=6, loader_cells=128)
    assert rep["cpu_logic_check"] and rep["device"] == "cpu" and rep["precision"] == "fp32"
    assert rep["complete"] is True and rep["errors"] == {} and rep["skipped"] == []
    main = rep["runs"]["main"]
    assert main["pack"] is load_preset("gpu").data.pack is True  # the GPU preset's packing path ran
    assert main["steps"] == 12 and main["val_step"] == 12
    hist = read_part(main["checkpoint"], "train_state.json")["history"]
    final = [h for h in hist if h["step"] == 12][-1]
    assert main["unigram_loss"] == final["unigram_loss"] and main["loss"] == final["loss"]
    assert main["throughput_rows"] == len({h["step"] for h in hist if h["step"] > 4})
    assert main["mfu"] is None and main["gpu_mem_peak_gb"] is None  # no peak FLOP/s or GPU memory on a CPU
    assert 0 <= main["loader_wait_share_median"] <= 1
    sdpa, fsdp = rep["runs"]["sdpa_padded"], rep["runs"]["fsdp_1rank"]
    assert (sdpa["pack"], sdpa["attention"], sdpa["steps"]) == (False, "sdpa", 6)
    assert fsdp["strategy"] == "fsdp" and fsdp["steps"] == 6
    assert read_part(fsdp["checkpoint"], "config.json")["train"]["strategy"] == "fsdp"
    diff = rep["varlen_vs_reference"]
    assert diff["kernel"].startswith("none") and diff["max_abs_diff"] < 1e-4 * max(1.0, diff["ref_max_abs"])
    assert [r["workers"] for r in rep["loader_workers"]] == [0, 1]
    assert [(r["workers"], r["read_threads"]) for r in rep["loader_threads"]] == [(0, 1), (0, 2)]
    assert all(r["cells"] >= 128 and r["cells_per_s"] > 0 for r in rep["loader_workers"] + rep["loader_threads"])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == rep


def test_gpu_check_skips_the_stages_past_its_budget_and_says_so(tmp_path):
    """A time-limited machine: with the budget spent (0 s, after the store is built) every stage is skipped,
    named in ``skipped`` and not run, the JSON on disk says so and is not ``complete``; the CLI exits 1."""
    import json

    from atlasflow.infra.gpu_check import main, run_check

    rep = run_check(str(tmp_path), steps=4, cells=400, genes=100, datasets=2, cpu=True,
                    variants=("fsdp_1rank",), variant_steps=2, loader_cells=64, budget_s=0.0)
    assert rep["skipped"] == ["varlen_vs_reference", "main", "loader_workers", "loader_threads", "fsdp_1rank"]
    assert rep["runs"] == {} and rep["errors"] == {} and "varlen_vs_reference" not in rep
    assert "loader_workers" not in rep and rep["complete"] is False and rep["budget_s"] == 0.0
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == rep
    assert not (tmp_path / "runs").exists()  # no training started
    assert main(["--out", str(tmp_path), "--cpu", "--budget-s", "0", "--cells", "400", "--genes", "100",
                 "--datasets", "2", "--variants", ""]) == 1


def test_library_messages_go_to_stderr_at_the_cli_level(capsys):
    """Library modules log (one logger per module under ``atlasflow``); the CLI puts them on stderr,
    never on stdout where commands print JSON; -q keeps warnings only; handlers are not stacked."""
    import logging

    from atlasflow.infra.cli import configure_logging

    log = logging.getLogger("atlasflow.train.tasks.evaluate")
    try:
        configure_logging(logging.INFO)
        configure_logging(logging.INFO)
        log.info("tokens over 7 genes")
        out, err = capsys.readouterr()
        assert out == "" and err.count("tokens over 7 genes") == 1 and "atlasflow.train.tasks.evaluate" in err
        configure_logging(logging.WARNING)
        log.info("hidden")
        log.warning("shown")
        err = capsys.readouterr().err
        assert "hidden" not in err and "shown" in err
    finally:
        logging.getLogger("atlasflow").setLevel(logging.NOTSET)


def test_encodings_shootout_variants_parse_and_refuse_what_cannot_train():
    from atlasflow.infra.bench.encodings import DEFAULT_VARIANTS, parse_variant

    assert parse_variant("uce:ntp") == {"name": "uce:ntp", "tokenizer": "uce", "objective": "ntp", "meta": False}
    assert parse_variant("rank+meta")["meta"] and parse_variant("rank+meta")["objective"] == "mlm"
    assert {parse_variant(v)["tokenizer"] for v in DEFAULT_VARIANTS} == {"rank", "bin", "ebin", "value", "rank_value",
                                                                          "uce"}
    for bad, msg in (("bin:ntp", "ordered encoding"), ("words", "not one of"), ("rank:gpt", "mlm or ntp")):
        with pytest.raises(ValueError, match=msg):
            parse_variant(bad)


def test_cli_defaults_are_the_config_defaults():
    """`atlasflow query|embed|finetune|eval` take every default from the config dataclasses."""
    from dataclasses import fields

    from atlasflow.infra.cli import build_parser
    from atlasflow.store.query import QueryConfig
    from atlasflow.train.tasks.embed import EmbedConfig
    from atlasflow.train.tasks.evaluate import EvalConfig
    from atlasflow.train.tasks.finetune_config import FinetuneConfig

    parser = build_parser()
    cases = {
        ("query", "--input", "s"): (QueryConfig, {"per_label_cap", "fraction", "seed"}),
        ("embed", "--checkpoint", "c", "--input", "s"): (EmbedConfig, {"pooling", "batch_size", "device"}),
        ("finetune", "--checkpoint", "c", "--input", "s"): (FinetuneConfig, {
            "label", "mode", "pooling", "steps", "batch_size", "lr", "encoder_lr", "layer_decay", "thin_prob",
            "val_fraction", "val_by", "patience", "seed", "num_workers", "storage_path", "name"}),
        ("eval", "--checkpoint", "c", "--input", "s"): (EvalConfig, {
            "label", "split_by", "test_fraction", "pooling", "finetune_steps", "finetune_mode", "cv_folds",
            "meta_tokens"}),
    }
    for argv, (cls, names) in cases.items():
        args = vars(parser.parse_args(list(argv)))
        want = {f.name: f.default for f in fields(cls) if f.name in names}
        assert len(want) == len(names), (cls, names - set(want))
        assert {k: args[k] for k in names} == want, argv[0]
    ft = vars(parser.parse_args(["finetune", "--checkpoint", "c", "--input", "s"]))
    assert tuple(float(v) for v in ft["thin_range"].split(",")) == FinetuneConfig().thin_range
