"""Files crafted to run code are refused with one `error:` line, and nothing of them runs.

Each crafted file carries an object whose __reduce__ would create a marker file when unpickled.
"""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import make_shards
from insclr.config import load_config
from insclr.safe_load import UnsafePickle, load_pickle, torch_load
from insclr.train import checkpoint

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class Payload:
    """Unpickling this runs exec(...), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_the_payload_does_run_with_plain_pickle(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # what torch.load(weights_only=False) did
    assert marker.exists()


def test_crafted_ground_truth_pickle_is_refused_by_the_shard_command(tmp_path, capsys):
    from insclr.shard import main

    marker = tmp_path / "ran"
    src = tmp_path / "roxford5k"
    (src / "jpg").mkdir(parents=True)
    with open(src / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["a"], "gnd": [Payload(marker)]}, f)
    assert main(["roxford5k", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src / 'gnd_roxford5k.pkl'}: refers to the Python "
                                               f"global builtins.exec")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_ground_truth_with_numpy_arrays_loads(tmp_path, protocol):
    """The real revisitop files hold numpy arrays (bbx float, easy/hard/junk int)."""
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"],
           "gnd": [{"bbx": np.array([1.5, 2.0, 30.0, 40.0]), "easy": np.array([0], dtype=np.int64),
                    "hard": np.array([], dtype=np.int64), "junk": np.array([1], dtype=np.int32),
                    "n": np.float64(2.0)}]}
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    back = load_pickle(path)
    assert back["imlist"] == ["a", "b"]
    np.testing.assert_array_equal(back["gnd"][0]["bbx"], gnd["gnd"][0]["bbx"])
    assert back["gnd"][0]["junk"].dtype == np.int32 and back["gnd"][0]["n"] == 2.0


def test_crafted_model_file_is_refused(tmp_path):
    from insclr.model import load_model

    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(1)}, "model_config": Payload(marker)}, tmp_path / "m.pt")
    with pytest.raises(UnsafePickle, match=r"m\.pt: refers to the Python global (builtins\.)?exec,"):
        load_model(str(tmp_path / "m.pt"))
    assert not marker.exists()


@pytest.fixture()
def train_inputs(tmp_path):
    from train_loop_helper import label_pool

    make_shards(tmp_path / "shards", n=16, per_shard=8, queries=0)
    label_pool(tmp_path / "shards", tmp_path / "pool.npz", k=4)
    return [f"data.shards={tmp_path / 'shards'}", f"data.pool={tmp_path / 'pool.npz'}", "data.size=32",
            "data.k=3", "data.num_threads=1", "data.read_threads=1", "model.arch=resnet18",
            "model.head=linear_norm", "model.dim=16", "model.init=random", "train.batch=4", "train.milestones=[]",
            "train.device=cpu", "train.amp=none", "train.steps=4", "train.checkpoint_every=2",
            f"train.out={tmp_path / 'run'}", "train.progress=false"]


@pytest.mark.parametrize("file, with_manifest", [("banks.pt", False), ("state.pt", True), ("rank-0.pt", True)])
def test_crafted_checkpoint_is_refused_by_resume(tmp_path, train_inputs, capsys, file, with_manifest):
    """A folder given to train.resume whose file would run code. With a manifest rewritten to match
    (the attacker controls the folder) the file still never reaches a full unpickler."""
    from insclr.train import main

    marker = tmp_path / "ran"
    ckpt = tmp_path / "crafted"
    cfg = load_config(None, train_inputs)
    checkpoint.save(ckpt, 2, {"step": 2}, {}, {"rng": checkpoint.rng_state()}, cfg)
    folder = checkpoint.latest(ckpt)
    torch.save({"x": Payload(marker)}, folder / file)
    if with_manifest:
        import json

        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][file] = checkpoint.file_entry(folder / file)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        (folder / "manifest.json").unlink()
    capsys.readouterr()
    assert main([str(CONFIG), *train_inputs, f"train.resume={folder}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {folder / file}: refers to the Python global ")
    assert "exec" in err[0]
    assert not marker.exists()


def test_checkpoint_of_an_older_version_still_loads(tmp_path):
    """Before this format, rank files held numpy's RNG state as an array: rebuilt without running code."""
    cfg = load_config(None, [f"train.out={tmp_path}"])
    folder = checkpoint.save(tmp_path, 5, {"step": 5}, {}, {"rng": checkpoint.rng_state()}, cfg)
    (folder / "manifest.json").unlink()
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": old, "loader": {"step": 5}}, folder / "rank-0.pt")
    manifest, shared, banks, per_rank = checkpoint.load(folder)
    assert manifest is None and shared == {"step": 5}
    expected = np.random.rand()
    checkpoint.set_rng_state(per_rank["rng"])
    assert np.random.rand() == expected


def test_torch_load_names_an_unreadable_file(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"x\.pt: not a readable checkpoint file \(torch\.load with weights_only"):
        torch_load(tmp_path / "x.pt", what="checkpoint file")
