"""Runs a few training steps on in-memory images; launched by tests/test_train_ddp.py.

`torchrun --nproc_per_node 2 tests/train_ddp_helper.py OUT [REFERENCE]` (gloo) or `run(OUT)` in-process
(world size 1). Each rank saves OUT/rank-R.pt with, per scenario, the step records, the bank
state and the final parameters, so the test can compare the 2-process run with one process.
Images are random uint8 tensors indexed like a dataset, so the step's DDP semantics are checked
without the decoder; BatchNorm is frozen (train.freeze_bn), the documented setting for exactness.
"""

import sys
from pathlib import Path

import numpy as np
import torch

N, B, K, SIZE = 24, 4, 3, 32

SCENARIOS = {
    "v2_selection": ["memory.version=v2", "memory.mode=b+i_tr2_avg0.30_k02", "memory.positive_thresh=0.9",
                     "memory.negative_thresh=0.2", "memory.get_size=12", "selection.mode=fixed",
                     "selection.thresh=0.5", "noaug.enabled=true", f"noaug.size={SIZE}", "noaug.scales=[1.0,0.5]"],
    "v1": ["memory.version=v1", "memory.start_step=0", "memory.get_step=1", "memory.get_size=8",
           "memory.potential_positive=2"],
    "nan": ["memory.version=v1", "memory.get_step=0", "memory.get_size=8", "memory.potential_positive=2"],
}
NAN_AT = {"nan": (2, 1)}  # scenario -> (step, rank) whose batch loss the test makes NaN


def nan_batch_loss(step, rank):
    """A contrastive_loss that returns NaN for the batch loss of `step` on `rank` only: a divergence
    that one rank sees. Injected into insclr.train.step for the scenario (the product has no hook)."""
    from insclr import dist
    from insclr.loss import contrastive_loss

    calls = {"batch": 0}

    def loss(*args, memory=False, **kw):
        value, stats = contrastive_loss(*args, memory=memory, **kw)
        if not memory:
            calls["batch"] += 1
            if calls["batch"] == step and dist.rank() == rank:
                value = value * float("nan")
        return value, stats
    return loss


def pool(n=N, k=8, seed=0):
    """A random candidate pool: neighbours exclude the row itself, similarities descending."""
    rng = np.random.default_rng(seed)
    neighbors = np.stack([rng.permutation(np.delete(np.arange(n), i))[:k] for i in range(n)])
    similarities = -np.sort(-rng.uniform(0.0, 1.0, size=(n, k)), axis=1)
    return neighbors.astype(np.int64), similarities.astype(np.float32)


def images(n=N, size=SIZE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def config(overrides):
    from insclr.config import load_config

    base = ["model.arch=resnet18", "model.head=linear_norm", "model.dim=32", "model.init=random",
            f"train.batch={B}", f"data.k={K}", "train.lr=1e-3", "train.amp=none", "train.freeze_bn=true",
            "train.device=cpu", "memory.init_batch=6"]
    return load_config(None, base + overrides)


def _snapshot(state):
    """The state a step starts from: parameters and buffers, and the bank (copies)."""
    bank = {k: v.clone() for k, v in state.bank.state_dict().items()}
    return {"params": {k: v.detach().clone() for k, v in state.module.state_dict().items()}, "bank": bank}


def _restore(state, saved):
    state.module.load_state_dict(saved["params"])
    state.bank.load_state_dict({k: v.clone() for k, v in saved["bank"].items()})


def _error(ours, theirs):
    """How far two equal-keyed tensor dicts are apart: max |a - b| over the floating-point
    tensors, their scale max |b|, and whether the other tensors (indices, labels) are equal."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    floats = [k for k in theirs if theirs[k].is_floating_point()]
    return {"error": max([(ours[k].double() - theirs[k].double()).abs().max().item() for k in floats], default=0.0),
            "scale": max([theirs[k].double().abs().max().item() for k in floats], default=0.0),
            "exact": all(torch.equal(ours[k], theirs[k]) for k in theirs if k not in floats)}


def run_scenario(cfg, steps=3, reference=None, nan_at=None):
    """`steps` training steps; returns the records, the final state and, per step, the start state
    and the gradients (world size one: the reference run).

    With `reference` (the one-process run's result) every step starts from the reference's state
    at that step, so each step's difference from the reference is that step's own rounding, not
    the accumulation of earlier steps' (see docs/training.md, "Two ranks and one process"); the
    per-step errors of the gradients and of the bank after the update are recorded instead of
    the tensors themselves. `nan_at` (step, rank): that rank's batch loss is NaN at that step.
    """
    from insclr import dist
    from insclr.candidates import CandidatePool
    from insclr.data import NeighborBatchSampler, SequentialBatches, TrainBatch
    from insclr.train import step as step_module
    from insclr.train.banks import fill_bank
    from insclr.train.loop import make_state
    from insclr.train.metrics import read_records

    neighbors, similarities = pool()
    pixels = images()
    state, settings = make_state(cfg, torch.device("cpu"), CandidatePool.from_arrays(neighbors, similarities))
    if state.bank.needs_fill:
        seq = SequentialBatches(N, cfg.memory.init_batch, rank=dist.rank(), world_size=dist.world_size())
        fill_bank(state, settings, [TrainBatch(torch.from_numpy(i), torch.from_numpy(l), pixels[i], pixels[i], 0.0)
                                    for i, l in seq])
    sampler = NeighborBatchSampler(neighbors, B, K, seed=0, rank=dist.rank(), world_size=dist.world_size())
    records, starts, grads, errors = [], [], [], []
    loss = step_module.contrastive_loss
    if nan_at is not None:
        step_module.contrastive_loss = nan_batch_loss(*nan_at)
    try:
        for step in range(1, steps + 1):
            idx, lab = sampler.next()
            idx, lab = torch.from_numpy(idx), torch.from_numpy(lab)
            noaug = pixels[idx] if cfg.noaug.enabled else None
            if reference is not None:
                errors.append({"start": _error(_snapshot(state)["bank"], reference["starts"][step - 1]["bank"])})
                _restore(state, reference["starts"][step - 1])
            else:
                starts.append(_snapshot(state))
            record = step_module.train_step(state, settings, TrainBatch(idx, lab, pixels[idx], noaug, 0.0))
            records.append(read_records([record])[0])  # numbers, as metrics.jsonl holds them
            grad = {n: p.grad.clone() for n, p in state.module.named_parameters() if p.grad is not None}
            if reference is not None:
                after = reference["starts"][step]["bank"] if step < steps else reference["bank"]
                errors[-1].update(grad=_error(grad, reference["grads"][step - 1]),
                                  bank=_error(_snapshot(state)["bank"], after))
            else:
                grads.append(grad)
    finally:
        step_module.contrastive_loss = loss
    final = _snapshot(state)
    out = {"records": records, "bank": final["bank"], "params": final["params"]}
    if reference is None:
        out.update(starts=starts, grads=grads)
    else:
        out["errors"] = errors
    return out


def run(out, scenarios=tuple(SCENARIOS), reference=None):
    """Runs the scenarios and saves OUT/rank-R.pt. With `reference` (a one-process run's
    rank-0.pt) the scenarios it holds are run from its per-step states (run_scenario)."""
    from insclr import dist

    dist.init("cpu")
    ref = torch.load(reference, weights_only=False, mmap=True) if reference is not None else {}
    results = {name: run_scenario(config(SCENARIOS[name]), reference=ref.get(name), nan_at=NAN_AT.get(name))
               for name in scenarios}
    if dist.world_size() > 1:  # only a reference needs its per-step tensors kept
        for result in results.values():
            result.pop("starts", None), result.pop("grads", None)
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out) / f"rank-{dist.rank()}.pt")
    return results


if __name__ == "__main__":
    run(sys.argv[1], reference=sys.argv[2] if len(sys.argv) > 2 else None)
    from insclr import dist

    dist.shutdown()
