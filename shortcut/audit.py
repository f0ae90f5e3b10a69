"""The depth audit: which layer each token draws on (shortcut), and how early the answer is there (logit lens).

For every model that weighs earlier layers' outputs (the shortcut's attention mass on each tap, DenseFormer's DWA
coefficients, Attention Residuals' softmax weights, MUDD's dynamic weights) the same comparable summary,
depth.json's "layer_weights": the mean weight the mix nearest the output puts on each source layer (0 the
embeddings, l block l's output), every mix's row, and layer_weights.png.

From the final layer's attention probabilities (B, nh, T queries, K taps, T keys), a token's *depth profile* is
the mass it puts on each tap, summed over key positions: K numbers that sum to one. Its *mean depth* is the
expected layer index under that profile. Verma & Pilanci (2024) read these maps to argue the model is depth and
context adaptive; the numbers here make that claim checkable (does the model reach deeper for harder tokens?).
Each Spearman(depth, loss) has a 95% interval from resampling whole audit windows (a window's tokens are not
independent), and a within-position rho, so that position in the window (little context, high loss) cannot pass for depth.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shortcut import diskio
from shortcut.config import EvalConfig, ExitPolicy, UserError
from shortcut.data import TokenData
from shortcut.model import GPT

log = logging.getLogger(__name__)


# --- what the tokens are: labels for the pictures, classes for the numbers ---

def describe_vocab(data: TokenData) -> tuple[list[str], list[str], str]:
    """A short label and a class for every token id, and what the x-axis of a sequence is (tokens or seconds)."""
    meta, V = data.meta, data.vocab_size
    if meta["domain"] == "text":
        from shortcut.prepare.text import tokenizer_from_meta

        tok = tokenizer_from_meta(meta)
        labels = [tok.decode([i]) if meta["tokenizer"] == "char" else chr(i) if 32 <= i < 127 else f"\\x{i:02x}"
                  for i in range(V)]
        classes = ["space" if s.isspace() else "letter" if s.isalpha() else "digit" if s.isdigit() else "other"
                   for s in labels]
        labels = [{"\n": "\\n", " ": "␣", "\t": "\\t"}.get(s, s) for s in labels]
        return labels, classes, "token"
    if meta["domain"] == "music":
        from shortcut.prepare.music import load_tokenizer

        tok = load_tokenizer(data.path)
        if meta.get("bpe_vocab"):  # merged tokens have no single name
            labels = [f"#{i}" for i in range(V)]
            return labels, ["bpe"] * V, "token"
        names = [tok[i] for i in range(V)]
        labels = [n.replace("_None", "").replace("Position_", "Pos").replace("Duration_", "Dur").replace("Pitch_", "P")
                  .replace("Velocity_", "Vel").replace("Program_", "Prog") for n in names]
        classes = [n.split("_")[0].lower() for n in names]
        return labels, classes, "token"
    if meta["domain"] == "audio":
        classes = meta.get("token_classes") or ["frame"] * V
        return [str(i) for i in range(V)], classes, "seconds"
    return [str(i) for i in range(V)], ["token"] * V, "token"


# --- measurement ---

TOP_PAIRS = 5  # per query, the (tap, key position) pairs with the most attention, kept for report.html


@torch.no_grad()
def measure(model: GPT, data: TokenData, cfg: EvalConfig, windows: tuple | None = None) -> dict:
    """Per-token depth profiles, mean depths and losses over fixed validation windows (arrays, not yet summaries).
    windows: (starts, inputs, targets (N, T)) to measure instead (a shifted or noisy condition's, for the report)."""
    if windows is None:
        T = min(cfg.audit_seq_len or data.block_size, data.block_size)
        starts = data.fixed_starts("val", cfg.audit_sequences, T)
        windows = (starts, *data.windows("val", starts, T))
    starts, xs, ys = windows
    device = next(model.parameters()).device
    out = {"starts": starts, "inputs": [], "targets": [], "loss": [], "profile": [], "profile_heads": [],
           "attn": None, "lens": [], "layer_weights": [], "layer_weights_info": None, "blocks_run": [],
           "top_pairs": [], "top_weights": []}
    for i in range(0, len(starts), 8):
        x, y = xs[i:i + 8].to(device), ys[i:i + 8].to(device)
        logits, probs = model.depth_attention(x, per_head=True) if model.shortcut else (model(x)[0], None)
        out["inputs"].append(x.cpu())
        out["targets"].append(y.cpu())
        out["loss"].append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").cpu())  # (B, T)
        if model.shortcut:
            heads = probs.sum(dim=-1).float().cpu()  # (B, nh, T, K): mass on each tap, summed over keys
            out["profile_heads"].append(heads)
            out["profile"].append(heads.mean(dim=1))  # (B, T, K)
            if out["attn"] is None:
                out["attn"] = probs[0].mean(dim=0).float().cpu()  # (T, K, T) of the first sequence
            w, pairs = probs.mean(dim=1).float().flatten(2).topk(min(TOP_PAIRS, probs[0, 0, 0].numel()), dim=-1)
            out["top_pairs"].append(pairs.cpu())  # (B, T, k): index tap * T + key position
            out["top_weights"].append(w.cpu())
        if model.weighs_layers and not (model.shortcut and len(model.block_taps) == 1):  # shortcut_layers > 1: all
            lw = model.layer_weights(x)
            out["layer_weights"].append(lw.pop("weights").cpu())  # (B, T, consumers, sources)
            out["layer_weights_info"] = lw
        out["lens"].append(logit_lens(model, x, y, out["loss"][-1].mean().item()))
        if model.cfg.routed_blocks():
            out["blocks_run"].append(blocks_run(model, x).cpu())
    if model.shortcut and out["layer_weights_info"] is None:  # the final block's mass on each tap, as every
        # layer-weighing model reports it
        out["layer_weights"] = [torch.cat(out["profile"])[:, :, None, :]]
        out["layer_weights_info"] = {"kind": "shortcut attention mass", "sources": list(model.taps),
                                     "consumers": ["final block"], "normalised": True}
    for key in ("inputs", "targets", "loss", "profile", "profile_heads", "layer_weights", "blocks_run", "top_pairs",
                "top_weights"):
        out[key] = torch.cat(out[key]) if out[key] else None
    out["lens"] = np.mean(np.stack(out["lens"]), axis=0)
    return out


@torch.no_grad()
def token_exits(model: GPT, x, y, cfg: EvalConfig) -> dict | None:
    """What the exits eval.exit measures do to each token of windows x, y (B, T), for report.html; None where no
    exits were measured. fixed: (B, T, D) NLL and top probability at every exit depth; confidence: (B, T, thresholds)
    exit depth, confidence, NLL, and `differs` (its top-1 is not the full model's: an unsafe exit where it exits
    early)."""
    from shortcut.early_exit import check_supported, confidence_details

    if cfg.exit == ExitPolicy.none:
        return None
    try:
        check_supported(model, "this run")
    except UserError:  # evaluate has refused it already; a direct audit of such a model has no exits to show
        return None
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    depths = model.cfg.exit_depths()
    out = {"depths": depths}
    if cfg.exit in (ExitPolicy.fixed, ExitPolicy.both):
        trace = model.run_to(x, depths[-1])
        logp = torch.stack([model.exit_logits(trace, d).float().log_softmax(-1) for d in depths], dim=2)  # (B,T,D,V)
        out["fixed"] = {"nll": -logp.gather(-1, y[:, :, None, None].expand(*logp.shape[:3], 1)).squeeze(-1).cpu(),
                        "confidence": logp.max(dim=-1).values.exp().cpu()}
    if cfg.exit in (ExitPolicy.confidence, ExitPolicy.both):
        full = model(x)[0].argmax(dim=-1)  # (B, T): the full model's top-1
        per = [confidence_details(model, x, y, t) for t in cfg.exit_thresholds]
        out["confidence"] = {"thresholds": list(cfg.exit_thresholds),
                             **{k: torch.stack([p[k] for p in per], dim=-1).cpu() for k in ("depth", "confidence", "nll")},
                             "differs": torch.stack([p["top1"] != full for p in per], dim=-1).cpu()}
    return out


def blocks_run(model: GPT, x) -> torch.Tensor:
    """(B, T): how many blocks each token ran (Mixture-of-Depths: the dense ones plus the routed ones that chose it,
    under the causal rule evaluation and decoding use)."""
    trace = model.run(model.start(x))
    dense = model.cfg.n_layer - len(trace.processed)
    return dense + sum(p.long() for p in trace.processed.values())


def summarise_blocks_run(counts: torch.Tensor, depth: torch.Tensor | None) -> dict:
    """depth.json's blocks_run: the mean, the share of tokens per count, and, for the shortcut, Spearman between
    the blocks a token ran and the depth its final block drew on (do tokens that skip read shallower taps?)."""
    from scipy.stats import spearmanr

    c = counts.reshape(-1)
    values, n = c.unique(return_counts=True)
    out = {"mean": float(c.double().mean()), "share": {int(v): float(k) / len(c) for v, k in zip(values, n)},
           "n_tokens": int(len(c))}
    if depth is not None and len(values) > 1:
        out["spearman_vs_mean_depth"] = float(spearmanr(c.numpy(), depth.reshape(-1).numpy())[0])
    return out


def logit_lens(model: GPT, x, y, output_nll: float) -> np.ndarray:
    """NLL (nats/token) when the final LayerNorm and head read each layer's residual stream h_0 .. h_{L-1}, and
    last the model's own output (output_nll, already measured)."""
    nll = [F.cross_entropy(model.head(h).float().transpose(1, 2), y).item()
           for h in model.hidden_states(x)]
    return np.array(nll + [output_nll])


# --- statistics: the audit window (sequence), not the token, is the unit that is drawn independently ---

N_BOOT = 1000  # bootstrap resamples of the audit windows
BOOT_SEED = 0  # fixed, so depth.json is a function of the checkpoint and the windows alone


def _resample_counts(n_seq: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_seq): how often each sequence is drawn when n_seq sequences are drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_seq, np.full(n_seq, 1 / n_seq), size=n_boot).astype(np.float64)


def _rank_parts(x: np.ndarray, seq: np.ndarray, n_seq: int) -> np.ndarray:
    """(n_seq, n): for sequence s and token i, how many of s's tokens lie below x_i, ties counting half.

    A resample that draws sequence s w_s times ranks token i at w @ parts[:, i] + 1/2, the average rank of ties as
    in scipy's spearmanr; so one matrix product ranks every resample without sorting again."""
    order = np.argsort(x, kind="stable")
    xs = x[order]  # sorted queries make searchsorted a forward scan, several times faster than random ones
    parts = np.empty((n_seq, len(x)))
    for s in range(n_seq):
        v = np.sort(x[seq == s])
        parts[s, order] = (np.searchsorted(v, xs, "left") + np.searchsorted(v, xs, "right")) / 2
    return parts


def _weighted_pearson(rx: np.ndarray, ry: np.ndarray, wt: np.ndarray, axis: int) -> np.ndarray:
    """Pearson correlation along axis where a token drawn k times counts k times; nan where either side is constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tot = wt.sum(axis, keepdims=True)
        dx = rx - (wt * rx).sum(axis, keepdims=True) / tot
        dy = ry - (wt * ry).sum(axis, keepdims=True) / tot
        sxx, syy, sxy = (wt * dx * dx).sum(axis), (wt * dy * dy).sum(axis), (wt * dx * dy).sum(axis)
        ok = (sxx > 1e-6) & (syy > 1e-6)  # distinct ranks differ by at least 1/2, so a real spread is far above this
        return np.where(ok, sxy / np.sqrt(np.where(ok, sxx * syy, 1.0)), np.nan)


def _pooled_spearman(x: np.ndarray, y: np.ndarray, seq: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman over all tokens of each resample; x, y, seq (n,), w (n_boot, n_seq) -> (n_boot,).

    Token i of sequence s has rank w @ P[:, i] in a resample and counts w_s times, so each weighted sum Pearson needs
    is a form in w over per-sequence sums of P: O(n_seq^3) per resample instead of O(tokens)."""
    n = w.shape[1]
    px, py = _rank_parts(x, seq, n), _rank_parts(y, seq, n)
    members = [seq == s for s in range(n)]
    count = np.array([k.sum() for k in members], dtype=np.float64)
    lin_x = np.stack([px[:, k].sum(1) for k in members], 1)  # (n, n): [j, s] = sum over s's tokens of P[j, i]
    lin_y = np.stack([py[:, k].sum(1) for k in members], 1)

    def quad(a, b):  # (j, s * k): [j, s, k] = sum over s's tokens of a[j, i] b[k, i]
        return np.stack([a[:, k] @ b[:, k].T for k in members], 1).reshape(n, n * n)

    qxx, qyy, qxy = quad(px, px), quad(py, py), quad(px, py)
    out = np.empty(len(w))
    step = max(1, 2 ** 20 // (n * n))
    for i in range(0, len(w), step):
        wb = w[i:i + step]
        outer = wb[:, :, None] * wb[:, None, :]  # (b, s, k)
        tot = wb @ count
        sx, sy = ((wb @ lin_x) * wb).sum(1), ((wb @ lin_y) * wb).sum(1)
        sxx, syy, sxy = (((wb @ q).reshape(-1, n, n) * outer).sum((1, 2)) for q in (qxx, qyy, qxy))
        with np.errstate(invalid="ignore", divide="ignore"):
            vx, vy, cxy = sxx - sx * sx / tot, syy - sy * sy / tot, sxy - sx * sy / tot
            ok = (tot > 0) & (vx > 1e-10 * sxx) & (vy > 1e-10 * syy)  # constant ranks leave only rounding
            out[i:i + step] = np.where(ok, cxy / np.sqrt(np.where(ok, vx * vy, 1.0)), np.nan)
    return out


def _within_position_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean over positions t of Spearman across sequences at t (positions where either side is constant skipped);
    x, y (n_seq, T), w (n_boot, n_seq) -> (n_boot,)."""
    n, T = x.shape

    def parts(v):  # (n_seq s', n_seq s * T): s' lies below s at position t, ties counting half
        a, b = v[:, None, :], v[None, :, :]
        return ((a < b) + 0.5 * (a == b)).reshape(n, n * T)

    px, py = parts(x), parts(y)
    out = np.empty(len(w))
    step = max(1, 2 ** 21 // (n * T))
    for i in range(0, len(w), step):
        wb = w[i:i + step]
        r = _weighted_pearson((wb @ px).reshape(-1, n, T), (wb @ py).reshape(-1, n, T), wb[:, :, None], axis=1)
        valid = ~np.isnan(r)  # (b, T)
        count = valid.sum(axis=1)
        out[i:i + step] = np.where(count > 0, np.where(valid, r, 0).sum(axis=1) / np.maximum(count, 1), np.nan)
    return out


def _interval(boot: np.ndarray) -> dict:
    """95% percentile interval and two-sided p-value (is rho 0?) from bootstrap replicates; None where none is defined."""
    b = boot[~np.isnan(boot)]
    if len(b) == 0:
        return {"ci_low": None, "ci_high": None, "p_value": None}
    lo, hi = np.quantile(b, [0.025, 0.975])
    p = 2 * min(np.mean(b <= 0), np.mean(b >= 0))
    return {"ci_low": float(lo), "ci_high": float(hi), "p_value": float(min(1.0, max(1 / len(b), p)))}


def within_position_spearman(depth: np.ndarray, loss: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED
                             ) -> dict:
    """Spearman(depth, loss) within position for (n_seq, T) arrays, as summarise computes it: the mean over
    positions of the rho across sequences, with a 95% interval from resampling whole sequences."""
    n_seq = depth.shape[0]
    w = _resample_counts(n_seq, n_boot if n_seq > 1 else 0, seed)
    rho = _within_position_spearman(depth, loss, np.vstack([np.ones(n_seq), w]))
    ci = _interval(rho[1:])
    return {"within_position_rho": _num(rho[0]), "within_position_ci_low": ci["ci_low"],
            "within_position_ci_high": ci["ci_high"], "n_sequences": int(n_seq)}


def _num(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def summarise(m: dict, taps: list[int], n_layer: int, classes: list[str], n_boot: int = N_BOOT,
              seed: int = BOOT_SEED) -> dict:
    """The numbers of depth.json. Intervals resample whole audit windows (n_boot times, seeded), never tokens."""
    from scipy.stats import spearmanr

    result = {"logit_lens_nll": [float(v) for v in m["lens"]],
              "logit_lens_layers": list(range(n_layer + 1)), "n_sequences": int(len(m["starts"]))}
    if m.get("layer_weights") is not None:
        result["layer_weights"] = summarise_layer_weights(m["layer_weights"], m["layer_weights_info"])
    if m["profile"] is None:
        return result
    p = m["profile"].reshape(-1, len(taps)).double()  # (N tokens, K)
    layers = torch.tensor(taps, dtype=torch.float64)
    depth = p @ layers  # expected layer index per token
    loss = m["loss"].reshape(-1).double()
    entropy = -(p.clamp_min(1e-12).log() * p).sum(dim=1)
    shallow = p[:, layers < n_layer / 2].sum(dim=1)
    rho = spearmanr(depth.numpy(), loss.numpy())[0]
    n_seq, T = m["loss"].shape
    seq = np.repeat(np.arange(n_seq), T)  # the audit window each token belongs to
    w = _resample_counts(n_seq, n_boot if n_seq > 1 else 0, seed)  # one window: nothing to resample, no interval
    within = _within_position_spearman(depth.numpy().reshape(n_seq, T), loss.numpy().reshape(n_seq, T),
                                       np.vstack([np.ones(n_seq), w]))  # row 0: the sample itself
    within_ci = _interval(within[1:])
    result.update({
        "taps": taps,
        "mean_profile": p.mean(dim=0).tolist(),
        "mean_profile_per_head": m["profile_heads"].permute(1, 0, 2, 3).reshape(m["profile_heads"].shape[1], -1,
                                                                                len(taps)).mean(dim=1).tolist(),
        "mean_depth": float(depth.mean()),
        "depth_entropy_nats": float(entropy.mean()),  # per token, averaged; log(K) is uniform over taps
        "max_entropy_nats": math.log(len(taps)),
        "share_shallow": float((shallow > 0.5).double().mean()),  # mass on taps below L/2 exceeds 0.5
        "spearman_depth_vs_loss": {
            "rho": float(rho), **_interval(_pooled_spearman(depth.numpy(), loss.numpy(), seq, w)),
            "method": f"bootstrap over {n_seq} sequences, {len(w)} resamples", "n_tokens": int(len(loss)),
            "n_sequences": int(n_seq), "within_position_rho": _num(within[0]),
            "within_position_ci_low": within_ci["ci_low"], "within_position_ci_high": within_ci["ci_high"]},
        "token_class_of": "target (the token being predicted at that position)",
        "by_class": {},
    })
    cls = np.array([classes[i] for i in m["targets"].reshape(-1).tolist()])
    for name in sorted(set(cls)):
        idx = torch.from_numpy(np.flatnonzero(cls == name))
        entry = {"n_tokens": int(len(idx)), "mean_depth": float(depth[idx].mean()), "mean_loss": float(loss[idx].mean()),
                 "mean_profile": p[idx].mean(dim=0).tolist(), "share_shallow": float((shallow[idx] > 0.5).double().mean())}
        if len(idx) >= 10:
            r = spearmanr(depth[idx].numpy(), loss[idx].numpy())[0]
            spread = len(np.unique(seq[idx.numpy()])) > 1  # a class seen in one window only has no interval
            boot = _pooled_spearman(depth[idx].numpy(), loss[idx].numpy(), seq[idx.numpy()], w if spread else w[:0])
            entry["spearman_depth_vs_loss"] = {"rho": _num(r), **_interval(boot)}
        result["by_class"][name] = entry
    return result


def summarise_layer_weights(w: torch.Tensor, info: dict) -> dict:
    """depth.json's layer_weights from w (tokens..., consumers, sources): "mean" is what the mix nearest the output
    (the head's input; the shortcut's final block) puts on each source, averaged over tokens; "matrix" every mix's
    row; "token_std" how much the last mix varies between tokens (0 for static DWA weights); "mean_depth" the
    expected source layer under the last mix, where its weights are a distribution."""
    w = w.reshape(-1, *w.shape[-2:]).double()  # (N tokens, A, S)
    last = w[:, -1]  # (N, S)
    layers = torch.tensor(info["sources"], dtype=torch.float64)
    out = {"kind": info["kind"], "sources": list(info["sources"]), "mean": last.mean(dim=0).tolist(),
           "token_std": last.std(dim=0, correction=0).tolist(), "consumers": list(info["consumers"]),
           "matrix": w.mean(dim=0).tolist(), "normalised": bool(info["normalised"]), "n_tokens": int(len(w))}
    if info["normalised"]:
        out["mean_depth"] = float((last @ layers).mean())
    return out


# --- pictures ---

def draw(m: dict, summary: dict, taps: list[int], labels: list[str], axis: str, seconds_per_token: float | None,
         out: Path, cfg: EvalConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # (1) depth profile heatmaps: taps (y) by tokens (x) for a few fixed sequences
    n = min(cfg.audit_plots, m["profile"].shape[0])
    W = min(cfg.audit_plot_tokens, m["profile"].shape[1])
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 0.22 * W + 2), 1.2 + 0.45 * len(taps) * n), squeeze=False, layout="constrained")
    for r in range(n):
        ax = axes[r, 0]
        im = ax.imshow(m["profile"][r, :W].T.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(taps)), [f"h{l}" for l in taps])
        ax.set_ylabel("tap layer")
        if axis == "seconds" and seconds_per_token:
            ticks = list(range(0, W, max(1, W // 10)))
            ax.set_xticks(ticks, [f"{t * seconds_per_token:.2f}" for t in ticks])
            ax.set_xlabel("time (s)")
        else:
            ax.set_xticks(range(W), [labels[i] for i in m["inputs"][r, :W].tolist()], fontsize=7,
                          rotation=90 if max(len(labels[i]) for i in m["inputs"][r, :W].tolist()) > 1 else 0)
        ax.set_title(f"validation window {r} (starts at token {int(m['starts'][r])}): mass on each tap", fontsize=9)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01)
    paths.append(_save(fig, out / "depth_profile.png"))

    # (2) full attention map over (tap, key position) for a few queries of the first sequence
    attn = m["attn"]  # (T, K, T)
    T = attn.shape[0]
    queries = sorted({min(T - 1, q) for q in (T // 8, T // 4, T // 2, T - 1)})
    fig, axes = plt.subplots(len(queries), 1, figsize=(10, 0.9 + 0.4 * len(taps) * len(queries)), squeeze=False, layout="constrained")
    for ax, q in zip(axes[:, 0], queries):
        ax.imshow(attn[q, :, : q + 1].numpy(), aspect="auto", origin="lower", cmap="magma",
                  extent=(-0.5, q + 0.5, -0.5, len(taps) - 0.5))
        ax.set_yticks(range(len(taps)), [f"h{l}" for l in taps])
        ax.set_title(f"query position {q}: attention over (tap, key position ≤ {q})", fontsize=9)
        ax.set_xlabel("key position")
    paths.append(_save(fig, out / "attention_map.png"))

    # (3) histogram of mean depth used
    depth = (m["profile"].reshape(-1, len(taps)).double() @ torch.tensor(taps, dtype=torch.float64)).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.hist(depth, bins=40, range=(0, max(taps) if max(taps) > 0 else 1), color="tab:blue")
    ax.axvline(depth.mean(), color="k", ls="--", label=f"mean {depth.mean():.2f}")
    sp = summary["spearman_depth_vs_loss"]
    ci = f" [95% CI {sp['ci_low']:.3f}, {sp['ci_high']:.3f}]" if sp.get("ci_low") is not None else ""
    ax.set(xlabel="mean depth used (expected tap layer)", ylabel="tokens",
           title=f"{len(depth):,} tokens; Spearman(depth, loss) = {sp['rho']:.3f}{ci}\n"
                 f"(interval: resampling the {sp.get('n_sequences', '?')} audit windows)")
    ax.legend()
    paths.append(_save(fig, out / "depth_histogram.png"))
    return paths


def draw_layer_weights(lw: dict, out: Path, title: str = "") -> Path:
    """layer_weights.png: the last mix's mean weight per source layer (the comparable bar chart), and every mix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources, matrix = lw["sources"], np.array(lw["matrix"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.9 + max(2.6, 0.3 * len(matrix))), layout="constrained",
                                 gridspec_kw={"width_ratios": [1, 1.3]})
    ax.bar(range(len(sources)), lw["mean"], yerr=lw["token_std"], color="tab:blue", capsize=2)
    ax.set_xticks(range(len(sources)), ["emb" if l == 0 else f"h{l}" for l in sources])
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="source layer (emb: embeddings, hl: output of block l)",
           ylabel="mean weight (bar: ± std over tokens)", title=f"{lw['consumers'][-1]} reads ({lw['kind']})")
    lim = max(1e-6, float(np.abs(matrix).max()))
    im = bx.imshow(matrix, aspect="auto", cmap="RdBu_r" if (matrix < 0).any() else "viridis",
                   vmin=-lim if (matrix < 0).any() else 0, vmax=lim)
    bx.set_xticks(range(len(sources)), ["emb" if l == 0 else f"h{l}" for l in sources])
    bx.set_yticks(range(len(matrix)), lw["consumers"], fontsize=7)
    bx.set(xlabel="source layer", ylabel="mix (who reads it)", title="every mix, mean over tokens")
    fig.colorbar(im, ax=bx, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out / "layer_weights.png")


def draw_logit_lens(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.plot(summary["logit_lens_layers"], summary["logit_lens_nll"], marker="o")
    ax.set(xlabel="layer read by the head (0 = embeddings, last = model output)", ylabel="validation NLL (nats/token)",
           title="logit lens: how early the answer is there")
    return _save(fig, out / "logit_lens.png")


def write_report(model: GPT, data: TokenData, m: dict, summary: dict, out: Path, cfg: EvalConfig,
                 labels: list[str], checkpoint_hash: str, run: dict | None) -> Path:
    """out/report.html: the first windows of the audit (eval.audit_plots of them, eval.audit_plot_tokens tokens
    each), in-domain, as one self-contained page (shortcut.report)."""
    from shortcut import report

    n, W = report.shown(m, cfg)
    exits = token_exits(model, m["inputs"][:n, :W], m["targets"][:n, :W], cfg)
    view = report.condition("in-domain", "in-domain", m, summary, labels, data, exits, n, W,
                            note=f"validation windows of {data.meta['source']}, the corpus the model trained on")
    doc = report.document(report.identity(model, data, cfg, checkpoint_hash, run, out), [view])
    path, size = report.write(out / report.FILE, doc)
    log.info("audit report: %d windows of %d tokens, %.0f kB -> %s", n, W, size / 1024, path)
    return path


def _save(fig, path: Path) -> Path:
    diskio.save_figure(fig, path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def audit(model: GPT, data: TokenData, out: Path, cfg: EvalConfig, checkpoint_hash: str = "",
          run: dict | None = None) -> dict:
    """Measure, summarise and draw; writes out/depth.json (naming the checkpoint it measured), the PNGs and
    report.html (run: the evaluation record so far, for the report's header). Returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    labels, classes, axis = describe_vocab(data)
    m = measure(model, data, cfg)
    taps = model.taps if model.shortcut else []
    summary = summarise(m, taps, model.cfg.n_layer, classes)
    pictures = [draw_logit_lens(summary, out)]
    if "layer_weights" in summary:
        pictures.append(draw_layer_weights(summary["layer_weights"], out, f"{model.cfg.arch}, "
                                           f"{summary['layer_weights']['n_tokens']:,} validation tokens"))
    if model.variant is not None and hasattr(model.variant, "lambdas"):  # value residual: (own V_n, first V_1)
        summary["value_lambdas"] = [[float(v) for v in lam.detach().cpu()] for lam in model.variant.lambdas]
    if model.shortcut:
        sec = data.meta.get("seconds_per_token")
        pictures += draw(m, summary, taps, labels, axis, sec, out, cfg)
    if m["blocks_run"] is not None:
        depth = m["profile"].reshape(-1, len(taps)).double() @ torch.tensor(taps, dtype=torch.float64) \
            if model.shortcut else None
        summary["blocks_run"] = summarise_blocks_run(m["blocks_run"], depth)
        log.info("blocks run per token: mean %.2f of %d, shares %s", summary["blocks_run"]["mean"],
                 model.cfg.n_layer, summary["blocks_run"]["share"])
    summary["pictures"] = [str(p) for p in pictures]
    summary["checkpoint_hash"] = checkpoint_hash
    diskio.atomic_write(out / "depth.json", json.dumps(summary, indent=2))
    if model.shortcut:
        np.savez_compressed(out / "attention.npz", profile=m["profile"].numpy(), loss=m["loss"].numpy(),
                            targets=m["targets"].numpy(), inputs=m["inputs"].numpy(), starts=m["starts"],
                            first_sequence_attention=m["attn"].numpy(), taps=np.array(taps))
        sp = summary["spearman_depth_vs_loss"]
        log.info("depth audit: mean profile %s over taps %s, Spearman(depth, loss) %.3f, 95%% CI [%s, %s] over %d "
                 "windows, within position %s (n=%d) -> %s", np.round(summary["mean_profile"], 3).tolist(), taps,
                 sp["rho"], _fmt(sp["ci_low"]), _fmt(sp["ci_high"]), sp["n_sequences"], _fmt(sp["within_position_rho"]),
                 sp["n_tokens"], out)
    else:
        log.info("logit lens NLL by layer: %s -> %s", np.round(summary["logit_lens_nll"], 3).tolist(), out)
    write_report(model, data, m, summary, out, cfg, labels, checkpoint_hash, run)
    if "layer_weights" in summary:
        lw = summary["layer_weights"]
        log.info("layer weights (%s) of the %s mix over sources %s: %s", lw["kind"], lw["consumers"][-1],
                 lw["sources"], np.round(lw["mean"], 3).tolist())
    return summary
