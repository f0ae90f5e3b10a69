"""The shortcut's final-layer attention, each implementation (model.attn_impl) on this device: how far it is from
the masked reference (output and the gradients of q, k, v, and of the tap bias where one is used) and its forward
and forward+backward time.

This is the check that `auto`'s choice rests on, and on CUDA the one to run first (what `make gpu-check` is to
run): the CUDA paths (lse through FlashAttention-2, flex compiled) cannot be exercised on a CPU-only machine, nor
the CPU one (chunked) on CUDA. Exits
non-zero when an implementation is not exact (bf16 on CUDA: within 3% of the largest value).
    python benchmarks/attn_impls.py [--reps N]
"""

import argparse
import sys
import time

import torch

from shortcut.config import AttnImpl
from shortcut.attention import ATTENTION, resolve_attn_impl, runnable_impls


def inputs(B, nh, K, T, hs, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, nh, T, hs, device=device, dtype=dtype, generator=g)
    kv = torch.randn(B, K, T, 2 * nh * hs, device=device, dtype=dtype, generator=g)  # as the model's projection
    k, v = (t.view(B, K, T, nh, hs).permute(0, 3, 1, 2, 4) for t in kv.split(nh * hs, dim=-1))
    dy = torch.randn(B, nh, T, hs, device=device, dtype=dtype, generator=g)
    bias = torch.randn(nh, K, device=device, dtype=dtype, generator=g)  # model.tap_bias
    return [t.detach().requires_grad_() for t in (q, k, v, bias)], dy


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what training uses there
    impls = runnable_impls(device.type)
    # (B, nh, K, T, hs, tap bias): L=6 d=256 (also with model.tap_bias), and T=512 with 12 taps
    sizes = [(16, 4, 6, 256, 64, False), (16, 4, 6, 256, 64, True), (16, 4, 12, 512, 64, False)]
    if device.type == "cuda":
        sizes += [(16, 12, 12, 1024, 64, False), (8, 16, 24, 2048, 64, False)]
    print(f"device {device}, {dtype}, threads {torch.get_num_threads()}, "
          f"auto -> {resolve_attn_impl(AttnImpl.auto, device.type)}; times: min over {args.reps} interleaved reps; "
          "errors: max |impl - masked| / max |masked|, of y and of the gradients of q, k, v (and the bias)")
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # of the largest reference value: bf16 keeps 8 bits
    print(f"{'B':>3s} {'nh':>3s} {'K':>3s} {'T':>5s} {'bias':>4s} {'impl':7s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} "
          f"{'max|dy|':>9s} {'max|dgrad|':>10s}  exact (tol {tol:g})")
    failed = []
    for B, nh, K, T, hs, with_bias in sizes:
        (q, k, v, bias), dy = inputs(B, nh, K, T, hs, device, dtype)
        leaves = (q, k, v, bias) if with_bias else (q, k, v)
        bias = bias if with_bias else None
        ref = None
        fwd = {i: [] for i in impls}
        both = {i: [] for i in impls}
        errors = {}
        for rep in range(args.reps + 1):  # rep 0: warm-up (and flex's compilation), and the exactness check
            for impl in impls:
                f = ATTENTION[impl]
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    f(q, k, v, bias=bias)
                sync(device)
                t1 = time.perf_counter()
                y = f(q, k, v, bias=bias)
                grads = torch.autograd.grad(y, leaves, dy)
                sync(device)
                t2 = time.perf_counter()
                if rep == 0:
                    if impl == AttnImpl.masked:
                        ref = (y, grads)
                    errors[impl] = ((y - ref[0]).abs().max().item() / ref[0].abs().max().item(),
                                    max((g - r).abs().max().item() / r.abs().max().item()
                                        for g, r in zip(grads, ref[1])))
                else:
                    fwd[impl].append(t1 - t0)
                    both[impl].append(t2 - t1)
                del y, grads
        for impl in impls:
            ok = max(errors[impl]) <= tol
            failed += [] if ok else [f"{impl} at B={B} nh={nh} K={K} T={T} bias={with_bias}"]
            print(f"{B:3d} {nh:3d} {K:3d} {T:5d} {'yes' if with_bias else 'no':>4s} {impl:7s} "
                  f"{min(fwd[impl]) * 1e3:8.1f} "
                  f"{min(both[impl]) * 1e3:10.1f} {errors[impl][0]:9.2e} {errors[impl][1]:10.2e}  "
                  f"{'yes' if ok else 'NO'}")
    if failed:
        sys.exit("not exact: " + "; ".join(failed))


if __name__ == "__main__":
    main()
