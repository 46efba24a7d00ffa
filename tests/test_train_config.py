"""Every shipped training config loads, and carries the numbers of ALGORITHM §10."""

from pathlib import Path

import numpy as np
import pytest

from insclr.config import load_config
from insclr.shard.manifest import Manifest
from insclr.train import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = ["s1_base", "s2_base", "s3_base", "s4_impr", "instre_base", "instre_impr", "demo", "demo_impr"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.batch > 0 and cfg.train.steps > 0
    assert cfg.memory.version in ("v1", "v2")
    if cfg.memory.version == "v2":
        assert cfg.noaug.enabled  # the v2 bank keeps no-aug features


def test_recipe_numbers():
    s1, s2, s4 = (load_config(CONFIGS / f"{n}.yaml") for n in ("s1_base", "s2_base", "s4_impr"))
    assert (s1.model.arch, s1.model.head, s1.model.dim, s1.model.init) == ("resnet101", "norm_linear_norm", 2048, "imagenet")
    assert (s1.train.batch, s1.data.size, s1.data.crop_scale, s1.train.lr) == (64, 224, (0.75, 1.33), 1e-4)
    assert (s1.train.steps, s1.train.milestones) == (60000, (40000,))
    assert (s1.memory.start_step, s1.memory.get_step, s1.memory.get_size, s1.memory.potential_positive) == (2000, 4000, 100000, 50)
    assert (s2.model.init, s2.data.pool, s2.train.steps) == ("runs/s1/model.pt", "runs/s1/pool.npz", 60000)
    assert (s4.train.batch, s4.data.size, s4.data.crop_scale, s4.train.lr) == (16, 448, (0.4, 1.0), 3e-5)
    assert (s4.train.steps, s4.train.milestones, s4.memory.version) == (40000, (20000,), "v2")
    assert (s4.memory.positive_thresh, s4.memory.negative_thresh, s4.memory.mode) == (0.75, 0.5, "b+i_tr4_avg0.60_k05")
    assert (s4.selection.mode, s4.selection.thresh, s4.noaug.size) == ("fixed", 0.6, 512)


def test_instre_numbers():
    base, impr = load_config(CONFIGS / "instre_base.yaml"), load_config(CONFIGS / "instre_impr.yaml")
    assert (base.model.arch, base.model.head, base.model.dim) == ("resnet50", "linear_norm", 256)
    assert (base.train.batch, base.data.crop_scale, base.train.lr, base.train.steps, base.train.clip_grad) == (24, (0.75, 1.0), 3e-4, 4000, 10.0)
    assert base.memory.start_step >= base.train.steps  # v1 never used within the 4k steps
    assert (impr.train.lr, impr.memory.version, impr.memory.use_negative) == (3e-5, "v2", False)
    assert (impr.memory.positive_thresh, impr.memory.negative_thresh, impr.memory.mode) == (0.95, 0.65, "b+i_tr2_avg0.60_k20")


def test_print_config_applies_overrides(capsys):
    assert main(["--print-config", str(CONFIGS / "demo.yaml"), "train.steps=7"]) == 0
    assert load_config(CONFIGS / "demo.yaml", ["train.steps=7"]).train.steps == 7
    assert "steps: 7" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["--print-config", str(CONFIGS / "demo.yaml"), "train.stepz=7"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(shards_dir, tmp_path, capsys):
    """A missing shard folder, an unreadable pool and a pool of another dataset: `error: ...` naming
    the file, exit status 2, no traceback."""
    out = f"train.out={tmp_path / 'out'}"
    assert main([str(CONFIGS / "demo.yaml"), f"data.shards={tmp_path / 'none'}", out]) == 2
    assert f"shard folder not found: {tmp_path / 'none'}" in capsys.readouterr().err
    gld = f"data.shards={shards_dir / 'gldv2'}"
    bad = tmp_path / "pool.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert main([str(CONFIGS / "demo.yaml"), gld, f"data.pool={bad}", out]) == 2
    assert f"error: {bad}: not a readable candidate pool" in capsys.readouterr().err
    n = len(Manifest.load(shards_dir / "gldv2").labels("part"))
    np.savez(bad, neighbors=np.full((n, 5), n, dtype=np.int32), similarities=np.zeros((n, 5), np.float16))
    assert main([str(CONFIGS / "demo.yaml"), gld, f"data.pool={bad}", out]) == 2
    assert f"error: {bad}: neighbour indices span [{n}, {n}]" in capsys.readouterr().err
