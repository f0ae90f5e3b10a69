"""Training throughput of baseline and shortcut models: tokens/s and analytic FLOP/s per step, CPU or CUDA, and
the issue-10 targets in one closing table, each a ratio measured in this run.

Tables: tokens/s (and MFU on CUDA) at the demo's size (4 layers, d=128, T=256, batch 16) and, on CUDA, at GPT-2
small (12 layers, d=768, T=1024, batch 32, bf16 + torch.compile); the shortcut's step time over the baseline's
next to its analytic FLOPs over the baseline's, at 6 layers, d=256, T=256, batch 16 (all 6 taps; on CUDA also
GPT-2 small), for each attention implementation this device runs; with NANOGPT=<a checkout of karpathy/nanoGPT>,
its GPT timed against our baseline at the same shape and optimizer (nothing of nanoGPT is copied or shipped).
Also (issue 21) routed against dense step time at 12 layers, c = 0.125 on every other block: target >= 25% less.
Targets: time ratio <= 1.05 x FLOP ratio (the shortcut's extra attention costs what its FLOPs say, no more) with
`auto`'s choice; ours >= nanoGPT's throughput; baseline MFU >= 45% at GPT-2 small on an H100/H200-class GPU.
"""

import importlib.util
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from shortcut.attention import resolve_attn_impl, runnable_impls
from shortcut.config import AttnImpl, Device, ModelConfig, Precision, TrainConfig
from shortcut.costs import flops_per_token
from shortcut.model import GPT
from shortcut.runtime import autocast, make_optimizer, peak_flops, pick_device

WARMUP, STEPS = 3, 10


def make_step(cfg: ModelConfig, batch: int, device: torch.device, model: torch.nn.Module | None = None,
              compile_: bool = False):
    """One optimizer step of a fresh model on a fixed batch, as a closure that returns when the step is done."""
    torch.manual_seed(0)
    model = (model or GPT(cfg)).to(device)
    opt = make_optimizer(model, TrainConfig(), device)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    ctx = autocast(device, Precision.auto)

    def step() -> None:
        with ctx:
            loss = fwd(x, x)[1]  # both ours and nanoGPT's return the loss second
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def bench(cfg: ModelConfig, batch: int, device: torch.device, steps: int = STEPS,
          compile_: bool = False) -> tuple[float, float]:
    step = make_step(cfg, batch, device, compile_=compile_)
    for _ in range(WARMUP):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * cfg.block_size
    return tokens / dt, tokens * flops_per_token(cfg).train / dt


def step_times(cfgs: dict[str, ModelConfig], batch: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each model, measured in interleaved rounds (one step of each per round), so that a
    machine whose load drifts (a shared CPU) slows every model alike and per-round ratios stay comparable."""
    return interleaved({name: make_step(cfg, batch, device) for name, cfg in cfgs.items()})


def interleaved(steps: dict, rounds: int = STEPS) -> dict[str, list[float]]:
    """Seconds per call of each step function, in interleaved rounds after WARMUP rounds."""
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def throughput(device: torch.device) -> dict:
    """tokens/s and MFU per size and architecture; returns the baseline's MFU at GPT-2 small (CUDA), or {}."""
    sizes = [dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch=16)]
    if device.type == "cuda":
        sizes.append(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=32, compile=True))
    peak, source = peak_flops(device)  # (None, None) on a CPU
    print(f"peak: {source or 'none on a CPU (no MFU)'}")
    print(f"{'arch':9s} {'L':>3s} {'d':>5s} {'T':>5s} {'B':>3s} {'compile':>7s} {'tokens/s':>11s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s}")
    result = {}
    for s in sizes:
        batch, compile_ = s.pop("batch"), s.pop("compile", False)
        for arch in ("baseline", "shortcut"):
            cfg = ModelConfig(arch=arch, vocab_size=50304 if compile_ else 512, **s)
            tok_s, flop_s = bench(cfg, batch, device, compile_=compile_)
            mfu = f"{flop_s / peak:.1%}" if peak else "-"
            if peak and arch == "baseline" and cfg.n_layer == 12:
                result["mfu"] = flop_s / peak
            print(f"{arch:9s} {cfg.n_layer:3d} {cfg.n_embd:5d} {cfg.block_size:5d} {batch:3d} {str(compile_):>7s} "
                  f"{tok_s:11,.0f} {flop_s / 1e12:8.3f} {mfu:>6s}")
    return result


def cost_ratios(device: torch.device) -> dict[str, float]:
    """Time ratio over FLOP ratio per shape and attention implementation; returns `auto`'s per shape."""
    sizes = [dict(n_layer=6, n_head=4, n_embd=256, block_size=256, batch=16)]
    if device.type == "cuda":
        sizes.append(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=16))
    print(f"\nshortcut / baseline per training step ({WARMUP} warmup, {STEPS} timed steps each, interleaved);"
          " target: time ratio <= 1.05 x FLOP ratio")
    print(f"{'L':>3s} {'d':>5s} {'T':>5s} {'B':>3s} {'attn_impl':9s} {'ms/step':>8s} {'time ratio':>10s} "
          f"{'(of mins)':>9s} {'FLOP ratio':>10s} {'time/FLOP':>9s}")
    auto = resolve_attn_impl(AttnImpl.auto, device.type)
    result = {}
    for s in sizes:
        batch = s.pop("batch")
        base = ModelConfig(arch="baseline", vocab_size=512, **s)
        cfgs = {"baseline": base} | {impl: ModelConfig(arch="shortcut", vocab_size=512, attn_impl=impl, **s)
                                     for impl in runnable_impls(device.type)}
        times = step_times(cfgs, batch, device)
        tb, fb = times["baseline"], flops_per_token(base).train
        for name, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(ts, tb))  # per round: the same machine load
            flop_ratio = flops_per_token(cfgs[name]).train / fb
            print(f"{base.n_layer:3d} {base.n_embd:5d} {base.block_size:5d} {batch:3d} {name:9s} "
                  f"{statistics.median(ts) * 1e3:8.1f} {ratio:10.3f} {min(ts) / min(tb):9.3f} {flop_ratio:10.3f} "
                  f"{ratio / flop_ratio:9.3f}")
            if name == auto:
                result[f"L={base.n_layer} d={base.n_embd} T={base.block_size}"] = ratio / flop_ratio
    return result


def routing_saving(device: torch.device) -> dict[str, float]:
    """Issue 21: step time of Mixture-of-Depths models (mod_capacity=0.125 on every other block) against the dense
    ones of the same size, interleaved, at 12 layers, d=64, T=128, batch 16 (the size of make adaptive-cpu): the
    saving 1 - routed/dense per architecture, beside the FLOP saving."""
    base = ModelConfig(n_layer=12, n_head=4, n_embd=64, block_size=128, vocab_size=512)
    sparse = dict(arch="shortcut", taps=[0, 6, 11], shortcut_layers=2)
    cfgs = {"baseline": base, "baseline routed": replace(base, mod_capacity=0.125),
            "shortcut [0,6,11]x2": replace(base, **sparse),
            "shortcut [0,6,11]x2 routed": replace(base, **sparse, mod_capacity=0.125)}
    times = step_times(cfgs, 16, device)
    print("\nrouted / dense training step, L=12 d=64 T=128 B=16, c=0.125 every other block (blocks 1,3,5,7,9)")
    result = {}
    for dense, routed in (("baseline", "baseline routed"), ("shortcut [0,6,11]x2", "shortcut [0,6,11]x2 routed")):
        ratio = statistics.median(r / d for r, d in zip(times[routed], times[dense]))
        flops = flops_per_token(cfgs[routed]).train / flops_per_token(cfgs[dense]).train
        print(f"{dense:22s} dense {statistics.median(times[dense]) * 1e3:6.1f} ms, routed "
              f"{statistics.median(times[routed]) * 1e3:6.1f} ms: {1 - ratio:.1%} less time ({1 - flops:.1%} fewer FLOPs)")
        result[dense] = 1 - ratio
    return result


def against_nanogpt(device: torch.device, checkout: str) -> tuple[float, float, float]:
    """Our baseline against nanoGPT's GPT (imported from a local checkout) at one shape, interleaved; returns
    our throughput over theirs: the median over rounds and the quartiles (the spread a shared machine gives)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(checkout, "model.py"))
    nano = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = nano
    spec.loader.exec_module(nano)
    shape = dict(n_layer=6, n_head=4, n_embd=256, block_size=256)
    ours = ModelConfig(arch="baseline", vocab_size=512, **shape)
    theirs = nano.GPT(nano.GPTConfig(vocab_size=512, dropout=0.0, bias=True, **shape))
    times = interleaved({"shortcut baseline": make_step(ours, 16, device),
                         "nanoGPT": make_step(ours, 16, device, theirs)}, rounds=2 * STEPS)
    per_round = [b / a for a, b in zip(times["shortcut baseline"], times["nanoGPT"])]
    lo, ratio, hi = statistics.quantiles(per_round, n=4)
    print(f"\nthroughput at L=6 d=256 T=256 batch 16: ours / nanoGPT's = {ratio:.3f} (median of {len(per_round)} "
          f"rounds, quartiles {lo:.3f}-{hi:.3f}; target >= 1.0); ms/step ours "
          f"{statistics.median(times['shortcut baseline']) * 1e3:.1f}, "
          f"nanoGPT {statistics.median(times['nanoGPT']) * 1e3:.1f}")
    return ratio, lo, hi


def main() -> None:
    device = pick_device(Device.auto)
    print(f"device {device}, threads {torch.get_num_threads()}")
    mfu = throughput(device).get("mfu")
    ratios = cost_ratios(device)
    nano = against_nanogpt(device, os.environ["NANOGPT"]) if os.environ.get("NANOGPT") else None
    routing = routing_saving(device)
    auto = resolve_attn_impl(AttnImpl.auto, device.type)
    rows = [(f"shortcut time / FLOP ratio, {shape}, attn_impl=auto ({auto})", f"{r:.3f}", "<= 1.05",
             "yes" if r <= 1.05 else "NO") for shape, r in ratios.items()]
    # met: yes when even the lower quartile of the per-round ratios is >= 1, NO when even the upper one is < 1, else
    # a tie within what this machine can resolve
    rows.append(("baseline throughput / nanoGPT's, L=6 d=256 T=256",
                 f"{nano[0]:.3f}" if nano else "not run (set NANOGPT=<a karpathy/nanoGPT checkout>)", ">= 1.0",
                 "-" if nano is None else "yes" if nano[1] >= 1.0 else "NO" if nano[2] < 1.0 else "tie"))
    rows.append(("baseline MFU, GPT-2 small, bf16 + compile", f"{mfu:.1%}" if mfu else f"no MFU on {device.type}",
                 ">= 45% (H100/H200 class)", "-" if mfu is None else "yes" if mfu >= 0.45 else "NO"))
    rows += [(f"routed step time saving, {arch}, L=12 d=64 c=0.125", f"{v:.1%}", ">= 25%", "yes" if v >= 0.25 else "NO")
             for arch, v in routing.items()]
    print(f"\n{'target (this run)':62s} {'measured':>12s} {'goal':>24s}  met")
    for name, value, goal, met in rows:
        print(f"{name:62s} {value:>12s} {goal:>24s}  {met}")


if __name__ == "__main__":
    main()
