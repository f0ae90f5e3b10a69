"""Training throughput of baseline and shortcut models: tokens/s and analytic FLOP/s per step, CPU or CUDA.

Prints a table; sizes are those of the demo (4 layers, d=128, T=256, batch 16) and a larger one on CUDA.
"""

import time

import torch

from shortcut.config import Device, ModelConfig, Precision, TrainConfig
from shortcut.model import GPT, flops_per_token
from shortcut.runtime import autocast, make_optimizer, peak_flops, pick_device


def bench(cfg: ModelConfig, batch: int, device: torch.device, steps: int = 10) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, TrainConfig(), device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    ctx = autocast(device, Precision.auto)
    for i in range(steps + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with ctx:
            loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * cfg.block_size
    return tokens / dt, tokens * flops_per_token(cfg)["train"] / dt


def main() -> None:
    device = pick_device(Device.auto)
    sizes = [dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch=16)]
    if device.type == "cuda":
        sizes.append(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=32))
    peak = peak_flops(device)
    print(f"device {device}, threads {torch.get_num_threads()}")
    print(f"{'arch':9s} {'L':>3s} {'d':>5s} {'T':>5s} {'B':>3s} {'tokens/s':>11s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for s in sizes:
        batch = s.pop("batch")
        for arch in ("baseline", "shortcut"):
            cfg = ModelConfig(arch=arch, vocab_size=512, **s)
            tok_s, flop_s = bench(cfg, batch, device)
            mfu = f"{flop_s / peak:.1%}" if peak else "-"
            print(f"{arch:9s} {cfg.n_layer:3d} {cfg.n_embd:5d} {cfg.block_size:5d} {batch:3d} {tok_s:11,.0f} "
                  f"{flop_s / 1e12:8.3f} {mfu:>6s}")


if __name__ == "__main__":
    main()
