"""Tokens/s of `shortcut sample`: KV-cached decoding against a full forward per token, at the demo's size on CPU.

The demo's model (4 layers, d=128, 4 heads, T=128, REMI vocabulary 419; random weights: speed does not depend on
them), 4 samples of 256 new tokens from a 16-token prompt, so generation runs past block_size and the cache
rebuilds its window (shortcut/generate.py). Prints tokens/s for the baseline and the shortcut (the paper's model and
the add / tap-bias / two-shortcut-block variant) and the speed-up of the cache.

    python benchmarks/sample_speed.py [--threads N] [--new 256]
"""

from __future__ import annotations

import argparse

import torch

from shortcut.config import ModelConfig, SampleConfig
from shortcut.model import GPT
from shortcut.generate import generate

MODELS = {"baseline": dict(arch="baseline"), "shortcut": dict(arch="shortcut"),
          "shortcut add+bias, 2 blocks": dict(arch="shortcut", shortcut_mode="add", tap_bias="last",
                                              shortcut_layers=2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new", type=int, default=256)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} thread(s); 4 samples x {args.new} new tokens, demo size (L=4, d=128, T=128)")
    for name, kw in MODELS.items():
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=419, **kw)).eval()
        prompt = torch.randint(0, 419, (4, 16))
        speeds = {}
        for cache in (True, False):
            cfg = SampleConfig(n=4, max_new_tokens=args.new, temperature=1.0, cache=cache)
            generate(model, prompt, SampleConfig(n=4, max_new_tokens=8, cache=cache))  # warm-up
            gen = generate(model, prompt, cfg)
            speeds[cache] = gen.tokens_per_s
            assert gen.cached == cache
        print(f"{name:28s} cached {speeds[True]:8,.0f} tok/s   full forward {speeds[False]:8,.0f} tok/s   "
              f"x{speeds[True] / speeds[False]:.1f}")


if __name__ == "__main__":
    main()
