"""Multi-scale descriptors of every image of a shard folder (ALGORITHM §2–3).

`extract(model, loader, scales, device)` runs the model over a streaming loader (each rank its
part under torchrun) and returns float16 [N, D] (or `dtype`) in sample-index order on every rank.
`python -m insclr.features` writes features.npy (+ features.json) on rank 0.
"""

import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from insclr import dist
from insclr.io import output_lock, print_error, progress, save_npy, write_json
from insclr.model import multiscale_features

DEFAULT_SCALES = (1.0, 1 / math.sqrt(2), 0.5)
GATHER_ROWS = 1 << 16  # rows per all_gather round: bounds the communication buffers


def autocast(device, amp="auto"):
    """The one autocast context: fp16 on CUDA by default (features are stored as fp16 anyway and
    fp16 keeps 3 more mantissa bits than bf16 for ranking), none on the CPU."""
    device = torch.device(device)
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("fp16", "bf16"):
        raise ValueError(f"amp {amp!r} is not one of auto, fp16, bf16, none")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def extract_local(model, loader, scales, device, amp="auto", show=True, dtype=torch.float16):
    """This rank's part: (indices int64 [n], features `dtype` [n, D]) in loader order.

    `loader` yields (images uint8 [B,3,H,W], indices int64 [B]); the model is put in eval mode.
    """
    from insclr.data import normalize

    model.eval()
    model.to(device=device, memory_format=torch.channels_last)
    all_idx, all_feat = [], []
    total = getattr(loader, "num_samples", None)
    with progress(total=total, desc="features", unit="img",
                  disable=None if show and dist.is_main() else True) as bar:
        for images, indices in loader:
            x = normalize(images.to(device, non_blocking=True), channels_last=True)
            with autocast(device, amp):
                f = multiscale_features(model, x, scales)
            all_feat.append(f.to(dtype).cpu())
            all_idx.append(torch.as_tensor(indices).long().cpu())
            bar.update(len(indices))
    if not all_feat:
        return torch.empty(0, dtype=torch.int64), None
    return torch.cat(all_idx), torch.cat(all_feat)


def _comm_device(device):
    """nccl moves only CUDA tensors; gloo only CPU ones."""
    return torch.device(device) if tdist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(indices, features, dim, device="cpu", dtype=torch.float16):
    """All ranks' (indices [n_r], features `dtype` [n_r, dim]) -> numpy `dtype` [N, dim] by index, on
    every rank. Ranks may hold different counts (padded, in rounds of GATHER_ROWS rows).
    Raises if the indices are not 0..N-1 exactly once."""
    if features is None:
        features = torch.empty(0, dim, dtype=dtype)
    if not dist.is_initialized() or dist.world_size() == 1:
        parts = [(indices, features)]
    else:
        comm = _comm_device(device)
        counts = dist.all_gather(torch.tensor([len(indices)], device=comm)).tolist()
        parts = [([], []) for _ in counts]
        for start in range(0, max(counts), GATHER_ROWS):
            stop = start + GATHER_ROWS
            idx = torch.full((GATHER_ROWS,), -1, dtype=torch.int64, device=comm)
            feat = torch.zeros(GATHER_ROWS, dim, dtype=dtype, device=comm)
            mine = indices[start:stop]
            idx[:len(mine)] = mine.to(comm)
            feat[:len(mine)] = features[start:stop].to(comm)
            all_idx = dist.all_gather(idx).view(len(counts), -1).cpu()
            all_feat = dist.all_gather(feat).view(len(counts), GATHER_ROWS, dim).cpu()
            for r, c in enumerate(counts):
                keep = max(0, min(c, stop) - start)
                parts[r][0].append(all_idx[r, :keep])
                parts[r][1].append(all_feat[r, :keep])
        parts = [(torch.cat(i), torch.cat(f)) for i, f in parts]
    return _place(parts, dim, torch.empty(0, dtype=dtype).numpy().dtype)


def _place(parts, dim, dtype):
    n = sum(len(i) for i, _ in parts)
    out = np.zeros((n, dim), dtype=dtype)
    seen = np.zeros(n, dtype=np.int64)
    for idx, feat in parts:
        idx = idx.numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"loader gave sample index {int(idx.max())} outside 0..{n - 1}")
        out[idx] = feat.numpy()
        np.add.at(seen, idx, 1)
    if (seen != 1).any():
        missing, repeated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
        raise ValueError(f"the loader must give every sample exactly once: {len(missing)} missing "
                         f"{missing[:5].tolist()}, {len(repeated)} repeated {repeated[:5].tolist()}")
    return out


def extract(model, loader, scales=DEFAULT_SCALES, device="cpu", amp="auto", show=True, dtype=torch.float16):
    """Multi-scale L2-normalised features of every sample: numpy `dtype` (float16 or float32)
    [N, D] in index order, gathered over ranks (every rank gets the whole array)."""
    indices, features = extract_local(model, loader, scales, device, amp, show, dtype)
    model = getattr(model, "module", model)  # DDP wrapper
    return gather_rows(indices, features, model.out_dim, device, dtype)


# ----------------------------------------------------------------------------- command line


def parse_scales(text):
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--scales {text!r}: expected comma-separated numbers, e.g. 1,0.7071,0.5") from None
    if not scales or any(not 0 < s <= 4 for s in scales):
        raise ValueError(f"--scales {text!r}: every scale must be in (0, 4]")
    return scales


def _parser():
    from insclr.args import Parser, output_file, positive_int
    from insclr.model import ARCHS, HEADS

    p = Parser(prog="python -m insclr.features", description="Multi-scale features of a shard folder (ALGORITHM §2–3).")
    p.add_argument("--shards", required=True, help="shard folder (python -m insclr.shard)")
    p.add_argument("--model", required=True, help="imagenet | random | PATH of a model file / checkpoint")
    p.add_argument("--out", required=True, type=output_file,
                   help="output features.npy (features.json is written beside it)")
    p.add_argument("--size", type=positive_int, default=512, help="square input side S (default 512)")
    p.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)),
                   help="comma-separated scales (default 1,1/sqrt(2),0.5)")
    p.add_argument("--batch", type=positive_int, default=32, help="images per batch and rank")
    p.add_argument("--split", default="part", help="split to extract (part, or query of evaluation sets)")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS), help="imagenet/random only (default resnet101)")
    p.add_argument("--head", default=None, choices=HEADS, help="imagenet/random only (default identity: stage 0)")
    p.add_argument("--dim", type=positive_int, default=None, help="imagenet/random only, linear heads")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="stored features (default float32: the original's; float16 halves the file and "
                        "moves near-tied neighbours, docs/features_pool.md)")
    p.add_argument("--amp", default=None, choices=("auto", "fp16", "bf16", "none"),
                   help="autocast of the forward (default: none with --dtype float32, auto = fp16 on CUDA "
                        "with --dtype float16)")
    p.add_argument("--threads", type=positive_int, default=2, help="DALI threads per rank")
    p.add_argument("--whiten", default=None, metavar="W.npz",
                   help="whiten the features by W.npz (python -m insclr.whiten), re-normalised")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        with output_lock(args.out):
            return run(args)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2


def write_outputs(args, model, features, scales, seconds, device, identity):
    """features.npy and the features.json summary beside it (rank 0); `identity`: of the shard
    folder, so that a pool or training can tell features of another folder (docs/formats.md)."""
    save_npy(args.out, features)
    info = {"model": str(args.model), "arch": model.arch, "head": model.head.kind, "dim": features.shape[1],
            "shards": str(args.shards), "shards_identity": identity, "split": args.split,
            "scales": list(scales), "size": args.size, "dtype": str(features.dtype),
            "count": len(features), "seconds": round(seconds, 3),
            "images_per_s": round(len(features) / max(seconds, 1e-9), 2),
            "world_size": dist.world_size(), "device": str(device)}
    if args.whiten:
        info["whiten"] = str(args.whiten)
    write_json(Path(args.out).with_suffix(".json"), info)
    print(f"features: {len(features)} x {features.shape[1]} in {seconds:.1f} s "
          f"({info['images_per_s']} img/s) -> {args.out}")


def run(args):
    scales = parse_scales(args.scales)
    from insclr.data import StreamLoader
    from insclr.model import load_model
    from insclr.shard.manifest import Manifest

    manifest = Manifest.load(args.shards)
    manifest.split(args.split)  # a missing split is an error before anything starts
    whitening = None
    if args.whiten:
        from insclr.whiten import load_whitening

        whitening = load_whitening(args.whiten)   # a bad file is an error before the extraction
    device = dist.init(args.device)
    try:
        # the loader checks the shard files against the manifest before any extraction
        loader = StreamLoader(manifest, split=args.split, mode="square", size=args.size,
                              batch_size=args.batch, device=device, num_threads=args.threads,
                              rank=dist.rank(), world_size=dist.world_size())
        model = load_model(args.model, args.arch, args.head, args.dim, device=device)
        if whitening is not None and whitening.mean.shape[0] != model.out_dim:
            raise ValueError(f"--whiten {args.whiten}: made for {whitening.mean.shape[0]}-d features, the model "
                             f"gives {model.out_dim}-d")
        t0 = time.perf_counter()
        dtype = {"float32": torch.float32, "float16": torch.float16}[args.dtype]
        amp = args.amp or ("none" if args.dtype == "float32" else "auto")
        features = extract(model, loader, scales, device, amp, dtype=dtype)
        if whitening is not None:
            from insclr.whiten import apply_whitening

            features = apply_whitening(features, whitening).astype(features.dtype)
        seconds = time.perf_counter() - t0
        if dist.is_main():
            write_outputs(args, model, features, scales, seconds, device, manifest.identity)
        dist.barrier()
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
