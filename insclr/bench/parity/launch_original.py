"""The original InsCLR trainer (justforforfor/insclr, tools/train_net.py) on our synthetic set.

`python -m insclr.bench.parity.launch_original --original REPO --work DIR --opts OPTS.json --seed S`
runs it in this process with only compatibility shims, applied at run time to a developer's own
checkout (nothing of it is copied into this package):

- `collections.Mapping` / `collections.Sequence` (gone in Python 3.10) point at `collections.abc`;
- a stand-in `tensorboardX.SummaryWriter` that writes the scalars the trainer logs to
  DIR/metrics.jsonl (one record per step: loss, batch/loss, memory/loss, grad_norm, ...);
- `CUDA_VISIBLE_DEVICES=""`: torch sees no GPU and the trainer builds no DataParallel;
- its `benchmark.evaluation` package is replaced by evaluators that do nothing (they would need
  scikit-learn and read datasets/roxford5k at step 0 and every TEST_PERIOD steps; both models are
  evaluated afterwards by our evaluator instead);
- the seed: train_net seeds random/numpy/torch with 42 on import; we seed them again with S.

The working folder DIR gets datasets/gldv2 (links into the synthetic GLDv2 train folder, the layout
the original reads relative to its working directory). The functions above `main` need no original
code: the weight mapping, the options built from our config, the neighbour file.
"""

import json
import os
import sys
import types
from pathlib import Path

import numpy as np

# ours -> original parameter names (the rest of the names are the same: torchvision ResNet layers)
PREFIXES = (("trunk.", "backbone."), ("head.linear.", "combiner.head.fc."))
HEADS = {"linear_norm", "norm_linear_norm"}


def to_original(state):
    """Our RetrievalModel state_dict -> the original's nn.Sequential(backbone, combiner) names."""
    out = {}
    for key, value in state.items():
        for ours, theirs in PREFIXES:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:
            if not key.startswith("pool."):
                raise KeyError(f"model state: no original name for {key!r}")
    return out


def from_original(state):
    """The original's state_dict (optionally with DataParallel's `module.`) -> our names."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        for ours, theirs in PREFIXES:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            raise KeyError(f"original model state: no name of ours for {key!r}")
    return out


def original_options(cfg, out_dir, neighbors, init, workers, num_images):
    """yacs options (KEY, value, ...) that make tools/train_net.py train what `cfg` (our Config) describes.

    out_dir: the original's OUTPUT_DIR prefix; neighbors: npz with 'neighbor' (write_neighbors);
    init: the initial weights in the original's names (torch.save of to_original); num_images: N.
    """
    d, m, t, mem = cfg.data, cfg.model, cfg.train, cfg.memory
    if m.head not in HEADS or cfg.noaug.enabled or cfg.selection.mode != "none" or mem.version == "v2":
        raise ValueError("parity: only the s1 recipe is mapped (linear head, no no-aug view, no selection, bank "
                         f"none or v1); got model.head={m.head}, noaug.enabled={cfg.noaug.enabled}, "
                         f"selection.mode={cfg.selection.mode}, memory.version={mem.version}")
    from insclr.model import ARCHS

    opts = {
        "OUTPUT_DIR": str(out_dir), "DEVICE": "cpu", "DATA.DATASET": "gldv2",
        "INPUT.TRAIN_IMG_SIZE": (d.size, d.size), "INPUT.SCALE_LOWER": d.crop_scale[0],
        "INPUT.SCALE_UPPER": d.crop_scale[1], "DATALOADER.NUM_WORKERS": workers,
        "MODEL.PRETRAIN": str(init), "MODEL.BACKBONE.NAME": m.arch, "MODEL.POOL.NAME": "gem",
        "MODEL.POOL.GMP.P": m.gem_p, "MODEL.HEAD.NAME": m.head, "MODEL.HEAD.IN_DIM": ARCHS[m.arch][0],
        "MODEL.HEAD.OUT_DIM": m.dim, "LOSS.CONTRASTIVE_LOSS.MARGIN": cfg.loss.margin,
        "LOSS.CONTRASTIVE_LOSS.POS_MARGIN": cfg.loss.pos_margin,
        "SOLVER.NAME": "adam", "SOLVER.BASE_LR": t.lr, "SOLVER.WEIGHT_DECAY": t.weight_decay,
        "SOLVER.WEIGHT_DECAY_BIAS": 0.0, "SOLVER.STEPS": list(t.milestones), "SOLVER.GAMMA": t.gamma,
        "SOLVER.MAX_STEP": t.steps, "SOLVER.WARMUP_STEP": 0, "SOLVER.IMS_PER_BATCH": t.batch,
        "SOLVER.CHECKPOINT_PERIOD": t.steps, "SOLVER.GRAD_MAX_NORM": t.clip_grad if t.clip_grad > 0 else 9999999.0,
        "TEST.TEST_PERIOD": t.steps + 1, "NEIGHBOR.SRC": str(neighbors), "NEIGHBOR.K": d.k,
        "XBM.ENABLE": mem.version == "v1", "XBM.VERSION": "v1", "XBM.POTENTIAL_POSITIVE": mem.potential_positive,
        "XBM.SIZE": num_images,
        "XBM.FEATURE_DIM": m.dim, "XBM.START_STEP": mem.start_step, "XBM.GET_STEP": mem.get_step,
        "XBM.GET_SIZE": mem.get_size, "XBM.MEMORY_LOSS_WEIGHT": cfg.loss.memory_weight,
    }
    return opts


def write_neighbors(pool_path, out):
    """Our pool.npz ('neighbors') -> the original's neighbour file ('neighbor'); returns its number of rows."""
    with np.load(pool_path) as pool:
        neighbors = pool["neighbors"].astype(np.int64)
    np.savez(out, neighbor=neighbors)
    return len(neighbors)


def link_gldv2(src, work):
    """WORK/datasets/gldv2: train_clean.csv and the image folders of SRC/train, as the original reads them."""
    src, dst = Path(src).resolve(), Path(work) / "datasets" / "gldv2"
    if not (src / "train_clean.csv").is_file() or not (src / "train").is_dir():
        raise FileNotFoundError(f"{src}: not a GLDv2 folder (train_clean.csv and train/ expected)")
    dst.mkdir(parents=True, exist_ok=True)
    for item in [src / "train_clean.csv", *sorted((src / "train").iterdir())]:
        link = dst / item.name
        if not link.exists():
            link.symlink_to(item)
    return dst


def original_ids(work):
    """Image ids in the order the original's GLDv2 dataset numbers them (landmarks with >= 15 images)."""
    lines = (Path(work) / "datasets" / "gldv2" / "train_clean.csv").read_text().splitlines()[1:]
    ids = []
    for line in lines:
        images = line.strip().split(",", 1)[1].split()
        if len(images) >= 15:
            ids.extend(images)
    return ids


class _Writer:
    """Stand-in for tensorboardX.SummaryWriter: add_scalar + flush -> one JSON line per step."""

    def __init__(self, logdir=None, *args, **kwargs):
        self.path = Path(os.environ.get("INSCLR_PARITY_METRICS") or Path(logdir) / "metrics.jsonl")
        self.record = {}

    def add_scalar(self, key, value, step):
        self.record["step"] = int(step)
        self.record[key] = float(value)

    def flush(self):
        if self.record:
            with open(self.path, "a") as f:
                f.write(json.dumps(self.record) + "\n")
        self.record = {}

    def close(self):
        self.flush()


class _NoEvaluator:
    def __init__(self, *args, **kwargs):
        pass

    def evaluate(self, model, device):
        return "evaluation off (parity run)", {}

    def __repr__(self):
        return "evaluator off"


def coerce(cfg, key, value):
    """`value` in the type of the original's default for `key` (yacs refuses 3.0 for an int key)."""
    current = cfg
    for part in key.split("."):
        current = current[part]
    if isinstance(current, bool) or isinstance(current, str):
        return type(current)(value)
    if isinstance(current, int):
        if float(value) != int(value):
            raise ValueError(f"parity: {key}={value!r}: the original takes an integer here")
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, (tuple, list)):
        return type(current)(value)
    return value


def apply_shims():
    import collections
    import collections.abc

    for name in ("Mapping", "Sequence", "Iterable", "MutableMapping"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    stub = types.ModuleType("tensorboardX")
    stub.SummaryWriter = _Writer
    sys.modules["tensorboardX"] = stub
    # its evaluation package (which needs scikit-learn) is never imported: the evaluators are off
    evaluation = types.ModuleType("benchmark.evaluation")
    for name in ("ROxford5kEvaluator", "RParis6kEvaluator", "InstreEvaluator"):
        setattr(evaluation, name, _NoEvaluator)
    sys.modules["benchmark.evaluation"] = evaluation


def run_original(original, opts, seed, threads):
    """Import tools/train_net.py of the checkout `original`, shimmed, seed it and train."""
    import importlib.util
    import random

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    apply_shims()
    sys.path.insert(0, str(Path(original).resolve()))
    spec = importlib.util.spec_from_file_location("insclr_original_train_net", Path(original) / "tools" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)  # seeds 42 at import, as its __main__ would
    import torch

    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    options = []
    for key, value in opts.items():
        options += [key, repr(coerce(train_net.cfg, key, value))]  # yacs literal_evals each value
    train_net.cfg.merge_from_list(options)
    train_net.train()
    return train_net.cfg.OUTPUT_DIR


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m insclr.bench.parity.launch_original")
    p.add_argument("--original", required=True, help="checkout of justforforfor/insclr")
    p.add_argument("--work", required=True, help="working folder (holds datasets/gldv2)")
    p.add_argument("--opts", required=True, help="JSON {yacs key: value} (original_options)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    opts = json.loads(Path(args.opts).read_text())
    os.chdir(args.work)
    out = run_original(args.original, opts, args.seed, args.threads)
    print(f"original: wrote {Path(out) / 'model_final.pth'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
