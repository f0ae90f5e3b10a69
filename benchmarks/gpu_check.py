"""`make gpu-check`: the GPU path, end to end, on whatever CUDA device is present (under 8 minutes on one H200).

Trains the baseline and the shortcut at GPT-2-small shape (12 layers, d=768, T=1024, 50,304 tokens) on synthetic
tokens through the real training loop (bf16 autocast + torch.compile), and checks:
  1. the fused attention kernels run (FlashAttention in the baseline, the shortcut's `auto` attention), by the
     CUDA kernels a profiled step launches inside each attention (the shortcut's named range, not its other blocks);
  2. bf16 losses track a float32 run of the same seed;
  3. resume is exact to bf16 tolerance (a run stopped half-way and resumed ends where an uninterrupted one does);
and prints tokens/s, MFU and the shortcut/baseline step-time ratio next to their FLOP ratio.

    python benchmarks/gpu_check.py            # on a GPU
    python benchmarks/gpu_check.py --smoke    # the same plumbing, tiny, on a CPU (a test runs this)
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shortcut import corpus
from shortcut.attention import resolve_attn_impl
from shortcut.cli import compose
from shortcut.config import AttnImpl
from shortcut.rundir import Checkpoint
from shortcut.train import train

FULL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab=50304, batch=16, steps=300, check_steps=60)
SMOKE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab=300, batch=4, steps=20, check_steps=10)


def synthetic_corpus(root: Path, vocab: int, n_tokens: int) -> list[str]:
    """Phrases drawn from a fixed bank: predictable inside a phrase, so a loss that falls means learning."""
    rng = np.random.default_rng(0)
    bank = rng.integers(0, vocab, size=(4096, 16))
    splits = {s: bank[rng.integers(0, len(bank), size=n // 16)].reshape(-1)
              for s, n in (("train", n_tokens), ("val", n_tokens // 20), ("test", n_tokens // 20))}
    overrides = [f"data.root={root}", "domain=text", "domain.source=files", "domain.tokenizer=byte"]
    domain = compose("train", overrides).domain
    corpus.write_corpus(corpus.corpus_dir(root, domain), splits,
                        {"domain": "text", "source": "files", "tokenizer": "byte", "vocab_size": vocab,
                         "settings": corpus.settings_of(domain), "input_hash": "synthetic"})
    return overrides


def job(base: list[str], s: dict, arch: str, steps: int, *extra: str):
    return compose("train", base + [
        f"model={arch}", f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}", f"model.n_embd={s['n_embd']}",
        f"model.block_size={s['block_size']}", f"train.batch_size={s['batch']}", f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}", "train.lr=6e-4", "train.min_lr=6e-5",
        f"train.log_every={max(1, steps // 10)}", f"train.eval_every={steps}", "train.eval_windows=16",
        f"train.ckpt_every={max(1, steps // 2)}", "wandb=off", *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def speed(base, s, out: Path, compile_: bool) -> dict:
    """Train both models; tokens/s and MFU from the log rows after the first (compilation and warm-up)."""
    result = {}
    for arch in ("baseline", "shortcut"):
        t0 = time.perf_counter()
        summary = train(job(base, s, arch, s["steps"], f"train.compile={str(compile_).lower()}"), out / arch)
        rows = metrics(out / arch)[1:]
        tok_s = float(np.median([r["tokens_per_s"] for r in rows]))
        mfu = [r["mfu"] for r in rows if r.get("mfu")]
        result[arch] = {"tokens_per_s": tok_s, "mfu": float(np.median(mfu)) if mfu else None,
                        "step_s": summary.tokens_per_step / tok_s, "flops_per_token": summary.train_flops_per_token,
                        "final_val": summary.final_val_loss, "first_loss": metrics(out / arch)[0]["train_loss"],
                        "wall_s": time.perf_counter() - t0, "peak": summary.peak_flops,
                        "peak_source": summary.peak_flops_source}
    return result


# Where each model's attention runs: the baseline's SDPA op, the shortcut's named range (shortcut/model.py).
ATTENTION_RANGES = {"baseline": "aten::scaled_dot_product_attention", "shortcut": "depth_context_attention."}


def fused_kernels(s, out: Path, device: str) -> dict[str, tuple[list[str], list[str]]]:
    """What ran inside each trained model's attention in one bf16 training forward: the ranges found (the
    shortcut's names the implementation that ran) and, inside them, on CUDA the kernels launched, on a CPU
    (--smoke) the ops. For the shortcut only its depth-and-context attention counts (its other blocks are ordinary
    causal attention, which would pass any check)."""
    from torch.profiler import ProfilerActivity, profile

    from shortcut.evaluate import load_run

    found = {}
    for arch, prefix in ATTENTION_RANGES.items():
        model, data, _ = load_run(out / arch, device)
        model.train()
        x, y = data.windows("train", np.arange(s["batch"]) * 997)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof, torch.autocast(device, dtype=torch.bfloat16):
            model(x.to(device), y.to(device))
            if device == "cuda":
                torch.cuda.synchronize()
        names, ranges = set(), set()

        def inside(event):  # the kernels (CUDA) or the ops (CPU) an event and its children ran
            names.update([k.name for k in event.kernels] if device == "cuda" else [event.name])
            for child in event.cpu_children:
                inside(child)

        for event in prof.events():
            if event.name.startswith(prefix):
                ranges.add(event.name)
                inside(event)
        found[arch] = (sorted(ranges), sorted(n for n in names if not n.startswith(prefix)
                                              and (device == "cuda" or "attention" in n.lower())))  # CPU: those ops
    return found


def tracking(base, s, out: Path) -> dict:
    """bf16 and float32 runs of the same seed (eager): the largest gap of their logged training losses."""
    runs = {}
    for p in ("bfloat16", "float32"):
        train(job(base, s, "shortcut", s["check_steps"], f"train.precision={p}"), out / f"prec-{p}")
        runs[p] = metrics(out / f"prec-{p}")
    gaps = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(runs["bfloat16"], runs["float32"])]
    return {"max_gap": max(gaps), "final_bf16": runs["bfloat16"][-1]["train_loss"],
            "final_fp32": runs["float32"][-1]["train_loss"], "first": runs["float32"][0]["train_loss"]}


def resume(base, s, out: Path) -> dict:
    """A bf16 run stopped after its half-way checkpoint and resumed, against one that never stopped."""
    cfg = job(base, s, "shortcut", s["check_steps"], "train.precision=bfloat16")
    full = train(cfg, out / "full")
    train(cfg, out / "cut")
    for p in Checkpoint.paths(out / "cut")[1:]:
        p.unlink()
    (out / "cut" / "summary.json").unlink()
    resumed = train(cfg, out / "cut")
    return {"full": full.final_val_loss, "resumed": resumed.final_val_loss,
            "gap": abs(full.final_val_loss - resumed.final_val_loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device, no compile (tests)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu-check: no CUDA device here; `--smoke` runs the same plumbing on a CPU")
        return 2
    s = SMOKE if args.smoke else FULL
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    t0, failures = time.perf_counter(), []
    try:
        base = synthetic_corpus(root / "data", s["vocab"], 4_000_000 if not args.smoke else 40_000)
        out = root / "runs"
        print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
              f"L={s['n_layer']} d={s['n_embd']} T={s['block_size']} batch {s['batch']}", flush=True)
        fast = speed(base, s, out, compile_=cuda)
        b, sc = fast["baseline"], fast["shortcut"]
        print(f"peak FLOP/s {b['peak'] or 0:.3g} ({b['peak_source']})")
        print(f"{'arch':9s} {'tokens/s':>10s} {'MFU':>6s} {'step s':>7s} {'val':>7s} {'wall s':>7s}")
        for arch, r in fast.items():
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
            print(f"{arch:9s} {r['tokens_per_s']:10,.0f} {mfu:>6s} {r['step_s']:7.3f} {r['final_val']:7.3f} "
                  f"{r['wall_s']:7.1f}")
        time_ratio, flop_ratio = sc["step_s"] / b["step_s"], sc["flops_per_token"] / b["flops_per_token"]
        met = "met" if time_ratio / flop_ratio <= 1.05 else "NOT met"
        print(f"shortcut/baseline: step time {time_ratio:.3f}, FLOPs {flop_ratio:.3f}, "
              f"time/FLOP ratio {time_ratio / flop_ratio:.3f} (target <= 1.05: {met}; a target, not a check)")
        if b["mfu"]:
            print(f"baseline MFU {b['mfu']:.1%} (target >= 45% on an H100/H200: "
                  f"{'met' if b['mfu'] >= 0.45 else 'NOT met'}; a target, not a check)")
        for arch, r in fast.items():
            if not r["final_val"] < r["first_loss"]:
                failures.append(f"{arch} did not learn ({r['first_loss']:.3f} -> {r['final_val']:.3f})")
        device = "cuda" if cuda else "cpu"
        expected = f"{ATTENTION_RANGES['shortcut']}{resolve_attn_impl(AttnImpl.auto, device)}"
        for arch, (ranges, names) in fused_kernels(s, out, device).items():
            print(f"{arch} attention ({', '.join(ranges) or 'not found'}) {'kernels' if cuda else 'ops'}: "
                  f"{', '.join(names) or 'none found'}")
            if not any("flash" in n.lower() for n in names):  # FlashAttention (CUDA), the flash kernel (CPU)
                failures.append(f"{arch}: no fused (flash) attention kernel ran in its attention")
            if arch == "shortcut" and ranges != [expected]:  # not the reference it may fall back to
                failures.append(f"shortcut: its attention ran as {ranges}, not as auto's {expected}")
        shutil.rmtree(out)  # ~1.5 GB a checkpoint at full size: each phase removes its runs
        tr = tracking(base, s, out)
        print(f"bf16 vs float32 (same seed): largest gap of logged losses {tr['max_gap']:.4f} nats "
              f"(final {tr['final_bf16']:.4f} vs {tr['final_fp32']:.4f}, from {tr['first']:.3f})")
        if tr["max_gap"] > 0.05 * max(1.0, tr["first"] - tr["final_fp32"]) + 0.02:
            failures.append(f"bf16 does not track float32 (gap {tr['max_gap']:.4f})")
        shutil.rmtree(out)
        rs = resume(base, s, out)
        print(f"resume: val loss {rs['resumed']:.5f} resumed vs {rs['full']:.5f} uninterrupted (gap {rs['gap']:.2e})")
        if rs["gap"] > (1e-6 if not cuda else 5e-3):
            failures.append(f"resume is not exact (gap {rs['gap']:.2e})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"gpu-check: {'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
