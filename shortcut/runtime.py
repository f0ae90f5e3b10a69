"""Where and how computation runs: device choice, precision (autocast), peak FLOP/s for MFU, the optimizer.

Shared by train, eval and the benchmarks, so evaluation never imports the training loop.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from shortcut.config import Device, Precision, TrainConfig, UserError

# Dense bf16 peak FLOP/s by device name, for MFU. CPUs have no agreed peak: MFU is left out there.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def pick_device(choice: Device) -> torch.device:
    if choice == Device.cuda or (choice == Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, precision: Precision):
    if precision == Precision.bfloat16 or (precision == Precision.auto and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's p.dim() >= 2 rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
