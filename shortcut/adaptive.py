"""What adaptive compute buys at evaluation (issue 21): a routed model's two NLLs and realised capacity, and the
decoding speeds of plain, exit and speculative decoding, measured on the evaluated split.

Routing: the evaluation's NLL is the causal one (each routed block's router decides from the token alone); beside it
stands the training rule's (top-k over the whole sequence, which looks ahead), so the gap is seen, with the share of
tokens each routed block processed under the causal rule and the forward FLOPs per token that decoding then pays.
Decoding: greedy, one sequence, from the split's first tokens; tokens/s of each decoder in the same process, best of
two rounds each, interleaved, with the speculative output checked equal to the plain one.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch

from shortcut.blocks import Block
from shortcut.config import EvalConfig, SampleConfig
from shortcut.costs import costs
from shortcut.data import TokenData
from shortcut.generate import generate, has_exits
from shortcut.model import GPT
from shortcut.routing import routing_mode
from shortcut.scoring import scored_batches, sliding_windows, split_nll


@torch.no_grad()
def routing_figures(model: GPT, data: TokenData, cfg: EvalConfig, stride: int, ctx=None) -> dict:
    """The training rule's NLL on the same targets, and per routed block the share of tokens the causal rule
    processes (over the first 64 scored windows), with the forward FLOPs per token that share costs."""
    with routing_mode(model, "topk"):
        total, n, _ = split_nll(model, data, cfg.split, stride, cfg.max_tokens, cfg.batch_size, ctx or nullcontext())
    routed = model.cfg.routed_blocks()
    windows = sliding_windows(len(data.splits[cfg.split]), data.block_size, stride, cfg.max_tokens)[:64]
    share = {i: [] for i in routed}
    for x, _, keep in scored_batches(data, cfg.split, windows, cfg.batch_size, next(model.parameters()).device):
        with ctx or nullcontext():
            trace = model.run(model.start(x))
        for i in routed:
            share[i].append(trace.processed[i][keep].float().mean().item())
    fractions = {i: float(np.mean(v)) for i, v in share.items()}
    return {"train_mode_nll": total / n, "capacity": model.cfg.mod_capacity, "routed_blocks": routed,
            "causal_share": [fractions[i] for i in routed],
            "causal_flops_per_token": causal_flops(model, fractions)}


def causal_flops(model: GPT, fractions: dict[int, float]) -> float:
    """Forward FLOPs per token when routed block i processes the share fractions[i] of the tokens (decoding skips
    the rest for real): the dense parts as costs.py counts them, each routed block at its own share."""
    c, cfg, T = costs(model.cfg), model.cfg, model.cfg.block_size
    dense = c.forward - sum(c.blocks[i] for i in fractions)
    routed = sum(f * Block.flops(cfg, i, max(1, round(f * T))) + 2 * cfg.n_embd for i, f in fractions.items())
    return float(dense + routed)


def draft_depth(model: GPT, cfg: EvalConfig) -> int | None:
    """eval.decode_draft, or the middle exit depth (None: this model has no shallower exit; a variant has none)."""
    shallow = model.cfg.exit_depths()[:-1]
    if not shallow or not has_exits(model):
        return None
    return cfg.decode_draft if cfg.decode_draft is not None else shallow[(len(shallow) - 1) // 2]


@torch.no_grad()
def decode_figures(model: GPT, data: TokenData, cfg: EvalConfig) -> dict:
    """Greedy decoding speeds from the split's first block_size // 2 tokens: plain (KV cache), exit decoding at
    eval.decode_threshold and speculative decoding drafting at draft_depth (for the models that have exits)."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(np.asarray(data.splits[cfg.split][:model.cfg.block_size // 2], dtype=np.int64),
                             device=device)[None]
    base = dict(n=1, max_new_tokens=cfg.decode_tokens, temperature=0.0)
    modes = {"plain": SampleConfig(**base)}
    d = draft_depth(model, cfg)
    if d is not None:
        modes["exit"] = SampleConfig(**base, exit="confidence", exit_threshold=cfg.decode_threshold)
        modes["speculative"] = SampleConfig(**base, speculative=d, draft_tokens=cfg.decode_draft_tokens)
    generate(model, prompt, SampleConfig(**{**base, "max_new_tokens": 8}))  # warm-up
    best: dict = {}
    for _ in range(2):  # interleaved rounds, the best of each decoder: the same machine state for all
        for name, sample_cfg in modes.items():
            t0 = time.perf_counter()
            gen = generate(model, prompt, sample_cfg)
            seconds = time.perf_counter() - t0
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, gen)
    plain = best["plain"][1]
    out = {"tokens": cfg.decode_tokens, "prompt_tokens": int(prompt.size(1)), "threshold": cfg.decode_threshold,
           "draft_depth": d, "draft_tokens": cfg.decode_draft_tokens, "device": device.type,
           "settings": decode_settings(cfg)}
    for name, (_, gen) in best.items():
        out[name] = {"tokens_per_s": gen.tokens_per_s, "speedup": gen.tokens_per_s / plain.tokens_per_s,
                     "flops_per_token": gen.flops_per_token, "mean_exit_depth": gen.mean_exit_depth,
                     "acceptance": gen.acceptance}
    if "speculative" in out:
        out["speculative"]["same_output"] = bool(torch.equal(best["speculative"][1].tokens, plain.tokens))
    if "exit" in out:  # what exiting at the threshold costs in NLL, on the evaluation's own first targets
        out["exit"]["nll"], out["exit"]["full_nll"] = exit_nll(model, data, cfg)
    return out


EXIT_NLL_TOKENS = 20_000  # the exit policy's NLL is measured on at most this many of the evaluation's targets


@torch.no_grad()
def exit_nll(model: GPT, data: TokenData, cfg: EvalConfig) -> tuple[float, float]:
    """Mean NLL of the confidence policy at eval.decode_threshold and of the full depth, on the same first targets
    of the evaluation's sliding windows (stride: block_size // 2 unless eval.stride)."""
    from shortcut.early_exit import confidence_pass

    stride = cfg.stride or max(1, model.cfg.block_size // 2)
    cap = min(c for c in (cfg.max_tokens, EXIT_NLL_TOKENS) if c is not None)
    windows = sliding_windows(len(data.splits[cfg.split]), data.block_size, stride, cap)
    exits = full = n = 0.0
    for x, y, keep in scored_batches(data, cfg.split, windows, cfg.batch_size, next(model.parameters()).device):
        nll, _ = confidence_pass(model, x, y, cfg.decode_threshold)
        exits += float(nll[keep].sum())
        logp = model(x)[0].float().log_softmax(-1)
        full += float(-logp.gather(-1, y[..., None]).squeeze(-1)[keep].sum())
        n += int(keep.sum())
    return exits / n, full / n


def decode_settings(cfg: EvalConfig) -> dict:
    return {"tokens": cfg.decode_tokens, "threshold": cfg.decode_threshold, "draft_depth_setting": cfg.decode_draft,
            "draft_tokens": cfg.decode_draft_tokens}
