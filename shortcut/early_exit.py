"""Early exit (issue 12): test NLL against forward FLOPs when tokens leave the model before its last layer.

The paper calls the shortcut model adaptive: a token can draw on shallow representations. This module turns that
into saved compute and measures it, for the shortcut and for the baseline (with LayerSkip-style training, both:
model.exit_train). A token's exit at depth d runs blocks 0..d-1 and then the exit head (GPT.exit_logits):

  baseline  logits = head(norm(h_d))                          (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710)
  shortcut  logits = head(norm(final_block(h_d, taps <= d)))  the final block reads the depths it has

Policies (eval.exit):
  fixed       every token exits at d, for each d: no decisions, nothing to copy.
  confidence  a token exits at the first depth whose prediction's top probability reaches the threshold; deeper
              layers see its state copied upward (CALM, Schuster et al. 2022, arXiv 2207.07061), so later tokens
              attend to it unchanged. Computed layer by layer for all positions at once, which is exact: a token's
              decision at d depends only on states at depth <= d of itself and earlier tokens.

Cost per token, analytic, forward (shortcut.costs: the same terms as flops_per_token, so the full
depth costs exactly the model's forward FLOPs): the blocks run, every exit head evaluated to decide (each
depth tried, the exit taken included), the feature maps of the taps read, and, for a state copied upward, its
keys and values in every deeper attention that later tokens read (the copy is free; projecting it is not).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from shortcut.config import Arch, EvalConfig, ExitPolicy, UserError
from shortcut.costs import costs
from shortcut.data import TokenData
from shortcut.model import GPT
from shortcut.scoring import scored_batches, sliding_windows, split_nll

NLL_TOLERANCE = 0.01  # the headline: compute saved at <= 1% more NLL than the full depth


def check_supported(model: GPT, where) -> None:
    if model.cfg.arch not in (Arch.baseline, Arch.shortcut):
        raise UserError(f"eval.exit: early exit is built for baseline and shortcut runs; {where} is "
                        f"{model.cfg.arch} (evaluate it with eval.exit=none)")
    if model.cfg.mod_capacity is not None:
        raise UserError(f"eval.exit: {where} is a routed model (model.mod_capacity): early exits do not compose "
                        f"with routing here (evaluate it with eval.exit=none)")


@torch.no_grad()
def fixed_nll(model: GPT, x, y, keep) -> dict[int, torch.Tensor]:
    """Summed NLL of the kept targets (B, T mask) at every exit depth, from one pass."""
    depths = model.cfg.exit_depths()
    trace = model.run_to(x, depths[-1])
    out = {}
    for d in depths:
        nll = F.cross_entropy(model.exit_logits(trace, d).float().transpose(1, 2), y, reduction="none")
        out[d] = nll[keep].sum()
    return out


def _confidence_exits(model: GPT, x, threshold: float):
    """The confidence policy over all positions at once, layer by layer, with exited states copied upward (CALM):
    yields per exit depth d the exit's log-probabilities (B, T, V) and the tokens that exit there (B, T) bool."""
    trace = model.start(x)
    depths = model.cfg.exit_depths()
    exited = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for d in range(1, depths[-1] + 1):
        h = trace.states[-1]
        new = model.run_block(d - 1, trace)
        trace.states.append(torch.where(exited[..., None], h, new))  # an exited token's state is copied upward
        if d not in depths:
            continue
        logp = model.exit_logits(trace, d).float().log_softmax(dim=-1)  # (B, T, V)
        take = ~exited & ((logp.max(dim=-1).values.exp() >= threshold) | (d == depths[-1]))
        yield d, logp, take
        exited |= take


@torch.no_grad()
def confidence_pass(model: GPT, x, y, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (B, T): its NLL and the depth it exits at, with exited states copied upward (CALM)."""
    nll = torch.zeros(y.shape, device=y.device)
    depth = torch.zeros(y.shape, dtype=torch.long, device=y.device)
    for d, logp, take in _confidence_exits(model, x, threshold):
        nll = torch.where(take, -logp.gather(-1, y[..., None]).squeeze(-1), nll)
        depth = torch.where(take, torch.full_like(depth, d), depth)
    return nll, depth


@torch.no_grad()
def confidence_choices(model: GPT, x, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (B, T): the next token greedy decoding under the confidence policy emits (its exit's argmax) and
    the depth it exits at: what shortcut.generate.ExitDecoder must reproduce."""
    tokens = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    depth = torch.zeros_like(tokens)
    for d, logp, take in _confidence_exits(model, x, threshold):
        tokens = torch.where(take, logp.argmax(dim=-1), tokens)
        depth = torch.where(take, torch.full_like(depth, d), depth)
    return tokens, depth


@torch.no_grad()
def confidence_outcomes(model: GPT, x, y, threshold: float) -> dict[str, torch.Tensor]:
    """Per token (B, T), under the confidence policy: the depth it exits at, its NLL of the target y, the exit's
    top-1 prediction and the confidence that decided (the exit's top probability): what the robustness report
    compares with the full model (shortcut.robustness)."""
    out = {"depth": torch.zeros(y.shape, dtype=torch.long, device=y.device), "nll": torch.zeros(y.shape, device=y.device)}
    out["top1"], out["confidence"] = torch.zeros_like(out["depth"]), torch.zeros_like(out["nll"])
    for d, logp, take in _confidence_exits(model, x, threshold):
        best, arg = logp.max(dim=-1)
        for key, value in (("depth", torch.full_like(out["depth"], d)), ("top1", arg), ("confidence", best.exp()),
                           ("nll", -logp.gather(-1, y[..., None]).squeeze(-1))):
            out[key] = torch.where(take, value, out[key])
    return out


def exit_curve(model: GPT, data: TokenData, cfg: EvalConfig, stride: int, ctx=None) -> dict:
    """The curves of eval.exit on the split: per fixed depth and per confidence threshold, the mean NLL of the
    scored targets and the mean forward FLOPs per token, with the full depth as the reference point. ctx: the
    eval's autocast, so that the full depth reproduces eval.json's NLL on the same tokens."""
    caps = [n for n in (cfg.max_tokens, cfg.exit_max_tokens) if n is not None]
    max_tokens = min(caps) if caps else None  # the first targets of the eval's own windows
    windows = sliding_windows(len(data.splits[cfg.split]), data.block_size, stride, max_tokens)
    per_token = costs(model.cfg).exits()
    depths = per_token.depths
    fixed = {d: 0.0 for d in depths}
    conf = {t: {"nll": 0.0, "flops": 0.0, "exits": torch.zeros(len(depths))} for t in cfg.exit_thresholds}
    per_depth = torch.tensor([per_token.confidence[d] for d in depths], dtype=torch.float64)
    count = 0
    for x, y, keep in scored_batches(data, cfg.split, windows, cfg.batch_size, next(model.parameters()).device):
        count += int(keep.sum())
        if cfg.exit in (ExitPolicy.fixed, ExitPolicy.both):
            with ctx or nullcontext():
                nlls = fixed_nll(model, x, y, keep)
            for d, v in nlls.items():
                fixed[d] += float(v)
        if cfg.exit in (ExitPolicy.confidence, ExitPolicy.both):
            for t, acc in conf.items():
                with ctx or nullcontext():
                    nll, depth = confidence_pass(model, x, y, t)
                acc["nll"] += float(nll[keep].sum())
                hist = torch.stack([(depth[keep] == d).sum() for d in depths]).cpu().double()  # tokens per depth
                acc["exits"] += hist
                acc["flops"] += float((hist * per_depth).sum())
    out = {"policy": str(cfg.exit), "split": cfg.split, "n_tokens": count, "stride": stride,
           "exit_train": model.cfg.exit_train, "depths": depths, "full": {"depth": depths[-1], "flops": per_token.full},
           "fixed": [], "confidence": []}
    if cfg.exit in (ExitPolicy.fixed, ExitPolicy.both):
        out["fixed"] = [{"depth": d, "nll": fixed[d] / count, "flops": per_token.fixed[d]} for d in depths]
        out["full"]["nll"] = out["fixed"][-1]["nll"]
    for t, acc in conf.items() if cfg.exit in (ExitPolicy.confidence, ExitPolicy.both) else ():
        share = (acc["exits"] / count).tolist()
        out["confidence"].append({"threshold": t, "nll": acc["nll"] / count, "flops": acc["flops"] / count,
                                  "mean_depth": sum(d * s for d, s in zip(depths, share)), "exit_share": share})
    if "nll" not in out["full"]:  # confidence only: the full depth's own pass, over the same windows
        total, n, _ = split_nll(model, data, cfg.split, stride, max_tokens, cfg.batch_size, ctx or nullcontext())
        out["full"]["nll"] = total / n
    out["saved"] = compute_saved(out)
    return out


def compute_saved(curve: dict, tolerance: float = NLL_TOLERANCE) -> dict:
    """Per policy, the cheapest point whose NLL is within `tolerance` (relative) of the full depth's, and the
    share of the full depth's FLOPs it saves (0 when no cheaper point qualifies)."""
    full = curve["full"]
    out = {"tolerance": tolerance}
    for policy in ("fixed", "confidence"):
        ok = [p for p in curve[policy] if p["nll"] <= full["nll"] * (1 + tolerance)]
        best = min(ok, key=lambda p: p["flops"], default=None)
        out[policy] = None if not curve[policy] else {
            "saved": max(0.0, 1 - best["flops"] / full["flops"]) if best else 0.0,
            "at": {k: best[k] for k in ("depth", "threshold", "nll", "flops") if k in best} if best else None}
    return out


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, references: dict | None = None) -> Path:
    """NLL vs forward FLOPs per token: one colour per model (label -> its runs' curves, averaged point by point
    over seeds), fixed exits as circles, confidence thresholds as a line with triangles, the full depth as a star;
    references: label -> (flops, nll) points drawn as crosses (e.g. the plain baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for k, (label, runs) in enumerate(sorted(curves.items())):
        color = f"C{k}"
        for policy, marker, style in (("fixed", "o", ":"), ("confidence", "^", "-")):
            pts = [r[policy] for r in runs if r[policy]]
            if not pts or len({len(p) for p in pts}) > 1:
                continue
            xs = [sum(p[i]["flops"] for p in pts) / len(pts) for i in range(len(pts[0]))]
            ys = [sum(p[i]["nll"] for p in pts) / len(pts) for i in range(len(pts[0]))]
            ax.plot(xs, ys, style, marker=marker, color=color, label=f"{label}: {policy}")
        full = [r["full"] for r in runs]
        ax.plot(sum(f["flops"] for f in full) / len(full), sum(f["nll"] for f in full) / len(full), "*",
                color=color, markersize=14, label=f"{label}: full depth")
    for k, (label, (flops, nll)) in enumerate(sorted((references or {}).items())):
        ax.plot(flops, nll, "x", color="black", markersize=10, mew=2 + k)
        ax.annotate(label, (flops, nll), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set(xlabel="forward FLOPs per token (exit decisions and copied states included)",
           ylabel="NLL (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def headline(curve: dict) -> str:
    s = curve["saved"]
    parts = ", ".join(f"{p} exits save {100 * s[p]['saved']:.0f}%" for p in ("fixed", "confidence") if s.get(p))
    return (f"full depth NLL {curve['full']['nll']:.4f} at {curve['full']['flops']:.3g} FLOPs/token; at <= "
            f"{100 * s['tolerance']:.0f}% more NLL, {parts}")

