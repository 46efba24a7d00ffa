"""Distributed helpers. The single-process run is the same code with a world size of one.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` reads them, picks nccl on CUDA and
gloo on the CPU, and returns the device this rank should use.
"""

import os

import torch
import torch.distributed as dist


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main():
    return rank() == 0


def resolve_device(device="auto"):
    """'auto' -> this rank's CUDA device when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU")
        return torch.device("cuda", local_rank())
    return torch.device(device)


def init(device="auto"):
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); return the device."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def shutdown():
    if is_initialized():
        dist.destroy_process_group()


def barrier():
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def all_gather(x):
    """Concatenate `x` from every rank along dim 0 (rank order). No gradient flows through it.

    All ranks must pass tensors of the same shape.
    """
    if not is_initialized() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_with_grad(x):
    """Concatenate `x` from every rank along dim 0, keeping the autograd graph of the local slice.

    The other ranks' slices are constants here; since every rank computes the same global loss
    and DDP averages gradients, each slice still receives its full gradient.
    """
    if not is_initialized() or world_size() == 1:
        return x
    parts = list(all_gather(x.detach()).chunk(world_size()))
    parts[rank()] = x
    return torch.cat(parts)



@torch.no_grad()
def all_gather_uneven(x):
    """Concatenate `x` [n_r, ...] from every rank (rank order) when n_r differs between ranks.

    Each rank's rows are padded to the largest n_r for one all_gather, then cut back. No gradient.
    """
    if not is_initialized() or world_size() == 1:
        return x
    sizes = all_gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = all_gather(padded).chunk(len(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def any_rank_flags(flags):
    """Per entry, whether `flags` (bool [F] on the device) is true on any rank: bool [F] on the
    device after one all-reduce, with no host read (the caller reads it where it needs the answer)."""
    t = flags.detach().to(torch.float32, copy=True)  # a copy: the all-reduce writes in place
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t > 0


def any_rank(flag, device):
    """True on every rank when `flag` is true on any rank (one all-reduce of a device scalar).

    `flag`: a bool, or a bool tensor on the device (reduced there: the only host read is the result)."""
    if torch.is_tensor(flag):
        t = flag.detach().to(device=device).reshape(1)
    else:
        t = torch.tensor([bool(flag)], device=device)
    return bool(any_rank_flags(t).item())
