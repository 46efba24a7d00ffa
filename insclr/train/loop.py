"""The training loop: set-up, resume, the step loop, checkpoints, evaluation hook, final model.

Thin around `train_step` (insclr.train.step); every rank runs the same code, world size 1 included.
"""

import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from insclr import dist
from insclr.config import save_config
from insclr.io import progress
from insclr.train import checkpoint
from insclr.train.banks import fill_bank
from insclr.train.metrics import Metrics
from insclr.train.optim import build_optimizer, build_scheduler
from insclr.model import eval_mode, set_train_mode
from insclr.train.step import StepSettings, TrainState, train_step


def load_pool(path, manifest, k):
    """The CandidatePool of pool.npz, memory-mapped (shared by the ranks of a node, no copy), checked
    against the shard folder `manifest`: made from these shards, no NaN, no self-neighbour, one row
    per training image, at least data.k columns, indices in range (insclr.candidates)."""
    from insclr.candidates import CandidatePool

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.pool: candidate pool not found: {path} (make it with `python -m insclr.pool`)")
    pool = CandidatePool.open(path, manifest)
    pool.check_for_training(manifest.num_samples("part"), k)
    return pool


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
        check_compile(device)
        model = torch.compile(model)
    return model, module


def check_compile(device):
    """Refuse train.compile=true where torch.compile cannot build its kernels, before any work:
    on the CPU its inductor backend compiles C++ (a compiler must be on PATH: $CXX, g++ or c++),
    and ATEN_CPU_CAPABILITY must be unset: inductor then builds for that vector width too, and with
    torch 2.14 =default does not build, while kernels cached under one setting were reused under
    another (measured on an AVX-512 machine: =avx2 after a native run indexed out of bounds)."""
    if device.type != "cpu":
        return
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "")
    if capability:
        raise ValueError(f"train.compile=true on the CPU needs ATEN_CPU_CAPABILITY unset (it is "
                         f"{capability!r}): torch.compile's kernels for a forced vector width fail to build "
                         f"or reuse kernels cached for another; unset it or set train.compile=false")
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++") if c]
    if not any(shutil.which(c) for c in compilers):
        raise ValueError(f"train.compile=true on the CPU needs a C++ compiler on PATH (looked for "
                         f"{', '.join(compilers)}): torch.compile builds its CPU kernels with it; install "
                         f"one (e.g. g++) or set train.compile=false")


def make_state(cfg, device, pool):
    """(TrainState at step 0, StepSettings) of `cfg` on `device`, the bank built over `pool`."""
    from insclr.mining import build_bank

    settings = StepSettings.from_config(cfg, device)
    model, module = build_model(cfg, device)
    optimizer = build_optimizer(module, cfg.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.dtype == torch.float16)
    bank = build_bank(cfg.memory, pool, module.out_dim, device)
    state = TrainState(model=model, module=module, optimizer=optimizer,
                       scheduler=build_scheduler(optimizer, cfg.train), scaler=scaler, bank=bank)
    return state, settings


def make_loader(cfg, batches, device, rank):
    from insclr.data import TrainLoader

    return TrainLoader.from_config(cfg.data, batches, noaug_size=cfg.noaug.size if cfg.noaug.enabled else None,
                                   device=device, seed=cfg.train.seed, rank=rank)


def save_state(cfg, state, loader, keys):
    """A checkpoint of state.step; `keys`: what a resuming run must reproduce (resume.resume_keys)."""
    shared = state.state_dict()
    banks = shared.pop("bank")  # a file of its own: the largest part, written by rank 0 only
    per_rank = {"rng": checkpoint.rng_state(), "loader": loader.state_dict()}
    return checkpoint.save(cfg.train.out, state.step, shared, banks, per_rank, cfg,
                           keep=cfg.train.keep_checkpoints, resume_keys=keys)


def resume(cfg, state, loader, keys, device):
    """Load train.resume (auto: the latest intact checkpoint in OUT/ckpt) into `state` and `loader`
    after checking that this run may continue it (`keys`, see insclr.train.resume)."""
    from insclr.model import check_finite_weights
    from insclr.train.resume import check_compatible, load_checkpoint, stored_keys

    found = load_checkpoint(cfg.train.resume, cfg.train.out, device)
    if found is None:
        return
    path, manifest, shared, banks, per_rank = found
    check_compatible(path, stored_keys(path, manifest), keys, cfg)
    if int(shared["step"]) > cfg.train.steps:
        raise ValueError(f"train.steps={cfg.train.steps}: {path} is at step {shared['step']} already (train.steps "
                         f"may grow when resuming, not shrink below the checkpoint)")
    check_finite_weights(shared["model"], path / "state.pt")
    state.load_state_dict({**shared, "bank": banks})
    loader.load_state_dict(per_rank["loader"])
    checkpoint.set_rng_state(per_rank["rng"])
    if dist.is_main():
        print(f"resumed from {path} (step {state.step})")


def flatten(prefix, value):
    """{'roxford5k': {'mAP': {'M': 1}}} -> {'eval/roxford5k/mAP/M': 1} (numbers only)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}/{k}", v))
        return out
    return {prefix: float(value)} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def run_eval(cfg, state, device, metrics):
    """The periodic evaluation hook: insclr.evaluate.evaluate on eval.data with the bare model, every rank."""
    from insclr.evaluate import evaluate

    step = state.step
    with torch.no_grad(), eval_mode(state.module, cfg.train.freeze_bn):
        results = evaluate(state.module, list(cfg.eval.data), cfg.eval.shards_root, cfg.eval.scales, device,
                           show=cfg.eval.show, out_dir=Path(cfg.train.out) / "eval" / f"step-{step:08d}")
    metrics.log({"step": step, **flatten("eval", results)})
    return results


def init_bank(cfg, state, settings, num_samples, device):
    """The bank's initialisation pass (bank v2, §8), distributed over ranks."""
    from insclr.data import SequentialBatches

    batches = SequentialBatches(num_samples, cfg.memory.init_batch, rank=dist.rank(), world_size=dist.world_size())
    loader = make_loader(cfg, batches, device, dist.rank())
    with progress(total=num_samples, desc="bank v2 init", disable=_no_bar(cfg)) as bar:
        fill_bank(state, settings, loader, bar)


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
    """Damaged images replaced in this step over all ranks (data.on_bad_sample=skip): an int64
    count on the device, read with the step's other figures; else None."""
    if cfg.data.on_bad_sample != "skip":
        return None
    count = torch.full((1,), batch.replaced, dtype=torch.int64, device=device)  # a fill: no host copy
    if dist.is_initialized() and dist.world_size() > 1:
        torch.distributed.all_reduce(count)
    return count


def show(cfg, bar, records):
    """The read records on the console: the bar's loss and images/s (the latest), the log lines."""
    if records:
        bar.set_postfix(loss=f"{records[-1].get('loss', float('nan')):.4f}",
                        img_s=f"{records[-1]['images_per_s']:.1f}", refresh=False)  # drawn at the bar's own pace
    for record in records:
        log_line(cfg, record)


def flush_after_error(metrics):
    """Write the records of the steps made before an error; a failing read must not hide the error."""
    try:
        metrics.flush()
    except Exception as error:
        print(f"warning: the metrics of the last steps could not be read: {error}", file=sys.stderr)


def run_steps(cfg, state, settings, loader, metrics, keys):
    """Steps state.step+1 .. train.steps: step, log, checkpoint, evaluate.

    A step's figures stay on the device until they are read: every train.log_every steps (0: never),
    before a checkpoint (its metrics.jsonl then holds every step it covers) or an evaluation, and at
    the last step; the records of all the steps since the last read come to the host in one copy
    (Metrics.flush). Timings are taken on the host.
    """
    rows = cfg.train.batch * (cfg.data.k + 1)
    batches = iter(loader)
    with progress(total=cfg.train.steps, initial=state.step, unit="step", desc="train", disable=_no_bar(cfg)) as bar:
        last = time.perf_counter()
        try:
            while state.step < cfg.train.steps:
                batch = next(batches)
                record = train_step(state, settings, batch)
                step = state.step
                now = time.perf_counter()
                seconds, last = now - last, now
                record = {"step": step, **record, "images_per_s": rows / seconds, "step_s": seconds,
                          "data_wait": min(batch.wait_s / seconds, 1.0)}
                if (replaced := replaced_images(cfg, batch, settings.device)) is not None:
                    record["bad_samples"] = replaced
                metrics.add(record)
                bar.update(1)
                save = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
                evaluate = cfg.eval.data and cfg.train.eval_every and step % cfg.train.eval_every == 0
                if save or evaluate or (cfg.train.log_every and step % cfg.train.log_every == 0):
                    show(cfg, bar, metrics.flush())
                if save:
                    save_state(cfg, state, loader, keys)
                if evaluate:
                    run_eval(cfg, state, settings.device, metrics)
                last = time.perf_counter()  # checkpoint and evaluation time is not step time
        except BaseException:
            flush_after_error(metrics)
            raise


def train(cfg):
    """Run (or resume) the training described by `cfg`; returns the path of OUT/model.pt."""
    from insclr.data import NeighborBatchSampler
    from insclr.model import save_model
    from insclr.pool import neighbor_precision
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
    pool = load_pool(cfg.data.pool, manifest, cfg.data.k)
    keys = resume_keys(cfg, {"data.shards": manifest.identity, "data.pool": pool.identity})
    seed_everything(cfg.train.seed, dist.rank())
    state, settings = make_state(cfg, device, pool)
    sampler = NeighborBatchSampler(pool.neighbors, cfg.train.batch, cfg.data.k, seed=cfg.train.seed,
                                   rank=dist.rank(), world_size=dist.world_size())
    loader = make_loader(cfg, sampler, device, dist.rank())  # checks the shard files (ShardReader)
    resume(cfg, state, loader, keys, device)
    if dist.is_main():
        save_config(cfg, out / "config.yaml")
    metrics = Metrics(out, dist.is_main(), state.step, cfg.train.tensorboard)
    if state.step == 0:
        precision = neighbor_precision(pool.neighbors, manifest.labels("part"), (cfg.data.k,))
        metrics.log({"step": 0, "pool_precision": precision.get(cfg.data.k)})
        if cfg.eval.data and cfg.train.eval_every:
            run_eval(cfg, state, device, metrics)  # the initial model, as the original's TEST_PERIOD: a curve from step 0
        if state.bank.needs_fill:
            init_bank(cfg, state, settings, num_samples, device)
    try:
        run_steps(cfg, state, settings, loader, metrics, keys)
    finally:
        loader.close()
    if cfg.eval.data and (not cfg.train.eval_every or cfg.train.steps % cfg.train.eval_every):
        run_eval(cfg, state, device, metrics)
    if dist.is_main():
        save_model(state.module, cfg.model, out / "model.pt")
    metrics.close()
    dist.barrier()
    return out / "model.pt"
