"""Runs a few training steps on in-memory images; launched by tests/test_train_ddp.py.

`torchrun --nproc_per_node 2 tests/train_ddp_helper.py OUT` (gloo) or `run(OUT)` in-process
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


def run_scenario(cfg, steps=3, nan_at=None):
    from insclr import dist
    from insclr.candidates import CandidatePool
    from insclr.data import NeighborBatchSampler, SequentialBatches, TrainBatch
    from insclr.train import step as step_module
    from insclr.train.banks import fill_bank
    from insclr.train.loop import make_state

    neighbors, similarities = pool()
    pixels = images()
    state, settings = make_state(cfg, torch.device("cpu"), CandidatePool.from_arrays(neighbors, similarities))
    if state.bank.needs_fill:
        seq = SequentialBatches(N, cfg.memory.init_batch, rank=dist.rank(), world_size=dist.world_size())
        fill_bank(state, settings, [TrainBatch(torch.from_numpy(i), torch.from_numpy(l), pixels[i], pixels[i], 0.0)
                                    for i, l in seq])
    sampler = NeighborBatchSampler(neighbors, B, K, seed=0, rank=dist.rank(), world_size=dist.world_size())
    records = []
    loss = step_module.contrastive_loss
    if nan_at is not None:
        step_module.contrastive_loss = nan_batch_loss(*nan_at)
    try:
        for step in range(1, steps + 1):
            idx, lab = sampler.next()
            idx, lab = torch.from_numpy(idx), torch.from_numpy(lab)
            noaug = pixels[idx] if cfg.noaug.enabled else None
            records.append(step_module.train_step(state, settings, TrainBatch(idx, lab, pixels[idx], noaug, 0.0)))
            if step == 1:  # the gradient of the first step, before Adam's sign-like first update hides it
                grads = {n: p.grad.clone() for n, p in state.module.named_parameters() if p.grad is not None}
    finally:
        step_module.contrastive_loss = loss
    bank = {k: v.clone() for k, v in state.bank.state_dict().items()}
    params = {k: v.detach().clone() for k, v in state.module.state_dict().items()}
    return {"records": records, "bank": bank, "params": params, "grads": grads}


def run(out, scenarios=tuple(SCENARIOS)):
    from insclr import dist

    dist.init("cpu")
    results = {name: run_scenario(config(SCENARIOS[name]), nan_at=NAN_AT.get(name)) for name in scenarios}
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out) / f"rank-{dist.rank()}.pt")
    return results


if __name__ == "__main__":
    run(sys.argv[1])
    from insclr import dist

    dist.shutdown()
