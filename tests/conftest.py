import os

import pytest

os.environ.setdefault("INSCLR_NO_PROGRESS", "1")


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Shared data for every stage's tests (added by the shard engineer): made once per session.
SHARDED_SETS = {"gldv2": "gldv2", "gldv2-index": "gldv2", "gldv2-test": "gldv2", "roxford5k": "roxford5k",
                "rparis6k": "rparis6k", "instre": "instre", "revisitop1m": "revisitop1m"}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """The tiny synthetic datasets (seed 0) in their original layouts: synth_dir / "gldv2", ..."""
    from insclr.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, scale="tiny")
    return root


@pytest.fixture(scope="session")
def shards_dir(synth_dir, tmp_path_factory):
    """Every tiny synthetic set sharded (32 samples per shard, so most sets have several shards):
    shards_dir / "gldv2", "gldv2-index", "gldv2-test", "roxford5k", "rparis6k", "instre", "revisitop1m"."""
    from insclr.shard import shard_dataset

    root = tmp_path_factory.mktemp("shards")
    for name, folder in SHARDED_SETS.items():
        shard_dataset(name, synth_dir / folder, root / name, per_shard=32)
    return root
