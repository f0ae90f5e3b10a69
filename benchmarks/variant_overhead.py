"""Every architecture's training-step time over the baseline's, next to its analytic FLOPs over the baseline's,
measured in one run (issue 22: Hyper-Connections and mHC move n x the residual state, a cost FLOPs do not show).

Each arch in shortcut.config.Arch (so a new variant appears by itself), with its own defaults, at 12 layers, d=64,
4 heads, T=128, batch 16, vocabulary 419 (the chorales' REMI tokens), float32 on the CPU: one step is forward,
backward and AdamW (train_step.make_step), timed in interleaved rounds (one step of every arch per round, so a
busy machine slows all alike), the minimum and the median over rounds. FLOPs: costs.flops_per_token(cfg).train.
time/FLOP above 1: the variant costs more time than its FLOPs say (elementwise mixing, small matmuls, memory).

    python benchmarks/variant_overhead.py [--rounds 10] [--threads 1]
"""

import argparse
import statistics

import torch

from shortcut.config import Arch, ModelConfig
from shortcut.costs import flops_per_token, param_counts
from train_step import interleaved, make_step

SIZE = {"n_layer": 12, "n_head": 4, "n_embd": 64, "block_size": 128, "vocab_size": 419}
BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfgs = {str(arch): ModelConfig(arch=arch, **SIZE) for arch in Arch}
    times = interleaved({name: make_step(cfg, BATCH, device) for name, cfg in cfgs.items()}, rounds=args.rounds)
    base_t, base_f = min(times["baseline"]), flops_per_token(cfgs["baseline"]).train
    print(f"12 layers, d=64, T=128, batch {BATCH}, CPU, {args.threads} thread(s), float32; min of {args.rounds} "
          f"interleaved rounds (median in brackets)")
    print(f"{'arch':15s} {'params':>9s} {'FLOPs/tok':>10s} {'ms/step':>8s} {'(median)':>9s} {'time ratio':>10s} "
          f"{'FLOP ratio':>10s} {'time/FLOP':>9s}")
    for name, cfg in cfgs.items():
        t, f = min(times[name]), flops_per_token(cfg).train
        ratio, fratio = t / base_t, f / base_f
        print(f"{name:15s} {param_counts(cfg).params:9,d} {f:10.3g} {1e3 * t:8.1f} "
              f"({1e3 * statistics.median(times[name]):7.1f}) {ratio:10.2f} {fratio:10.3f} {ratio / fratio:9.2f}")


if __name__ == "__main__":
    main()
