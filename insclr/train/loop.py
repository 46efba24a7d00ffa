"""The training loop: set-up, resume, the step loop, checkpoints, evaluation hook, final model.

Thin around `train_step` (insclr.train.step); every rank runs the same code, world size 1 included.
"""

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from insclr import dist
from insclr.config import save_config
from insclr.io import progress
from insclr.train import checkpoint
from insclr.train.banks import build_bank, fill_bank_v2
from insclr.train.metrics import Metrics
from insclr.train.optim import build_optimizer, build_scheduler
from insclr.train.step import StepContext, amp_dtype, set_train_mode, train_step


def load_pool(path, manifest, k):
    """(neighbors int64 [N, k'], similarities float32 [N, k'], identity) of pool.npz, checked against
    the shard folder `manifest` (insclr.pool.read_pool: made from these shards, no NaN, no self-neighbour)."""
    from insclr.pool import read_pool

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.pool: candidate pool not found: {path} (make it with `python -m insclr.pool`)")
    neighbors, similarities, identity = read_pool(path, manifest)
    num_samples = manifest.num_samples("part")
    if neighbors.shape[0] != num_samples or neighbors.shape != similarities.shape:
        raise ValueError(f"{path}: pool of shape {neighbors.shape}/{similarities.shape} does not match "
                         f"the {num_samples} training images of data.shards")
    if neighbors.shape[1] < k:
        raise ValueError(f"{path}: pool has {neighbors.shape[1]} neighbours per image, data.k={k} needs more")
    if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= num_samples):
        raise ValueError(f"{path}: neighbour indices span [{neighbors.min()}, {neighbors.max()}], outside the "
                         f"{num_samples} training images of data.shards")
    return neighbors.astype(np.int64), similarities.astype(np.float32), identity


def pool_precision(neighbors, labels, k):
    """Fraction of the first k pool neighbours sharing their image's label (images with a label only)."""
    known = labels >= 0
    if not known.any():
        return None
    same = labels[neighbors[known, :k]] == labels[known, None]
    return float(same.mean())


def seed_everything(seed, rank):
    """Per-rank seeds for anything drawn outside the seeded sampler/loader (model init has its own)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def set_threads(threads):
    """Pin torch's CPU threads per rank to train.threads (0: the machine's cores / ranks on this node).

    The CPU convolutions split their weight-gradient sums between threads, so the thread count is
    part of the arithmetic (1 and 2 threads part at the first update); taken from the config, the
    same seed and config give the same losses whatever OMP_NUM_THREADS / MKL_NUM_THREADS say.
    """
    if threads == 0:
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    return threads


def build_model(cfg, device):
    """(model for the augmented forward: DDP/compiled wrapper, bare module)."""
    from insclr.model import build_model as build

    module = build(cfg.model).to(device)
    if cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn:
        if device.type != "cuda":
            raise ValueError("train.sync_bn=true needs CUDA; on the CPU use train.freeze_bn=true for exact DDP")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    set_train_mode(module, cfg.train.freeze_bn)
    model = module
    if dist.world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if cfg.train.compile:
        model = torch.compile(model)
    return model, module


def make_context(cfg, device, neighbors, similarities, num_samples):
    model, module = build_model(cfg, device)
    optimizer = build_optimizer(module, cfg.train, device)
    dtype = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    bank = build_bank(cfg.memory, neighbors, similarities, num_samples, module.out_dim, device)
    return StepContext(model=model, module=module, optimizer=optimizer,
                       scheduler=build_scheduler(optimizer, cfg.train), scaler=scaler, bank=bank,
                       loss=cfg.loss, selection=cfg.selection, noaug=cfg.noaug, memory=cfg.memory,
                       train=cfg.train, device=device, k=cfg.data.k, dtype=dtype)


def make_loader(cfg, batches, device, rank):
    from insclr.data import TrainLoader

    d = cfg.data
    return TrainLoader(d.shards, batches, d.size, d.crop_scale, crop_ratio=d.crop_ratio,
                       noaug_size=cfg.noaug.size if cfg.noaug.enabled else None, device=device,
                       num_threads=d.num_threads, read_threads=d.read_threads, prefetch=d.prefetch,
                       seed=cfg.train.seed, rank=rank, on_bad_sample=d.on_bad_sample,
                       max_bad_samples=d.max_bad_samples)


def save_state(cfg, ctx, loader, step, keys):
    """A checkpoint of `step`; `keys`: what a resuming run must reproduce (resume.resume_keys)."""
    shared = {"step": step, "model": ctx.module.state_dict(), "optimizer": ctx.optimizer.state_dict(),
              "scheduler": ctx.scheduler.state_dict(), "scaler": ctx.scaler.state_dict(),
              "nonfinite_in_row": ctx.nonfinite_in_row, "nonfinite_total": ctx.nonfinite_total,
              "world_size": dist.world_size()}
    banks = ctx.bank.state_dict() if ctx.bank is not None else {}
    per_rank = {"rng": checkpoint.rng_state(), "loader": loader.state_dict()}
    return checkpoint.save(cfg.train.out, step, shared, banks, per_rank, cfg, keep=cfg.train.keep_checkpoints,
                           resume_keys=keys)


def resume(cfg, ctx, loader, keys):
    """Load train.resume (auto: the latest intact checkpoint in OUT/ckpt) after checking that this
    run may continue it (`keys`, see insclr.train.resume); return the step reached (0: fresh)."""
    from insclr.model import check_finite_weights
    from insclr.train.resume import check_compatible, load_checkpoint, stored_keys

    found = load_checkpoint(cfg.train.resume, cfg.train.out, ctx.device)
    if found is None:
        return 0
    path, manifest, shared, banks, per_rank = found
    check_compatible(path, stored_keys(path, manifest), keys, cfg)
    if int(shared["step"]) > cfg.train.steps:
        raise ValueError(f"train.steps={cfg.train.steps}: {path} is at step {shared['step']} already (train.steps "
                         f"may grow when resuming, not shrink below the checkpoint)")
    check_finite_weights(shared["model"], path / "state.pt")
    ctx.module.load_state_dict(shared["model"])
    ctx.optimizer.load_state_dict(shared["optimizer"])
    ctx.scheduler.load_state_dict(shared["scheduler"])
    ctx.scaler.load_state_dict(shared["scaler"])
    ctx.nonfinite_in_row, ctx.nonfinite_total = shared["nonfinite_in_row"], shared["nonfinite_total"]
    if ctx.bank is not None:
        ctx.bank.load_state_dict(banks)
    loader.load_state_dict(per_rank["loader"])
    checkpoint.set_rng_state(per_rank["rng"])
    if dist.is_main():
        print(f"resumed from {path} (step {shared['step']})")
    return int(shared["step"])


def flatten(prefix, value):
    """{'roxford5k': {'mAP': {'M': 1}}} -> {'eval/roxford5k/mAP/M': 1} (numbers only)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}/{k}", v))
        return out
    return {prefix: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def run_eval(cfg, ctx, step, metrics):
    """The periodic evaluation hook: insclr.evaluate.evaluate on eval.data with the bare model, every rank."""
    from insclr.evaluate import evaluate

    ctx.module.eval()
    with torch.no_grad():
        results = evaluate(ctx.module, list(cfg.eval.data), cfg.eval.shards_root, cfg.eval.scales, ctx.device,
                           show=cfg.eval.show, out_dir=Path(cfg.train.out) / "eval" / f"step-{step:08d}")
    set_train_mode(ctx.module, cfg.train.freeze_bn)
    metrics.log({"step": step, **flatten("eval", results)})
    return results


def init_bank(cfg, ctx, num_samples, device):
    """The v2 bank's initialisation pass (§8), distributed over ranks."""
    from insclr.data import SequentialBatches

    batches = SequentialBatches(num_samples, cfg.memory.init_batch, rank=dist.rank(), world_size=dist.world_size())
    loader = make_loader(cfg, batches, device, dist.rank())
    with progress(total=num_samples, desc="bank v2 init", disable=_no_bar(cfg)) as bar:
        fill_bank_v2(ctx, loader, bar)


def _no_bar(cfg):
    return not (dist.is_main() and cfg.train.progress) or os.environ.get("INSCLR_NO_PROGRESS") == "1"


def log_line(cfg, record):
    """Without a progress bar (logs of pipeline stages, batch jobs) rank 0 prints a short line every
    train.log_every steps, so that a log still shows the run advancing."""
    every, step = cfg.train.log_every, record["step"]
    if not every or not dist.is_main() or not _no_bar(cfg) or (step % every and step != cfg.train.steps):
        return
    print(f"step {step}/{cfg.train.steps}  loss {record.get('loss', float('nan')):.4f}  "
          f"lr {record.get('lr', float('nan')):.3g}  {record['images_per_s']:.1f} img/s", flush=True)


def replaced_images(cfg, batch, device):
    """Damaged images replaced in this step over all ranks (data.on_bad_sample=skip), else None."""
    if cfg.data.on_bad_sample != "skip":
        return None
    count = torch.tensor([float(batch.replaced)], device=device)
    if dist.is_initialized() and dist.world_size() > 1:
        torch.distributed.all_reduce(count)
    return int(count.item())


def run_steps(cfg, ctx, loader, start, metrics, keys):
    """Steps start+1 .. train.steps: step, log, checkpoint, evaluate."""
    rows = cfg.train.batch * (cfg.data.k + 1)
    batches = iter(loader)
    with progress(total=cfg.train.steps, initial=start, unit="step", desc="train", disable=_no_bar(cfg)) as bar:
        last = time.perf_counter()
        for step in range(start + 1, cfg.train.steps + 1):
            batch = next(batches)
            record = train_step(ctx, step, batch.indices, batch.labels, batch.aug, batch.noaug)
            now = time.perf_counter()
            seconds, last = now - last, now
            record = {"step": step, **record, "images_per_s": rows / seconds, "step_s": seconds,
                      "data_wait": min(batch.wait_s / seconds, 1.0)}
            if (replaced := replaced_images(cfg, batch, ctx.device)) is not None:
                record["bad_samples"] = replaced
            metrics.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{rows / seconds:.1f}",
                            refresh=False)  # drawn at the bar's own pace (in a log: every few seconds)
            log_line(cfg, record)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_state(cfg, ctx, loader, step, keys)
            if cfg.eval.data and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                run_eval(cfg, ctx, step, metrics)
            last = time.perf_counter()  # checkpoint and evaluation time is not step time


def train(cfg):
    """Run (or resume) the training described by `cfg`; returns the path of OUT/model.pt."""
    from insclr.data import NeighborBatchSampler
    from insclr.model import save_model
    from insclr.shard.manifest import Manifest

    from insclr.args import check_output_dir
    from insclr.train.resume import resume_keys

    check_output_dir(cfg.train.out, "train.out")
    device = dist.init(cfg.train.device)
    set_threads(cfg.train.threads)
    if cfg.train.batch % dist.world_size():
        raise ValueError(f"train.batch={cfg.train.batch} anchors do not split over {dist.world_size()} ranks")
    torch.backends.cudnn.benchmark = True
    out = Path(cfg.train.out)
    manifest = Manifest.load(cfg.data.shards)
    num_samples = manifest.num_samples("part")
    neighbors, similarities, pool_identity = load_pool(cfg.data.pool, manifest, cfg.data.k)
    keys = resume_keys(cfg, {"data.shards": manifest.identity, "data.pool": pool_identity})
    seed_everything(cfg.train.seed, dist.rank())
    ctx = make_context(cfg, device, neighbors, similarities, num_samples)
    sampler = NeighborBatchSampler(neighbors, cfg.train.batch, cfg.data.k, seed=cfg.train.seed,
                                   rank=dist.rank(), world_size=dist.world_size())
    loader = make_loader(cfg, sampler, device, dist.rank())  # checks the shard files (ShardReader)
    start = resume(cfg, ctx, loader, keys)
    if dist.is_main():
        save_config(cfg, out / "config.yaml")
    metrics = Metrics(out, dist.is_main(), start, cfg.train.tensorboard)
    if start == 0:
        metrics.log({"step": 0, "pool_precision": pool_precision(neighbors, manifest.labels("part"), cfg.data.k)})
        if cfg.eval.data and cfg.train.eval_every:
            run_eval(cfg, ctx, 0, metrics)  # the initial model, as the original's TEST_PERIOD: a curve from step 0
        if cfg.memory.version == "v2":
            init_bank(cfg, ctx, num_samples, device)
    try:
        run_steps(cfg, ctx, loader, start, metrics, keys)
    finally:
        loader.close()
    if cfg.eval.data and (not cfg.train.eval_every or cfg.train.steps % cfg.train.eval_every):
        run_eval(cfg, ctx, cfg.train.steps, metrics)
    if dist.is_main():
        save_model(ctx.module, cfg.model, out / "model.pt")
    metrics.close()
    dist.barrier()
    return out / "model.pt"
