"""Where and how computation runs: device choice, precision (autocast), peak FLOP/s for MFU, the optimizer.

Shared by train, eval and the benchmarks, so evaluation never imports the training loop.
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from shortcut.config import Device, Precision, TrainConfig, UserError

# Dense BF16 tensor-core peak FLOP/s (no sparsity) by device model, from the vendors' data sheets, most specific
# first: an H100 PCIe must not get the SXM figure. CPUs have no agreed peak: MFU is left out there.
PEAK_FLOPS = [
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"H100", 989e12),  # "H100 80GB HBM3" is the SXM part
    (r"GH200", 989e12), (r"H200.*NVL", 835e12), (r"H200", 989e12), (r"A100", 312e12), (r"L40S", 362e12),
    (r"\bL40\b", 181e12),
    (r"A10G", 70e12), (r"\bA10\b", 125e12), (r"RTX 4090", 165e12), (r"RTX 3090", 71e12), (r"L4\b", 121e12),
]


def pick_device(choice: Device, local_rank: int = 0) -> torch.device:
    if choice == Device.cuda or (choice == Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def effective_precision(precision: Precision, device: torch.device) -> str:
    """What `auto` means on this device: bfloat16 autocast on CUDA, float32 elsewhere."""
    if precision == Precision.auto:
        return "bfloat16" if device.type == "cuda" else "float32"
    return str(precision)


def autocast(device: torch.device, precision: Precision):
    if effective_precision(precision, device) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def peak_from_table(name: str) -> float | None:
    return next((v for pattern, v in PEAK_FLOPS if re.search(pattern, name)), None)


def peak_flops(device: torch.device) -> tuple[float | None, str | None]:
    """Peak dense BF16 FLOP/s of a CUDA device and where the figure comes from (the table, or a measured matmul
    probe for a device the table does not know); (None, None) on a CPU."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    peak = peak_from_table(name)
    if peak is not None:
        return peak, f"table: {name}"
    return matmul_probe(device), f"measured: bf16 matmul probe on {name}"


def matmul_probe(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Achieved FLOP/s of large bf16 matmuls: a lower bound of the peak, for MFU on unknown devices."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3)


def allow_fast_math(device: torch.device) -> None:
    """TF32 for the float32 matmuls that remain under bf16 autocast (CUDA only; CPUs are unaffected)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's p.dim() >= 2 rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


# --- data parallelism (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) ---

@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run; the default is a run of one process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over processes (gloo has no AVG: sum, then divide)."""
        if self.world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def gather(self, obj):
        """Every process's obj, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_choice: Device) -> Dist:
    """Join the process group torchrun set up: NCCL on GPUs, gloo on CPUs. One process: nothing to join."""
    if not launched_by_torchrun():
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_choice != Device.cpu
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def close_distributed(d: Dist) -> None:
    if d.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
