"""Really damaged shards: one `error:` line naming the shard, key and offset, never a crash.

Before these checks `insclr.features` died with SIGSEGV (rc 139) on a swapped index or a damaged
JPEG header: DALI 2.4's CPU decoder parses the headers of a batch of more than 4 × (threads + 1)
images in parallel, and a header that fails to parse in one of its pool threads kills the
process (insclr/data/jpeg.py). The features commands run in a subprocess so that a crash shows
as its exit status.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shard_damage as damage
from data_shards import make_jpeg, make_shards
from insclr.data import NeighborBatchSampler, StreamLoader, TrainLoader
from insclr.data.jpeg import jpeg_problem
from insclr.data.reader import BadSample, ShardReader

HERE = Path(__file__).resolve().parent


def features(shards, out, *extra):
    """`python -m insclr.features` on `shards` in a fresh process (batch 32, 2 DALI threads: the
    parallel header parse). Returns (exit status, stderr lines)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "INSCLR_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "insclr.features", "--shards", str(shards), "--model", "random",
           "--arch", "resnet18", "--out", str(out), "--size", "32", "--batch", "32", "--threads", "2",
           "--device", "cpu", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def one_error(lines):
    assert len(lines) == 1 and lines[0].startswith("error: "), "\n".join(lines[-20:])
    return lines[0]


# ----------------------------------------------------------------------------- the header check


def test_jpeg_problem_accepts_good_and_names_damage():
    rng = np.random.default_rng(0)
    good = make_jpeg(rng, 64, 48)
    assert jpeg_problem(good, 64, 48) is None
    assert "not a JPEG" in jpeg_problem(b'{"index": 3}' + good, 64, 48)
    assert "64x48 pixels, the manifest 65x48" in jpeg_problem(good, 65, 48)
    assert "no end-of-image marker" in jpeg_problem(good[:len(good) // 2], 64, 48)
    flipped = good[:2] + bytes(b ^ 0xFF for b in good[2:26]) + good[26:]
    assert "JPEG header damaged" in jpeg_problem(flipped, 64, 48)
    assert "runs past the end" in jpeg_problem(good[:40], 64, 48)
    assert "cut short" in jpeg_problem(good[:3], 64, 48) or "not a JPEG" in jpeg_problem(good[:3], 64, 48)


# ----------------------------------------------------------------------------- feature extraction


@pytest.fixture(scope="module")
def gldv2(shards_dir):
    """The synthetic GLDv2 shards (4 shards of 32 real-sized images): what features would crash on."""
    return shards_dir / "gldv2"


def test_features_of_swapped_indexes_is_one_error_not_a_crash(gldv2, tmp_path):
    root = damage.copy(gldv2, tmp_path / "shards")
    damage.swap_indexes(root, "part-000000", "part-000001")
    rc, lines = features(root, tmp_path / "f.npy")
    assert rc == 2, lines  # was -11 (SIGSEGV)
    line = one_error(lines)
    assert f"{root / 'part-000000.idx'}: not the index the manifest recorded" in line
    assert not (tmp_path / "f.npy").exists()


def test_features_of_a_damaged_jpeg_header_names_shard_key_and_offset(gldv2, tmp_path):
    root = damage.copy(gldv2, tmp_path / "shards")
    damage.flip_jpeg_header(root, "part-000001", 3)  # sample 35: parsed by a DALI pool thread
    tar, offset, size = damage.member(root, "part-000001", 3)
    rc, lines = features(root, tmp_path / "f.npy")
    assert rc == 2, lines  # was -11 (SIGSEGV)
    line = one_error(lines)
    assert f"{tar}: sample 000000035 (offset {offset}, {size} bytes): JPEG header damaged" in line
    assert "--verify" in line


def test_truncated_tar_and_missing_index_are_refused_on_opening(gldv2, tmp_path, capsys):
    from insclr.features import main

    root = damage.copy(gldv2, tmp_path / "a")
    damage.truncate(root, "part-000002")
    assert main(["--shards", str(root), "--model", "random", "--out", str(tmp_path / "f.npy")]) == 2
    err = capsys.readouterr().err
    assert f"error: {root / 'part-000002.tar'}: " in err and "(truncated)" in err
    root = damage.copy(gldv2, tmp_path / "b")
    damage.remove_index(root, "part-000003")
    assert main(["--shards", str(root), "--model", "random", "--out", str(tmp_path / "f.npy")]) == 2
    assert f"error: {root / 'part-000003.idx'}: missing from the shard folder" in capsys.readouterr().err


def test_old_manifest_without_tar_sizes_still_catches_a_truncated_tar(tmp_path):
    root = tmp_path / "s"
    make_shards(root, n=12, per_shard=4, queries=0)  # a manifest of the old layout: no tar_bytes
    damage.truncate(root, "part-000001", keep=0.6)
    with pytest.raises(ValueError, match=r"part-000001\.tar: sample 00000000\d .* tar \(truncated\?\)"):
        ShardReader(root)


# ----------------------------------------------------------------------------- evaluation streaming


def test_evaluation_of_a_damaged_database_image_is_one_error(shards_dir, tmp_path, capsys):
    from insclr.evaluate.cli import main

    root = damage.copy(shards_dir / "roxford5k", tmp_path / "roxford5k")
    damage.flip_jpeg_header(root, "part-000000", 5)
    tar, offset, _ = damage.member(root, "part-000000", 5)
    rc = main(["--model", "random", "--arch", "resnet18", "--data", "roxford5k", "--shards-root", str(tmp_path),
               "--size", "64", "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith(f"error: {tar}: sample 000000005 (offset {offset}")


def test_query_crop_of_a_damaged_image_is_named(shards_dir, tmp_path):
    root = damage.copy(shards_dir / "roxford5k", tmp_path / "roxford5k")
    damage.flip_jpeg_header(root, "query-000000", 1)
    with pytest.raises(BadSample, match=r"query-000000\.tar: sample 000000001 .*JPEG header damaged"):
        list(StreamLoader(root, split="query", mode="query", size=64))


def test_stream_decode_failure_after_a_good_header_is_named(tmp_path):
    root = tmp_path / "s"
    make_shards(root, n=40, per_shard=20, queries=0)
    damage.damage_quantisation_table(root, "part-000001", 4)  # header well-formed, decoder fails
    with pytest.raises(BadSample, match=r"part-000001\.tar: sample 000000024 .*image data is damaged"):
        list(StreamLoader(root, mode="square", size=16, batch_size=32, num_threads=2))


# ----------------------------------------------------------------------------- training


@pytest.fixture()
def train_shards(tmp_path):
    root = tmp_path / "shards"
    make_shards(root, n=24, per_shard=8, queries=0)
    return root


def _pool(n=24, k=3):
    return np.stack([(np.arange(n) + j) % n for j in range(1, k + 1)], axis=1)


def _batches(root, steps, **kw):
    sampler = NeighborBatchSampler(_pool(), batch=4, k=3, seed=2)
    loader = TrainLoader(root, sampler, size=16, crop_scale=(0.75, 1.0), seed=3, num_threads=2, **kw)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == steps:
            break
    loader.close()
    return out


@pytest.mark.parametrize("decoder", ["dali", "pillow"])
def test_training_stops_on_a_damaged_image_naming_it(train_shards, decoder):
    damage.flip_jpeg_header(train_shards, "part-000001", 2)  # sample 10
    with pytest.raises(BadSample, match=r"part-000001\.tar: sample 000000010 .*data\.on_bad_sample=skip"):
        _batches(train_shards, 6, decoder=decoder)


@pytest.mark.parametrize("how,decoder", [("header", "dali"), ("decode", "dali"), ("decode", "pillow")])
def test_skip_replaces_damaged_images_deterministically(train_shards, how, decoder, capsys):
    good = _batches(train_shards, 6, decoder=decoder)
    if how == "header":
        damage.flip_jpeg_header(train_shards, "part-000001", 2)  # caught before DALI
    else:
        damage.damage_quantisation_table(train_shards, "part-000001", 2)  # DALI fails; the step is fed again
    runs = [_batches(train_shards, 6, on_bad_sample="skip", decoder=decoder) for _ in range(2)]
    for a, b in zip(*runs):  # the same replacement every time
        assert torch.equal(a.indices, b.indices) and torch.equal(a.aug, b.aug)
    assert any(10 in b.indices.tolist() for b in good), "sample 10 must be drawn for the test to mean anything"
    for batch, before in zip(runs[0], good):
        assert 10 not in batch.indices.tolist()
        assert batch.replaced == before.indices.tolist().count(10)
        for r in np.flatnonzero(before.indices.numpy() == 10):  # replaced by a row of the same label
            assert batch.labels[r] == before.labels[r] and batch.indices[r] != 10
    assert "replaced by sample" in capsys.readouterr().err


def test_skip_stops_past_the_limit(train_shards):
    for j in range(8):
        damage.flip_jpeg_header(train_shards, "part-000000", j)
    with pytest.raises(BadSample, match="more than data.max_bad_samples=2"):
        _batches(train_shards, 6, on_bad_sample="skip", max_bad_samples=2)


def test_training_command_skips_and_counts_in_the_metrics(train_shards, tmp_path):
    from train_loop_helper import label_pool

    damage.flip_jpeg_header(train_shards, "part-000001", 2)
    label_pool(train_shards, tmp_path / "pool.npz", k=4)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    args = [f"data.shards={train_shards}", f"data.pool={tmp_path / 'pool.npz'}", "data.size=32", "data.k=3",
            "data.num_threads=1", "data.read_threads=1", "model.arch=resnet18", "model.head=linear_norm",
            "model.dim=16", "model.init=random", "train.batch=4", "train.milestones=[]", "train.device=cpu",
            "train.amp=none", "train.steps=6", "train.checkpoint_every=6", f"train.out={out}", "train.progress=false"]
    cmd = [sys.executable, "-m", "insclr.train", str(HERE.parent / "configs" / "demo.yaml"), *args]
    proc = subprocess.run(cmd + ["data.on_bad_sample=error"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert one_error([line for line in proc.stderr.splitlines() if line.startswith(("error", "Traceback"))])
    proc = subprocess.run(cmd + ["data.on_bad_sample=skip", "train.resume=none"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r["bad_samples"] for r in records if r["step"] > 0]
    assert len(counts) == 6 and sum(counts) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["header", "swap"])
def test_features_on_the_gpu_of_damaged_shards_is_one_error(gldv2, tmp_path, how):
    """The same on the GPU decoder (nvJPEG, "mixed"): the checks run before any decoder."""
    root = damage.copy(gldv2, tmp_path / "shards")
    if how == "header":
        damage.flip_jpeg_header(root, "part-000001", 3)
    else:
        damage.swap_indexes(root, "part-000000", "part-000001")
    rc, lines = features(root, tmp_path / "f.npy", "--device", "cuda")
    assert rc == 2, lines
    assert "JPEG header damaged" in one_error(lines) or "not the index the manifest recorded" in lines[0]
