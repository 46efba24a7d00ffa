"""Our side of the parity run: the training command, the shared initial weights, the conversion of
the original's final weights into a model file of ours, and the evaluation command of both."""

import dataclasses
import sys
from pathlib import Path

import torch

from insclr.bench.parity.launch_original import from_original, to_original


def train_command(config, out, seed, steps, shards, pool, threads, overrides=()):
    """`python -m insclr.train CONFIG ...` for one seed: random init (insclr.model.RANDOM_SEED, the
    same weights for every seed and for the original), the CPU, no evaluation during training."""
    return [sys.executable, "-m", "insclr.train", str(config), f"data.shards={shards}", f"data.pool={pool}",
            f"train.out={out}", f"train.seed={seed}", f"train.steps={steps}", "train.device=cpu",
            "model.init=random", f"train.threads={threads}", "train.progress=false", "eval.data=[]", *overrides]


def initial_weights(cfg_model, path):
    """The random initial model of our run, written in the original's names for its MODEL.PRETRAIN."""
    from insclr.model import build_model

    model = build_model(dataclasses.replace(cfg_model, init="random"))
    torch.save({"model": to_original(model.state_dict())}, path)
    return path


def import_original_model(pth, cfg_model, out):
    """The original's model_final.pth -> OUT, a model file of ours (insclr.model.save_model)."""
    from insclr.model import _load_checked, build_model, save_model

    state = torch.load(pth, map_location="cpu", weights_only=True)["model"]
    model = build_model(dataclasses.replace(cfg_model, init="random"))
    _load_checked(model, from_original(state), str(pth))
    save_model(model, dataclasses.replace(cfg_model, init="random"), out)
    return out


def eval_command(model, shards_root, out_json, size, sets=("roxford5k", "rparis6k")):
    return [sys.executable, "-m", "insclr.evaluate", "--model", str(model), "--data", ",".join(sets),
            "--shards-root", str(shards_root), "--size", str(size), "--json", str(out_json), "--device", "cpu"]


def read_map(path):
    """{set: mAP Medium %} of an evaluation JSON (insclr.evaluate --json)."""
    import json

    results = json.loads(Path(path).read_text())["results"]
    return {name: 100.0 * r["mapM"] for name, r in results.items() if "mapM" in r}
