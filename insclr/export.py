"""Export the whole descriptor as one graph: `python -m insclr.export --model M --format F --out P`.

The exported graph takes uint8 RGB images [B, 3, H, W] of any size (dynamic batch, height and
width) and returns float32 [B, D]: ImageNet normalisation, the model at every scale (bilinear
rescale), the average, L2 normalisation, and the whitening when --whiten is given (projection
then L2 normalisation again). The caller brings the image to the size it wants (evaluation uses
longer side 1024). The command checks the exported file against the PyTorch model on sample
images and prints the largest difference; above --tolerance it fails. P.json beside it says
what the graph takes and gives (docs/search_export.md).
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from insclr.io import atomic_path, print_error, write_json
from insclr.model import l2n

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (height, width) of the check images: non-square, odd sizes, none of them the traced one
CHECK_SIZES = ((96, 128), (113, 77), (160, 160))
TRACE_SIZE = (64, 80)


class Descriptor(nn.Module):
    """uint8 [B, 3, H, W] RGB -> float32 [B, D]: the retrieval descriptor of `model` at `scales`
    (ALGORITHM §2), whitened by `whitening` (insclr.whiten.Whitening) when given."""

    def __init__(self, model, scales, whitening=None):
        super().__init__()
        self.model = model
        self.scales = tuple(float(s) for s in scales)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.whiten = whitening is not None
        self.renormalize = self.whiten and whitening.renormalize
        if self.whiten:
            self.register_buffer("white_mean", torch.as_tensor(whitening.mean, dtype=torch.float32))
            self.register_buffer("white_proj", torch.as_tensor(whitening.projection, dtype=torch.float32))

    def forward(self, images):
        x = (images.float() / 255 - self.pixel_mean) / self.pixel_std
        total = None
        for s in self.scales:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            out = self.model(xs)
            total = out if total is None else total + out
        f = l2n(total / len(self.scales))
        if self.whiten:
            f = (f - self.white_mean) @ self.white_proj.T
            f = F.normalize(f, dim=-1) if self.renormalize else f  # as insclr.whiten.apply_whitening
        return f


def sample_images(seed=0):
    """uint8 [1, 3, H, W] images at CHECK_SIZES: smooth gradients plus noise (natural-ish
    statistics, so the activations are not all clamped by GeM's eps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in CHECK_SIZES:
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([xx, yy, (xx + yy) / 2]) * 200
        noise = torch.rand(3, h, w, generator=g) * 55
        out.append((base + noise).round().clamp(0, 255).to(torch.uint8)[None])
    return out


def export_torchscript(descriptor, path):
    example = torch.zeros(1, 3, *TRACE_SIZE, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, and asked for
        traced = torch.jit.trace(descriptor, example, check_trace=False)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, tmp)


def export_onnx(descriptor, path, opset=17):
    example = torch.zeros(1, 3, *TRACE_SIZE, dtype=torch.uint8)
    # the TorchScript-based exporter: the torch.export-based one needs onnxscript, and this graph
    # (convolutions, resize, reductions) is what the older exporter handles well
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(descriptor, (example,), tmp, input_names=["images"], output_names=["descriptors"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "descriptors": {0: "batch"}},
                          opset_version=opset, dynamo=False)


def run_exported(fmt, path, images):
    """Run the exported file on each uint8 [1, 3, H, W] image -> list of float32 numpy [1, D]."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return [module(x).numpy() for x in images]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, {"images": x.numpy()})[0] for x in images]


def largest_difference(descriptor, fmt, path, images):
    """max |exported - PyTorch| over the descriptors of `images` (PyTorch in float32 on the CPU)."""
    with torch.no_grad():
        expected = [descriptor(x).numpy() for x in images]
    got = run_exported(fmt, path, images)
    return max(float(np.abs(a - b).max()) for a, b in zip(got, expected))


def export(model, scales, fmt, path, whitening=None):
    """Export the descriptor of `model` (float32, CPU, eval) to `path`; -> (descriptor module,
    largest difference on the sample images)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    descriptor = Descriptor(model.float().cpu().eval(), scales, whitening).eval()
    (export_torchscript if fmt == "torchscript" else export_onnx)(descriptor, path)
    return descriptor, largest_difference(descriptor, fmt, path, sample_images())


def _parser():
    from insclr.args import Parser, output_file, positive_float, positive_int
    from insclr.features import DEFAULT_SCALES
    from insclr.model import ARCHS, HEADS

    p = Parser(prog="python -m insclr.export", description="Export the whole descriptor as TorchScript or ONNX.")
    p.add_argument("--model", required=True, help="imagenet | random | PATH of a model file / checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=output_file, help="file to write (.pt / .onnx); P.json beside it")
    p.add_argument("--whiten", default=None, metavar="W", help="whitening W.npz to include (python -m insclr.whiten)")
    p.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)), help="comma-separated scales")
    p.add_argument("--tolerance", type=positive_float, default=TOLERANCE,
                   help=f"largest difference to PyTorch accepted (default {TOLERANCE})")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS), help="imagenet/random only")
    p.add_argument("--head", default=None, choices=HEADS, help="imagenet/random only")
    p.add_argument("--dim", type=positive_int, default=None, help="imagenet/random only")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    from insclr.features import parse_scales
    from insclr.model import load_model

    try:
        scales = parse_scales(args.scales)
        whitening = None
        model = load_model(args.model, args.arch, args.head, args.dim, device="cpu")
        if args.whiten:
            from insclr.whiten import load_whitening

            whitening = load_whitening(args.whiten)
            if whitening.mean.shape[0] != model.out_dim:
                raise ValueError(f"{args.whiten}: whitening of {whitening.mean.shape[0]}-d descriptors, "
                                 f"the model gives {model.out_dim}-d")
        descriptor, diff = export(model, scales, args.format, args.out, whitening)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2
    dim = int(descriptor(sample_images()[0]).shape[1])
    sizes = ", ".join(f"{h}x{w}" for h, w in CHECK_SIZES)
    write_json(Path(args.out).with_name(Path(args.out).name + ".json"), {
        "format": args.format, "model": args.model, "arch": model.arch, "head": model.head.kind,
        "scales": list(scales), "whiten": args.whiten, "input": "uint8 [B, 3, H, W] RGB, any H and W",
        "output": f"float32 [B, {dim}] L2-normalised", "check_sizes": [list(s) for s in CHECK_SIZES],
        "max_difference": diff, "tolerance": args.tolerance})
    print(f"export: {args.format} -> {args.out} ({dim}-d); largest difference to PyTorch on "
          f"{len(CHECK_SIZES)} sample images ({sizes}): {diff:.3g} (tolerance {args.tolerance:g})")
    if not diff <= args.tolerance:
        print(f"error: {args.out}: the exported model differs from PyTorch by {diff:.3g} > {args.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
