"""Training throughput of baseline and shortcut models: tokens/s and analytic FLOP/s per step, CPU or CUDA.

Prints two tables. The first: tokens/s at the demo's size (4 layers, d=128, T=256, batch 16), and a larger one on
CUDA. The second: the shortcut's step time over the baseline's next to its analytic FLOPs over the baseline's, at
6 layers, d=256, T=256, batch 16 (all 6 taps), for each attention implementation this device runs. The target is
time ratio <= 1.05 x FLOP ratio: the shortcut's extra attention should cost what its FLOPs say, no more.
With NANOGPT=<a checkout of karpathy/nanoGPT> a third table times its GPT against our baseline at the same shape
and optimizer (target: ours >= nanoGPT's throughput); nothing of nanoGPT is copied or shipped.
"""

import importlib.util
import os
import statistics
import sys
import time

import torch

from shortcut.attention import runnable_impls
from shortcut.config import Device, ModelConfig, Precision, TrainConfig
from shortcut.model import GPT, flops_per_token
from shortcut.runtime import autocast, make_optimizer, peak_flops, pick_device

WARMUP, STEPS = 3, 10


def make_step(cfg: ModelConfig, batch: int, device: torch.device, model: torch.nn.Module | None = None):
    """One optimizer step of a fresh model on a fixed batch, as a closure that returns when the step is done."""
    torch.manual_seed(0)
    model = (model or GPT(cfg)).to(device)
    opt = make_optimizer(model, TrainConfig(), device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    ctx = autocast(device, Precision.auto)

    def step() -> None:
        with ctx:
            loss = model(x, x)[1]  # both ours and nanoGPT's return the loss second
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def bench(cfg: ModelConfig, batch: int, device: torch.device, steps: int = STEPS) -> tuple[float, float]:
    step = make_step(cfg, batch, device)
    for _ in range(WARMUP):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * cfg.block_size
    return tokens / dt, tokens * flops_per_token(cfg)["train"] / dt


def step_times(cfgs: dict[str, ModelConfig], batch: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each model, measured in interleaved rounds (one step of each per round), so that a
    machine whose load drifts (a shared CPU) slows every model alike and per-round ratios stay comparable."""
    return interleaved({name: make_step(cfg, batch, device) for name, cfg in cfgs.items()})


def interleaved(steps: dict) -> dict[str, list[float]]:
    """Seconds per call of each step function, in interleaved rounds after WARMUP rounds."""
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(STEPS):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def throughput(device: torch.device) -> None:
    sizes = [dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch=16)]
    if device.type == "cuda":
        sizes.append(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=32))
    peak, _ = peak_flops(device)  # (None, None) on a CPU
    print(f"{'arch':9s} {'L':>3s} {'d':>5s} {'T':>5s} {'B':>3s} {'tokens/s':>11s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for s in sizes:
        batch = s.pop("batch")
        for arch in ("baseline", "shortcut"):
            cfg = ModelConfig(arch=arch, vocab_size=512, **s)
            tok_s, flop_s = bench(cfg, batch, device)
            mfu = f"{flop_s / peak:.1%}" if peak else "-"
            print(f"{arch:9s} {cfg.n_layer:3d} {cfg.n_embd:5d} {cfg.block_size:5d} {batch:3d} {tok_s:11,.0f} "
                  f"{flop_s / 1e12:8.3f} {mfu:>6s}")


def cost_ratios(device: torch.device) -> None:
    sizes = [dict(n_layer=6, n_head=4, n_embd=256, block_size=256, batch=16)]
    if device.type == "cuda":
        sizes.append(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=16))
    print(f"\nshortcut / baseline per training step ({WARMUP} warmup, {STEPS} timed steps each, interleaved);"
          " target: time ratio <= 1.05 x FLOP ratio")
    print(f"{'L':>3s} {'d':>5s} {'T':>5s} {'B':>3s} {'attn_impl':9s} {'ms/step':>8s} {'time ratio':>10s} "
          f"{'(of mins)':>9s} {'FLOP ratio':>10s} {'time/FLOP':>9s}")
    for s in sizes:
        batch = s.pop("batch")
        base = ModelConfig(arch="baseline", vocab_size=512, **s)
        cfgs = {"baseline": base} | {impl: ModelConfig(arch="shortcut", vocab_size=512, attn_impl=impl, **s)
                                     for impl in runnable_impls(device.type)}
        times = step_times(cfgs, batch, device)
        tb, fb = times["baseline"], flops_per_token(base)["train"]
        for name, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(ts, tb))  # per round: the same machine load
            flop_ratio = flops_per_token(cfgs[name])["train"] / fb
            print(f"{base.n_layer:3d} {base.n_embd:5d} {base.block_size:5d} {batch:3d} {name:9s} "
                  f"{statistics.median(ts) * 1e3:8.1f} {ratio:10.3f} {min(ts) / min(tb):9.3f} {flop_ratio:10.3f} "
                  f"{ratio / flop_ratio:9.3f}")


def against_nanogpt(device: torch.device, checkout: str) -> None:
    """Our baseline against nanoGPT's GPT (imported from a local checkout) at one shape, interleaved."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(checkout, "model.py"))
    nano = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = nano
    spec.loader.exec_module(nano)
    shape = dict(n_layer=6, n_head=4, n_embd=256, block_size=256)
    ours = ModelConfig(arch="baseline", vocab_size=512, **shape)
    theirs = nano.GPT(nano.GPTConfig(vocab_size=512, dropout=0.0, bias=True, **shape))
    times = interleaved({"shortcut baseline": make_step(ours, 16, device),
                         "nanoGPT": make_step(ours, 16, device, theirs)})
    ratio = statistics.median(b / a for a, b in zip(times["shortcut baseline"], times["nanoGPT"]))
    print(f"\nthroughput at L=6 d=256 T=256 batch 16: ours / nanoGPT's = {ratio:.3f} (median per round; "
          f"target >= 1.0); ms/step ours {statistics.median(times['shortcut baseline']) * 1e3:.1f}, "
          f"nanoGPT {statistics.median(times['nanoGPT']) * 1e3:.1f}")


def main() -> None:
    device = pick_device(Device.auto)
    print(f"device {device}, threads {torch.get_num_threads()}")
    throughput(device)
    cost_ratios(device)
    if os.environ.get("NANOGPT"):
        against_nanogpt(device, os.environ["NANOGPT"])
    else:
        print("\n(set NANOGPT=<a karpathy/nanoGPT checkout> to time its GPT against our baseline)")


if __name__ == "__main__":
    main()
