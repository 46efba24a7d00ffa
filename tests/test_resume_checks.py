"""Resuming: damaged checkpoints are found by their manifest (auto falls back, an explicit one is an
error), and a run that would not continue the checkpoint exactly is refused with the key named."""

import json
from pathlib import Path

import pytest
import torch

from data_shards import make_shards
from insclr.config import load_config
from insclr.train import checkpoint
from insclr.train.resume import MAY_CHANGE, check_compatible, load_checkpoint, resume_keys

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _save(out, step):
    cfg = load_config(None, [f"train.out={out}"])
    return checkpoint.save(out, step, {"step": step}, {"bank": torch.full((4,), float(step))},
                           {"rng": checkpoint.rng_state()}, cfg, keep=0)


@pytest.fixture()
def three(tmp_path):
    return [_save(tmp_path, step) for step in (10, 20, 30)]


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_auto_falls_back_past_a_damaged_latest_checkpoint(tmp_path, three, capsys, damage):
    bad = three[-1] / "banks.pt"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
        bad.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        bad.unlink()
    path, manifest, shared, banks, _ = load_checkpoint("auto", tmp_path, "cpu")
    assert path == three[1] and shared["step"] == 20 and manifest["step"] == 20
    err = capsys.readouterr().err
    assert f"warning: {bad}: " in err and "skipping checkpoint step-00000030" in err


def test_explicit_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, three):
    (three[1] / "rank-0.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"step-00000020/rank-0\.pt: .*bytes"):
        load_checkpoint(str(three[1]), tmp_path, "cpu")


def test_every_checkpoint_damaged_is_an_error(tmp_path, three):
    for folder in three:
        (folder / "state.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        load_checkpoint("auto", tmp_path, "cpu")


def _keys(overrides, identities=None):
    return resume_keys(load_config(None, overrides), identities or {"data.shards": "a" * 64, "data.pool": "b" * 64})


@pytest.mark.parametrize("override, key", [
    ("train.batch=32", "train.batch"), ("data.k=5", "data.k"), ("model.arch=resnet50", "model.arch"),
    ("model.head=norm", "model.head"), ("model.dim=512", "model.dim"), ("train.lr=0.1", "train.lr"),
    ("train.seed=3", "train.seed"), ("memory.version=v1", "memory.version"), ("data.size=256", "data.size"),
])
def test_a_key_that_breaks_exact_resume_is_refused_by_name(override, key):
    cfg = load_config(None, [override])
    with pytest.raises(ValueError, match=rf"{key}=.*\(checkpoint: .*must not change when resuming"):
        check_compatible("ckpt", _keys([]), _keys([override]), cfg)


def test_keys_that_may_change_are_accepted():
    changed = ["train.steps=90000", "train.log_every=1", "train.eval_every=5", "train.checkpoint_every=7",
               "train.keep_checkpoints=5", "train.out=elsewhere", "data.num_threads=8", "data.read_threads=8",
               "data.prefetch=4", "data.on_bad_sample=skip", "train.device=cpu", "data.shards=moved/folder"]
    assert all(o.split("=")[0] in MAY_CHANGE for o in changed)
    check_compatible("ckpt", _keys([]), _keys(changed), load_config(None, changed))


def test_other_shards_or_world_size_are_refused():
    cfg = load_config(None, ["data.shards=other"])
    with pytest.raises(ValueError, match=r"data\.shards=other holds other data than the checkpoint's"):
        check_compatible("ckpt", _keys([]), _keys([], {"data.shards": "c" * 64, "data.pool": "b" * 64}), cfg)
    stored = {**_keys([]), "world_size": 2}
    with pytest.raises(ValueError, match=r"world_size=1 \(checkpoint: 2\)"):
        check_compatible("ckpt", stored, _keys([]), load_config())


def test_a_key_unknown_to_an_older_checkpoint_must_be_at_its_default():
    stored = _keys([])
    del stored["train.gamma"]  # as if the checkpoint predates the key
    check_compatible("ckpt", stored, _keys([]), load_config())
    with pytest.raises(ValueError, match=r"train\.gamma=0\.5"):
        check_compatible("ckpt", stored, _keys(["train.gamma=0.5"]), load_config(None, ["train.gamma=0.5"]))


# ----------------------------------------------------------------------------- the command end to end


def test_training_command_refuses_a_changed_batch_and_survives_a_damaged_checkpoint(tmp_path, capsys):
    from train_loop_helper import label_pool

    from insclr.train import main

    make_shards(tmp_path / "shards", n=16, per_shard=8, queries=0)
    label_pool(tmp_path / "shards", tmp_path / "pool.npz", k=4)
    out = tmp_path / "run"
    args = [str(CONFIG), f"data.shards={tmp_path / 'shards'}", f"data.pool={tmp_path / 'pool.npz'}", "data.size=32",
            "data.k=3", "data.num_threads=1", "data.read_threads=1", "model.arch=resnet18", "model.head=linear_norm",
            "model.dim=16", "model.init=random", "train.batch=4", "train.milestones=[]", "train.device=cpu",
            "train.amp=none", "train.checkpoint_every=2", f"train.out={out}", "train.progress=false",
            "train.keep_checkpoints=0"]
    assert main(args + ["train.steps=4"]) == 0
    assert [p.name for _, p in checkpoint.checkpoints(out)] == ["step-00000002", "step-00000004"]
    capsys.readouterr()
    # today's silent acceptance of another batch: refused, naming the key
    assert main(args + ["train.steps=6", "train.batch=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch=8 (checkpoint: 4)" in err[0]
    # a damaged latest checkpoint: a warning naming the file, then the run resumes from step 2
    state = out / "ckpt" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    assert main(args + ["train.steps=6"]) == 0
    err = capsys.readouterr()
    assert f"warning: {state}: " in err.err and "resumed from" in err.out and "(step 2)" in err.out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 7))  # each step once, 3..4 re-done after the fallback
    # the explicit folder, damaged: an error naming the file
    bad = out / "ckpt" / "step-00000006" / "banks.pt"
    bad.write_bytes(b"")
    assert main(args + ["train.steps=8", f"train.resume={bad.parent}"]) == 2
    assert f"error: {bad}: " in capsys.readouterr().err
    # shrinking the steps below the checkpoint is refused (step 4 was saved again by the resumed run)
    assert main(args + ["train.steps=3", f"train.resume={out / 'ckpt' / 'step-00000004'}"]) == 2
    assert "train.steps=3: " in capsys.readouterr().err
