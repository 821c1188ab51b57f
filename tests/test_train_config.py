"""Training config: presets, TOML files, dotted overrides, errors naming the field, LR schedule."""

from __future__ import annotations

import math

import pytest

from atlasflow.infra.cli import build_parser
from atlasflow.train.cli import config_from_args
from atlasflow.train.config import Config, load_config, load_preset, preset_names
from atlasflow.train.loop import lr_factor
from atlasflow.train.model import flops_per_token


def test_presets_ship_and_validate():
    assert {"debug", "gpu"} <= set(preset_names())
    debug, gpu = load_preset("debug"), load_preset("gpu")
    assert debug.run.num_workers == 2 and not debug.run.use_gpu and debug.train.precision == "fp32"
    assert (gpu.model.n_layers, gpu.model.d_model, gpu.data.max_len) == (6, 256, 2048)
    assert gpu.run.use_gpu and gpu.train.precision == "bf16"
    # the contrastive term pretrains the user-facing presets (README, Pretraining); debug (tests) stays MLM only
    assert load_preset("cpu-small").objective.contrast_weight == gpu.objective.contrast_weight == 0.1
    assert debug.objective.contrast_weight == 0
    with pytest.raises(ValueError, match="preset: unknown preset 'nope'"):
        load_preset("nope")


def test_overrides_are_typed():
    cfg = load_preset("debug").with_overrides(["optim.lr=3e-4", "data.store=/a b/store", "train.compile=true",
                                               "optim.betas=[0.9, 0.95]", "run.cpus_per_worker=2"])
    assert cfg.optim.lr == 3e-4 and cfg.data.store == "/a b/store" and cfg.train.compile is True
    assert cfg.optim.betas == (0.9, 0.95) and cfg.run.cpus_per_worker == 2.0
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, field", [
    ("model.d_model=30", "model.d_model"),  # not divisible by n_heads=4
    ("model.n_layer=3", "model.n_layer"),  # unknown key
    ("data.tokenizer=\"words\"", "data.tokenizer"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("train.precision=\"fp16\"", "train.precision"),
    ("masking.random_prob=0.5", "masking.random_prob"),
    ("run.fail_rank=5", "run.fail_rank"),
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("trian.max_steps=3", "trian.max_steps"),
    ("nodot", "nodot"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError) as err:
        load_preset("debug").with_overrides([override])
    assert str(err.value).startswith(field)


def test_toml_file_and_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nd_model = 48\nn_heads = 4\n[run]\nname = "x"\n')
    cfg = load_config(f)
    assert cfg.model.d_model == 48 and cfg.run.name == "x" and cfg.data == Config().data
    f.write_text("[model]\nd_model = 'wide'\n")
    with pytest.raises(ValueError, match="model.d_model: expected an integer"):
        load_config(f)
    args = build_parser().parse_args(["train", "--preset", "debug", "--store", "/s", "--storage-path", "/r",
                                      "--name", "n1", "--set", "train.max_steps=5", "--num-workers", "1"])
    cfg = config_from_args(args)
    assert (cfg.data.store, cfg.run.storage_path, cfg.run.name, cfg.train.max_steps, cfg.run.num_workers) == (
        "/s", "/r", "n1", 5, 1)


def test_lr_schedule_by_hand():
    cfg = load_preset("debug").with_overrides(["optim.warmup_steps=4", "train.max_steps=14",
                                               "optim.min_lr_ratio=0.1"])
    assert [lr_factor(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 4) == pytest.approx(1.0)
    assert lr_factor(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cfg, 14) == pytest.approx(0.1)


def test_gpu_preset_flops_per_cell_matches_docs():
    gpu = load_preset("gpu")
    # per layer, per token, forward: 2*(4*d^2 + 2*d*ff) + 4*L*d
    d, ff, L = 256, 1024, 2048
    fwd_layer = 2 * (4 * d * d + 2 * d * ff) + 4 * L * d
    assert flops_per_token(gpu.model, context=L, n_tokens=0) == 3 * 6 * fwd_layer


def test_learning_signal_and_depth_keys():
    small = load_preset("cpu-small")
    assert small.data.max_len >= 1024 and load_preset("debug").data.max_len >= 1024
    assert 2048 <= load_preset("gpu").data.max_len <= 4096
    for name in ("cpu-small", "debug", "gpu"):
        p = load_preset(name)
        assert p.data.thin_range == (0.1, 1.0) and p.data.thin_prob == 0.5 and p.data.expressed_only
    assert small.data.split == "train" and small.train.eval_every > 0 and small.train.eval_cells > 0
    cfg = small.with_overrides(["data.thin_range=[]", "train.eval_every=0"])
    assert cfg.data.thin_range == () and cfg.train.eval_every == 0
    assert Config.from_dict(cfg.to_dict()) == cfg and Config.from_dict(small.to_dict()) == small
    from atlasflow.train.loop import loader_config

    lc = loader_config(small, 0, 1)
    assert lc.thin_range == (0.1, 1.0) and lc.thin_prob == 0.5
    assert loader_config(cfg, 0, 1).thin_range is None


@pytest.mark.parametrize("override, field", [
    ("data.thin_range=[0.5]", "data.thin_range"),
    ("data.thin_range=[0.6, 0.2]", "data.thin_range"),
    ("data.thin_range=[0.0, 1.0]", "data.thin_range"),
    ("data.thin_prob=1.5", "data.thin_prob"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.eval_cells=-5", "train.eval_cells"),
    ("train.baseline_cells=0", "train.baseline_cells"),
    ("data.expressed_only=1", "data.expressed_only"),
])
def test_new_keys_name_the_field(override, field):
    with pytest.raises(ValueError) as err:
        load_preset("cpu-small").with_overrides([override])
    assert str(err.value).startswith(field)
