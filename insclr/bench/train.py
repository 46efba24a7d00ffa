"""Benchmark suite `train`: (a) mining, bank v2 get + memory loss per step (insclr.bench.mining.run),
(b) a whole training step, images/s with our settings vs float32 eager on the same batch and device.

Headline ratio: the mining ratio (our vectorised get vs the per-group loop reference); the step
ratio is reported beside it as `step_ratio`.
"""

import sys

import torch

from insclr.bench import common


def time_steps(overrides, device, anchors, k, size, repeats, arch, baseline):
    """Median seconds of train_step on one fixed batch of anchors·(k+1) random images."""
    from insclr.config import load_config
    from insclr.data import NeighborBatchSampler, TrainBatch
    from insclr.train.loop import make_state
    from insclr.train.optim import build_optimizer
    from insclr.synth.pool import random_pool
    from insclr.train.step import train_step

    cfg = load_config(None, [f"model.arch={arch}", "model.init=random", "model.head=norm_linear_norm",
                             f"train.batch={anchors}", f"data.k={k}", "memory.version=none",
                             f"train.device={device.type}"] + overrides)
    n = max(4 * anchors * (k + 1), 64)
    pool = random_pool(n, k)
    state, settings = make_state(cfg, device, pool)
    if baseline:
        state.optimizer = build_optimizer(state.module, cfg.train, device, fused=False)
        state.scheduler = torch.optim.lr_scheduler.MultiStepLR(state.optimizer, [10**9])
    idx, lab = NeighborBatchSampler(pool.neighbors, anchors, k).next()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(idx), 3, size, size), dtype=torch.uint8, generator=g).to(device)
    batch = TrainBatch(torch.from_numpy(idx), torch.from_numpy(lab), images, None, 0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    warmup = 3 if cfg.train.compile else 1
    times = common.timed(lambda: train_step(state, settings, batch), repeats=repeats, warmup=warmup, sync=sync)
    return common.median(times), times


def run_step(device, anchors, k, size, repeats, arch, amp, compile_):
    ours = [f"train.amp={amp}", "train.channels_last=true", f"train.compile={str(compile_).lower()}"]
    base = ["train.amp=none", "train.channels_last=false", "train.compile=false"]
    rows = anchors * (k + 1)
    ours_s, ours_t = time_steps(ours, device, anchors, k, size, repeats, arch, baseline=False)
    base_s, base_t = time_steps(base, device, anchors, k, size, repeats, arch, baseline=True)
    return {"arch": arch, "size": size, "rows": rows, "device": str(device), "amp": amp, "compile": compile_,
            "ours_step_s": ours_s, "baseline_step_s": base_s, "ours_images_per_s": rows / ours_s,
            "baseline_images_per_s": rows / base_s, "ratio": base_s / ours_s,
            "ours_times_s": ours_t, "baseline_times_s": base_t}


def main(argv=None):
    from insclr.args import positive_int

    p = common.parser("training: mining per step (bank v2) and a whole training step, ours vs baseline", "train")
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--mining-n", type=positive_int, default=200_000 if cuda else 50_000,
                   help="images in the bank (the issue's figure: 200000 on the CPU, 1.2M on an H100)")
    p.add_argument("--mining-get-size", type=positive_int, default=100_000 if cuda else 25_000)
    p.add_argument("--mining-dim", type=positive_int, default=2048)
    p.add_argument("--anchors", type=positive_int, default=8 if cuda else 2, help="anchors per step (demo batch: 8)")
    p.add_argument("--k", type=positive_int, default=3)
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--amp", default="auto", help="our autocast: auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | none")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--skip-mining", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    figures = {}
    if not args.skip_mining:
        from insclr.bench.mining import floor_row, run as mining_run

        figures["mining"] = mining_run(args.mining_n, args.mining_dim, args.mining_get_size, 16, 3,
                                       args.repeats, str(device),
                                       ref_repeats=min(args.repeats, 3))
        m = figures["mining"]
        common.print_table([{"what": "bank v2 get + memory loss", "ours_ms": m["ours_step_s"] * 1e3,
                             "reference_ms": m["reference_step_s"] * 1e3, "ratio": m["ratio"],
                             "identical": m["rows_identical"]}, floor_row(m)],
                           ["what", "ours_ms", "reference_ms", "ratio", "identical"],
                           title=f"mining: N={m['n']} D={m['dim']} get_size={m['get_size']} 16x(1+3) on {device}")
    s = figures["step"] = run_step(device, args.anchors, args.k, args.size, args.repeats, args.arch,
                                   args.amp, args.compile)
    common.print_table([{"what": "ours (channels_last, amp, fused Adam on CUDA)", "step_ms": s["ours_step_s"] * 1e3,
                         "images_per_s": s["ours_images_per_s"]},
                        {"what": "baseline (float32 eager)", "step_ms": s["baseline_step_s"] * 1e3,
                         "images_per_s": s["baseline_images_per_s"]}],
                       ["what", "step_ms", "images_per_s"],
                       title=f"training step: {s['arch']} {s['size']}px, {s['rows']} images/step on {device} "
                             f"(medians of {args.repeats}); ratio {s['ratio']:.3f}")
    figures["step_ratio"] = s["ratio"]
    headline = figures["mining"]["ratio"] if "mining" in figures else s["ratio"]
    figures["headline"] = "mining" if "mining" in figures else "step"
    common.report("train", headline, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
