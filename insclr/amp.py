"""The one AMP path (STYLE 5): a setting (auto | bf16 | fp16 | none) -> an autocast dtype -> a context.

Training and feature extraction differ only in what `auto` means on CUDA: training computes in
bfloat16 (no loss scaling needed), extraction in float16 (the features are stored as float16
anyway). On the CPU `auto` is float32, on every CPU, so that a CPU run (the demo, the tests) gives
the same numbers on any machine. bf16 is a choice there: a CPU that computes bfloat16 natively (AMX
or AVX512-BF16, `cpu_has_native_bf16`) trains a ResNet-18 about 2x faster with `train.amp=bf16`;
on other CPUs bfloat16 is emulated and slower than float32.
"""

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def amp_dtype(amp, device, cuda_auto="bf16", key="train.amp"):
    """`amp` -> torch dtype for autocast, or None for float32. `key` names the setting in errors."""
    if amp == "auto":
        amp = cuda_auto if torch.device(device).type == "cuda" else "none"
    if amp not in DTYPES:
        raise ValueError(f"{key}={amp!r}: expected auto, bf16, fp16 or none")
    return DTYPES[amp]


def cpu_has_native_bf16():
    """True when this CPU has bfloat16 matrix instructions (AMX tiles or AVX512-BF16), which oneDNN
    uses for bf16 convolutions and matrix products."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast(device, dtype):
    """torch.autocast on `device` in `dtype`, or a no-op for dtype None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
