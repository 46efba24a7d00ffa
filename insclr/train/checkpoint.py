"""Atomic, resumable training checkpoints.

Layout: OUT/ckpt/step-00001000/ holding
  state.pt     model, optimizer, scheduler, grad scaler, step, counters (written by rank 0)
  banks.pt     the memory bank's state_dict (identical on every rank; written by rank 0)
  rank-R.pt    what differs per rank: RNG states (python, numpy, torch, cuda) and the loader/sampler state
  config.yaml  the resolved config
Every rank writes into OUT/ckpt/.tmp-step-00001000/; when all are done rank 0 renames the folder
to its final name. A rename is atomic, so a folder named step-* is always complete, and a crash
while saving leaves the previous checkpoint untouched (the stale .tmp folder is removed next time).
"""

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from insclr import dist
from insclr.config import save_config
from insclr.io import save_torch

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(out, step):
    return Path(out) / "ckpt" / f"step-{step:08d}"


def rng_state():
    """The RNG states this process draws from (python, numpy, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj, path):
    save_torch(obj, path)


def checkpoints(out):
    """Complete checkpoints in OUT/ckpt, oldest first, as (step, path)."""
    root = Path(out) / "ckpt"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(c for c in found if (c[1] / "state.pt").is_file())


def latest(out):
    """Path of the latest complete checkpoint in OUT/ckpt, or None."""
    found = checkpoints(out)
    return found[-1][1] if found else None


def resolve_resume(resume, out):
    """train.resume -> the checkpoint folder to load, or None. 'auto': the latest complete one."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return latest(out)
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: not a checkpoint folder (no state.pt in {path})")
    return path


def save(out, step, shared, banks, per_rank, cfg, keep=2):
    """Collective: every rank calls it with its `per_rank` dict; rank 0 also writes `shared` and `banks`.

    Returns the final folder. Keeps the newest `keep` complete checkpoints (0 = keep all).
    """
    final = step_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    if dist.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        _save(per_rank, tmp / f"rank-{dist.rank()}.pt")
        if dist.is_main():
            _save(shared, tmp / "state.pt")
            _save(banks, tmp / "banks.pt")
            save_config(cfg, tmp / "config.yaml")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half checkpoint behind
        raise
    dist.barrier()
    if dist.is_main():
        if final.exists():  # a checkpoint of the same step from a run that was then resumed earlier
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for _, old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path, map_location="cpu"):
    """(shared, banks, per_rank) of checkpoint folder `path` for this rank."""
    path = Path(path)
    written = len(list(path.glob("rank-*.pt")))
    if written != dist.world_size():
        raise ValueError(f"{path}: written by {written} ranks; resuming exactly needs the same number "
                         f"(launched with {dist.world_size()}); start a new output folder or relaunch")
    rank_file = path / f"rank-{dist.rank()}.pt"
    shared = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
    banks = torch.load(path / "banks.pt", map_location=map_location, weights_only=False)
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
    return shared, banks, per_rank
