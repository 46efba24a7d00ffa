"""Adam with weight decay as L2 in the parameter groups, and the multi-step LR schedule (ALGORITHM §9)."""

import torch


def param_groups(model, weight_decay):
    """Two groups: weights with `weight_decay`, and biases + normalisation parameters with 0.

    Decay applies to conv and linear weights only: the 1-D parameters (biases, BatchNorm scale
    and shift) get none, as in the recipe, since shrinking them only shifts activations.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, cfg_train, device, fused=None):
    """torch.optim.Adam (its weight_decay is L2 added to the gradient, not decoupled).

    fused=None: the fused kernel on CUDA, torch's default elsewhere.
    """
    if fused is None:
        fused = device.type == "cuda"
    return torch.optim.Adam(param_groups(model, cfg_train.weight_decay), lr=cfg_train.lr, fused=fused or None)


def build_scheduler(optimizer, cfg_train):
    """MultiStepLR: lr × gamma at each milestone step; stepped once per training step."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg_train.milestones),
                                                gamma=cfg_train.gamma)
