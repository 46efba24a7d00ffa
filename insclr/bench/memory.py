"""GPU memory per rank of a GLDv2 recipe stage at full scale, computed (no GPU needed):
`python -m insclr.bench.memory [--n 1200000] [--dim 2048] [--arch resnet101] [--json PATH]`.

Banks, pool arrays, the step's gathered bank rows, model + gradients + Adam states and the DDP
gradient buckets are computed from their shapes and dtypes (as insclr.mining and insclr.train
allocate them on a GPU: banks in bf16, pool columns int32). The activations saved for backward
are measured here on the CPU: the bytes of every tensor autograd saves (torch.autograd.graph
saved_tensors_hooks, each storage counted once) in one forward of the model under bf16 autocast,
per image at 224 px; a ResNet's feature maps scale with the pixel count, so other sizes are that
figure × (size / 224)². The no-aug forward runs without gradient: only a few feature maps live
at once (its peak is estimated as 3 × the largest saved map per image).
"""

import sys

import torch

GB = 1e9


def saved_activation_bytes(arch, head, dim, size=224, batch=2):
    """(bytes saved for backward per image, bytes of the largest saved tensor per image) under
    bf16 autocast on the CPU."""
    from insclr.config import load_config
    from insclr.model import build_model

    cfg = load_config(None, [f"model.arch={arch}", "model.init=random", f"model.head={head}", f"model.dim={dim}"])
    model = build_model(cfg.model).train()
    seen, total, largest = set(), 0, 0

    def pack(t):
        nonlocal total, largest
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except RuntimeError:
            return t
        if key[0] and key not in seen:
            seen.add(key)
            total += key[1]
            largest = max(largest, key[1])
        return t

    x = torch.randn(batch, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    del out
    return total / batch, largest / batch


def param_count(arch, head, dim):
    from insclr.config import load_config
    from insclr.model import build_model

    cfg = load_config(None, [f"model.arch={arch}", "model.init=random", f"model.head={head}", f"model.dim={dim}"])
    return sum(p.numel() for p in build_model(cfg.model).parameters())


def table(n, dim, arch, head, act_224, largest_224, params, get_size=100_000, pool_k=500, world=8):
    """Rows (what, s1 bytes, s4 bytes) per GPU for GLDv2 s1 (bank v1) and s4 (bank v2 + no-aug)."""
    bf16, fp32, i32 = 2, 4, 4
    s1_rows, s4_rows = 64 // world * 4, 16 // world * 4        # this rank's images per step
    s1_global, s4_global = 64 * 4, 16 * 4                        # rows every rank's loss sees
    rows = [
        ("bank (augmented view), bf16 N x D", n * dim * bf16, n * dim * bf16),
        ("bank_noaug (no-aug view), bf16 N x D", 0, n * dim * bf16),
        ("pool columns on the device (v1: 50 potential positives; v2: all k, int32) + counters",
         n * 50 * i32 + n * i32, n * pool_k * i32 + n * i32 + 2 * n * 8),
        ("gathered bank rows of a step (get_size x D, bf16 buffer + its float32 copy for the loss)",
         get_size * dim * (bf16 + fp32), get_size * dim * (bf16 + fp32)),
        ("memory loss: similarities + gradient, float32 (global rows x get_size)",
         2 * s1_global * get_size * fp32, 2 * s4_global * get_size * fp32),
        ("model weights + gradients + Adam (2 states), float32", params * 16, params * 16),
        ("DDP gradient buckets (float32)", params * 4, params * 4),
        (f"activations saved for backward, bf16 autocast (s1: {s1_rows} x 224 px; s4: {s4_rows} x 448 px)",
         act_224 * s1_rows, act_224 * 4 * s4_rows),
        (f"no-aug forward without gradient (s4: {s4_rows} x 512 px)", 0,
         3 * largest_224 * (512 / 224) ** 2 * s4_rows),
    ]
    total = ("total", sum(r[1] for r in rows), sum(r[2] for r in rows))
    return rows + [total]


def main(argv=None):
    from insclr.args import Parser, output_file, positive_int

    p = Parser(prog="python -m insclr.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, default=1_200_000, help="training images (bank rows)")
    p.add_argument("--dim", type=positive_int, default=2048)
    p.add_argument("--arch", default="resnet101")
    p.add_argument("--head", default="norm_linear_norm")
    p.add_argument("--json", metavar="PATH", type=output_file)
    args = p.parse_args(argv)
    from insclr.io import print_table, write_json

    act, largest = saved_activation_bytes(args.arch, args.head, args.dim)
    params = param_count(args.arch, args.head, args.dim)
    rows = table(args.n, args.dim, args.arch, args.head, act, largest, params)
    print_table([{"per GPU (8 ranks)": w, "s1_GB": a / GB, "s4_GB": b / GB} for w, a, b in rows],
                ["per GPU (8 ranks)", "s1_GB", "s4_GB"],
                title=f"GLDv2 at N={args.n}, D={args.dim}, {args.arch} ({params / 1e6:.1f}M parameters); "
                      f"activations measured: {act / 2**20:.1f} MiB per 224 px image")
    if args.json:
        write_json(args.json, {"n": args.n, "dim": args.dim, "arch": args.arch, "params": params,
                               "activation_bytes_per_image_224": act, "largest_saved_bytes_per_image_224": largest,
                               "rows": [{"what": w, "s1_bytes": a, "s4_bytes": b} for w, a, b in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
