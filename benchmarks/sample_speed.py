"""Tokens/s of `shortcut sample`: the KV cache against a full forward per token, and adaptive decoding (issue 21).

1. Random weights, the demo's size (4 layers, d=128, 4 heads, T=128, vocabulary 419: speed does not depend on the
   weights): 4 samples of 256 new tokens from a 16-token prompt (generation runs past block_size, so the cache
   rebuilds its window), baseline and shortcut variants, cached against a full forward per token.
2. Trained runs (`--runs DIR ...`, e.g. the exit-trained runs of `make adaptive-cpu` or `make early-exit-cpu`;
   acceptance rates and exit depths mean nothing on random weights): greedy decoding of one sequence from the test
   split, plain (KV cache), exit decoding at --threshold and self-speculative decoding drafting at --draft with
   --drafts tokens a round; tokens/s of each as a ratio to plain in the same process, best of two interleaved
   rounds, the acceptance rate, the mean exit depth, analytic FLOPs per token, and whether the speculative output
   equals the plain one (it must). Target (issue 21): speculative >= 1.3x plain at 12 layers on CPU for the best
   exit-trained model.

    python benchmarks/sample_speed.py [--threads N] [--new 256] [--runs DIR ...] [--draft 3] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shortcut.adaptive import decode_figures
from shortcut.config import EvalConfig, ModelConfig, SampleConfig
from shortcut.evaluate import load_run
from shortcut.generate import generate
from shortcut.model import GPT

MODELS = {"baseline": dict(arch="baseline"), "shortcut": dict(arch="shortcut"),
          "shortcut add+bias, 2 blocks": dict(arch="shortcut", shortcut_mode="add", tap_bias="last",
                                              shortcut_layers=2)}


def cache_speedup(new: int) -> None:
    print(f"{torch.get_num_threads()} thread(s); 4 samples x {new} new tokens, demo size (L=4, d=128, T=128)")
    for name, kw in MODELS.items():
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=419, **kw)).eval()
        prompt = torch.randint(0, 419, (4, 16))
        speeds = {}
        for cache in (True, False):
            cfg = SampleConfig(n=4, max_new_tokens=new, temperature=1.0, cache=cache)
            generate(model, prompt, SampleConfig(n=4, max_new_tokens=8, cache=cache))  # warm-up
            gen = generate(model, prompt, cfg)
            speeds[cache] = gen.tokens_per_s
            assert gen.cached == cache
        print(f"{name:28s} cached {speeds[True]:8,.0f} tok/s   full forward {speeds[False]:8,.0f} tok/s   "
              f"x{speeds[True] / speeds[False]:.1f}")


def adaptive(runs: list[str], new: int, draft: int | None, drafts: int, threshold: float) -> None:
    print(f"\ngreedy, 1 sequence x {new} new tokens from the test split; exit at {threshold}, speculative drafting at "
          f"depth {draft or 'the middle exit'} x {drafts}")
    print(f"{'run':48s} {'L':>3s} {'plain tok/s':>11s} {'exit':>6s} {'depth':>5s} {'spec':>6s} {'accept':>6s} "
          f"{'same':>5s}")
    best = None
    for run in runs:
        model, data, _ = load_run(Path(run))
        cfg = EvalConfig(decode_tokens=new, decode_threshold=threshold, decode_draft=draft,
                         decode_draft_tokens=drafts)
        d = decode_figures(model, data, cfg)
        exit_, spec = d.get("exit") or {}, d.get("speculative") or {}
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{run[-48:]:48s} {model.cfg.n_layer:3d} {d['plain']['tokens_per_s']:11,.0f} "
              f"{f(exit_.get('speedup'), '5.2f'):>6s} {f(exit_.get('mean_exit_depth'), '5.2f'):>5s} "
              f"{f(spec.get('speedup'), '5.2f'):>6s} {f(spec.get('acceptance'), '6.2f'):>6s} "
              f"{str(spec.get('same_output', '-')):>5s}")
        if spec and model.cfg.exit_train and (best is None or spec["speedup"] > best[1]):
            best = (run, spec["speedup"], model.cfg.n_layer, d["draft_depth"])
    if best:
        run, speedup, L, dd = best
        print(f"target: speculative >= 1.3x plain, best exit-trained model: x{speedup:.2f} ({run}, {L} layers, draft "
              f"depth {dd}): {'met' if speedup >= 1.3 else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--draft", type=int, default=3)
    ap.add_argument("--drafts", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_speedup(args.new)
    if args.runs:
        adaptive(args.runs, args.new, args.draft, args.drafts, args.threshold)
    else:
        print("\n(no --runs: adaptive decoding needs trained exit-trained runs, e.g. those of `make adaptive-cpu`)")


if __name__ == "__main__":
    main()
