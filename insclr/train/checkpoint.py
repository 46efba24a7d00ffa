"""Atomic, verified, resumable training checkpoints.

Layout: OUT/ckpt/step-00001000/ holding
  state.pt       model, optimizer, scheduler, grad scaler, step, counters (written by rank 0)
  banks.pt       the memory bank's state_dict (identical on every rank; written by rank 0)
  rank-R.pt      what differs per rank: RNG states (python, numpy, torch, cuda) and the loader/sampler state
  config.yaml    the resolved config
  manifest.json  size and sha256 of each file above, the step, the world size and what the run must
                 keep to resume exactly (insclr.train.resume), written last
Every rank writes into OUT/ckpt/.tmp-step-00001000/; when all are done rank 0 writes the manifest
and renames the folder to its final name. A rename is atomic, so a folder named step-* is always
complete, and a crash while saving leaves the previous checkpoint untouched (the stale .tmp folder
is removed next time). Every file holds tensors and plain Python values only and is read with
torch.load(weights_only=True): a checkpoint cannot run code. Loading verifies the manifest first.
"""

import hashlib
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from insclr import dist
from insclr.config import save_config
from insclr.io import atomic_path, read_json, write_json
from insclr.safe_load import UnsafePickle, torch_load

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
FORMAT = "insclr-checkpoint/1"


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files do not match its manifest (or cannot be read)."""


def step_dir(out, step):
    return Path(out) / "ckpt" / f"step-{step:08d}"


# ----------------------------------------------------------------------------- RNG states as tensors


def rng_state():
    """The RNG states this process draws from, as tensors and plain values (python, numpy, torch
    CPU, and CUDA when present)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py, npy = state["python"], state["numpy"]
    if isinstance(py, tuple):  # a checkpoint of an older version: the states as the libraries return them
        random.setstate(py)
        np.random.set_state(npy)
    else:
        random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files and their manifest


class _Hashing:
    """A binary file wrapper that hashes and counts what is written through it."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _save(obj, path):
    """torch.save `obj` atomically; returns {"bytes", "sha256"} of the file, computed while writing."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            out = _Hashing(f)
            torch.save(obj, out)
    return {"bytes": out.bytes, "sha256": out.sha256.hexdigest()}


def file_entry(path, chunk=1 << 24):
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


def verify(path):
    """Check checkpoint folder `path` against its manifest; returns the manifest.

    Raises DamagedCheckpoint naming the first file that is missing, of the wrong size or content.
    A checkpoint written before manifests existed has none: returns None (its files are still
    read with weights_only=True, and a damaged one is reported by `load`).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = read_json(path / MANIFEST, what="checkpoint manifest")
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{path / MANIFEST}: unreadable checkpoint manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DamagedCheckpoint(f"{path / MANIFEST}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{file}: missing from the checkpoint")
        if file.stat().st_size != want["bytes"]:
            raise DamagedCheckpoint(f"{file}: {file.stat().st_size} bytes, the checkpoint manifest says "
                                    f"{want['bytes']} (truncated or overwritten)")
        if file_entry(file)["sha256"] != want["sha256"]:
            raise DamagedCheckpoint(f"{file}: content does not match its sha256 in {path / MANIFEST} (damaged)")
    return manifest


# ----------------------------------------------------------------------------- the folders


def checkpoints(out):
    """Complete checkpoints in OUT/ckpt, oldest first, as (step, path)."""
    root = Path(out) / "ckpt"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(c for c in found if (c[1] / "state.pt").is_file() or (c[1] / MANIFEST).is_file())


def latest(out):
    """Path of the latest complete checkpoint in OUT/ckpt, or None."""
    found = checkpoints(out)
    return found[-1][1] if found else None


def save(out, step, shared, banks, per_rank, cfg, keep=2, resume_keys=None):
    """Collective: every rank calls it with its `per_rank` dict; rank 0 also writes `shared` and `banks`.

    `resume_keys` (plain values) go into the manifest for the resume check. Returns the final
    folder. Keeps the newest `keep` complete checkpoints (0 = keep all).
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
            files = {"state.pt": _save(shared, tmp / "state.pt"), "banks.pt": _save(banks, tmp / "banks.pt")}
            save_config(cfg, tmp / "config.yaml")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half checkpoint behind
        raise
    dist.barrier()
    if dist.is_main():
        _write_manifest(tmp, step, files, resume_keys)
        if final.exists():  # a checkpoint of the same step from a run that was then resumed earlier
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for _, old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_manifest(tmp, step, files, resume_keys):
    """The manifest, last: the other ranks' files are small (RNG and loader states), hashed here."""
    try:
        for name in ["config.yaml"] + [f"rank-{r}.pt" for r in range(dist.world_size())]:
            files[name] = file_entry(tmp / name)
        write_json(tmp / MANIFEST, {"format": FORMAT, "step": int(step), "world_size": dist.world_size(),
                                    "files": files, "resume": resume_keys or {}})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path, map_location="cpu"):
    """(manifest or None, shared, banks, per_rank) of checkpoint folder `path` for this rank, after `verify`.

    Raises DamagedCheckpoint for a damaged folder, ValueError for one written by another world size.
    """
    path = Path(path)
    manifest = verify(path)
    written = manifest["world_size"] if manifest else len(list(path.glob("rank-*.pt")))
    if written != dist.world_size():
        raise ValueError(f"{path}: written by {written} ranks; resuming exactly needs the same number "
                         f"(launched with {dist.world_size()}); start a new output folder or relaunch")
    try:
        shared = torch_load(path / "state.pt", map_location, what="checkpoint file")
        banks = torch_load(path / "banks.pt", map_location, what="checkpoint file")
        # older checkpoints (no manifest) kept numpy's RNG state as an array: rebuilt, no code run
        per_rank = torch_load(path / f"rank-{dist.rank()}.pt", "cpu", what="checkpoint file",
                              numpy_arrays=manifest is None)
    except UnsafePickle:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise DamagedCheckpoint(str(e)) from None
    return manifest, shared, banks, per_rank
