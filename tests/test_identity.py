"""Inputs that do not belong together are refused: features, pools and checkpoints record the
identity of the shard folder they were made from; NaN similarities, self-neighbours and NaN
weights are refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import make_shards
from insclr.io import save_npz
from insclr.shard.manifest import Manifest

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two shard folders of the same size (12 images) but different images; features and pool of `a`."""
    from insclr import features, pool

    root = tmp_path_factory.mktemp("identity")
    make_shards(root / "a", n=12, per_shard=6, queries=0, seed=0)
    make_shards(root / "b", n=12, per_shard=6, queries=0, seed=1)
    assert features.main(["--shards", str(root / "a"), "--model", "random", "--arch", "resnet18", "--size", "32",
                          "--out", str(root / "a.npy"), "--device", "cpu"]) == 0
    assert pool.main(["--features", str(root / "a.npy"), "--out", str(root / "pool_a.npz"), "--k", "4",
                      "--shards", str(root / "a")]) == 0
    return root


def test_identity_is_stored_by_sharding_and_computed_for_old_manifests(shards_dir, two):
    new = Manifest.load(shards_dir / "roxford5k")
    assert new.data["identity"] == new.identity and len(new.identity) == 64
    old = Manifest.load(two / "a")  # written without the field (the layout before it)
    assert "identity" not in old.data and old.identity != Manifest.load(two / "b").identity


def test_edited_manifest_is_refused(two, tmp_path):
    import shutil

    root = tmp_path / "a"
    shutil.copytree(two / "a", root)
    data = json.loads((root / "manifest.json").read_text())
    data["identity"] = Manifest.load(root).identity
    data["splits"]["part"]["shards"][0]["count"] = 5
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'identity' does not match its shard records"):
        Manifest.load(root).identity


def test_features_record_their_shards_and_pool_refuses_another_folder(two, capsys):
    from insclr.pool import main

    info = json.loads((two / "a.json").read_text())
    assert info["shards_identity"] == Manifest.load(two / "a").identity and info["split"] == "part"
    assert main(["--features", str(two / "a.npy"), "--out", str(two / "pool_b.npz"), "--k", "4",
                 "--shards", str(two / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {two / 'a.npy'}: features made from {two / 'a'} (split 'part'), not from "
                          f"{two / 'b'}")
    assert not (two / "pool_b.npz").exists()
    with np.load(two / "pool_a.npz") as z:
        assert str(z["shards_identity"]) == Manifest.load(two / "a").identity


def _train_args(two, pool, shards="a"):
    return [str(CONFIG), f"data.shards={two / shards}", f"data.pool={pool}", "data.size=32", "data.k=3",
            "model.arch=resnet18", "model.head=linear_norm", "model.dim=16", "model.init=random", "train.batch=4",
            "train.milestones=[]", "train.device=cpu", "train.steps=1", f"train.out={two / 'run'}"]


def test_training_refuses_a_pool_of_another_folder_with_the_same_n(two, capsys):
    from insclr.train import main

    assert main(_train_args(two, two / "pool_a.npz", shards="b")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {two / 'pool_a.npz'}: candidate pool made from {two / 'a'}")
    assert str(two / "b") in err


@pytest.mark.parametrize("bad, expected", [("nan", "row 2 has NaN or infinite similarities"),
                                           ("self", "row 3 lists itself as a neighbour")])
def test_pool_with_nan_or_self_neighbours_is_refused(two, tmp_path, capsys, bad, expected):
    from insclr.train import main

    neighbors = np.stack([(np.arange(12) + j) % 12 for j in range(1, 5)], axis=1).astype(np.int32)
    similarities = np.full((12, 4), 0.5, dtype=np.float16)
    if bad == "nan":
        similarities[2, 1] = np.nan
    else:
        neighbors[3, 2] = 3
    save_npz(tmp_path / "pool.npz", neighbors=neighbors, similarities=similarities)
    assert main(_train_args(two, tmp_path / "pool.npz")) == 2
    assert f"error: {tmp_path / 'pool.npz'}: {expected}" in capsys.readouterr().err


def test_nan_model_weights_are_refused(tmp_path):
    from insclr.config import ModelConfig
    from insclr.model import build_model, load_model, save_model

    cfg = ModelConfig(arch="resnet18", head="linear_norm", dim=8, init="random")
    model = build_model(cfg)
    with torch.no_grad():
        model.head.linear.weight[0, 0] = float("nan")
    save_model(model, cfg, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt: weights 'head\.linear\.weight' hold NaN"):
        load_model(str(tmp_path / "model.pt"))


def test_a_manifest_copied_from_another_folder_is_refused(two, tmp_path):
    """Same N, same layout, other images: the indexes do not match the copied manifest's records."""
    import shutil

    from insclr.data import ShardReader

    root = tmp_path / "b"
    shutil.copytree(two / "b", root)
    shutil.copy(two / "a" / "manifest.json", root / "manifest.json")
    with pytest.raises(ValueError, match=r"b/part-000000\.idx: not the index the manifest recorded"):
        ShardReader(root)
