"""The depth audit: which layer each token draws on (shortcut), and how early the answer is there (logit lens).

From the final layer's attention probabilities (B, nh, T queries, K taps, T keys), a token's *depth profile* is
the mass it puts on each tap, summed over key positions: K numbers that sum to one. Its *mean depth* is the
expected layer index under that profile. Verma & Pilanci (2024) read these maps to argue the model is depth and
context adaptive; the numbers here make that claim checkable (does the model reach deeper for harder tokens?).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shortcut.config import EvalConfig
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

@torch.no_grad()
def measure(model: GPT, data: TokenData, cfg: EvalConfig) -> dict:
    """Per-token depth profiles, mean depths and losses over fixed validation windows (arrays, not yet summaries)."""
    T = min(cfg.audit_seq_len or data.block_size, data.block_size)
    starts = data.fixed_starts("val", cfg.audit_sequences, T)
    device = next(model.parameters()).device
    out = {"starts": starts, "inputs": [], "targets": [], "loss": [], "profile": [], "profile_heads": [],
           "attn": None, "lens": []}
    for i in range(0, len(starts), 8):
        x, y = data.windows("val", starts[i:i + 8], T)
        x, y = x.to(device), y.to(device)
        logits, _, probs = model(x, per_head=model.shortcut)
        out["inputs"].append(x.cpu())
        out["targets"].append(y.cpu())
        out["loss"].append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").cpu())  # (B, T)
        if model.shortcut:
            heads = probs.sum(dim=-1).float().cpu()  # (B, nh, T, K): mass on each tap, summed over keys
            out["profile_heads"].append(heads)
            out["profile"].append(heads.mean(dim=1))  # (B, T, K)
            if out["attn"] is None:
                out["attn"] = probs[0].mean(dim=0).float().cpu()  # (T, K, T) of the first sequence
        out["lens"].append(logit_lens(model, x, y, out["loss"][-1].mean().item()))
    for key in ("inputs", "targets", "loss", "profile", "profile_heads"):
        out[key] = torch.cat(out[key]) if out[key] else None
    out["lens"] = np.mean(np.stack(out["lens"]), axis=0)
    return out


def logit_lens(model: GPT, x, y, output_nll: float) -> np.ndarray:
    """NLL (nats/token) when the final LayerNorm and head read each layer's residual stream h_0 .. h_{L-1}, and
    last the model's own output (output_nll, already measured)."""
    nll = [F.cross_entropy(model.lm_head(model.ln_f(h)).float().transpose(1, 2), y).item()
           for h in model.hidden_states(x)]
    return np.array(nll + [output_nll])


def summarise(m: dict, taps: list[int], n_layer: int, classes: list[str]) -> dict:
    """The numbers of depth.json."""
    from scipy.stats import spearmanr

    result = {"logit_lens_nll": [float(v) for v in m["lens"]],
              "logit_lens_layers": list(range(n_layer + 1)), "n_sequences": int(len(m["starts"]))}
    if m["profile"] is None:
        return result
    p = m["profile"].reshape(-1, len(taps)).double()  # (N tokens, K)
    layers = torch.tensor(taps, dtype=torch.float64)
    depth = p @ layers  # expected layer index per token
    loss = m["loss"].reshape(-1).double()
    entropy = -(p.clamp_min(1e-12).log() * p).sum(dim=1)
    shallow = p[:, layers < n_layer / 2].sum(dim=1)
    rho, pval = spearmanr(depth.numpy(), loss.numpy())
    result.update({
        "taps": taps,
        "mean_profile": p.mean(dim=0).tolist(),
        "mean_profile_per_head": m["profile_heads"].permute(1, 0, 2, 3).reshape(m["profile_heads"].shape[1], -1,
                                                                                len(taps)).mean(dim=1).tolist(),
        "mean_depth": float(depth.mean()),
        "depth_entropy_nats": float(entropy.mean()),  # per token, averaged; log(K) is uniform over taps
        "max_entropy_nats": math.log(len(taps)),
        "share_shallow": float((shallow > 0.5).double().mean()),  # mass on taps below L/2 exceeds 0.5
        "spearman_depth_vs_loss": {"rho": float(rho), "p_value": float(pval), "n_tokens": int(len(loss))},
        "token_class_of": "target (the token being predicted at that position)",
        "by_class": {},
    })
    cls = np.array([classes[i] for i in m["targets"].reshape(-1).tolist()])
    for name in sorted(set(cls)):
        idx = torch.from_numpy(np.flatnonzero(cls == name))
        entry = {"n_tokens": int(len(idx)), "mean_depth": float(depth[idx].mean()), "mean_loss": float(loss[idx].mean()),
                 "mean_profile": p[idx].mean(dim=0).tolist(), "share_shallow": float((shallow[idx] > 0.5).double().mean())}
        if len(idx) >= 10:
            r, pv = spearmanr(depth[idx].numpy(), loss[idx].numpy())
            entry["spearman_depth_vs_loss"] = {"rho": float(r), "p_value": float(pv)}
        result["by_class"][name] = entry
    return result


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
    rho = summary["spearman_depth_vs_loss"]["rho"]
    ax.set(xlabel="mean depth used (expected tap layer)", ylabel="tokens",
           title=f"{len(depth):,} tokens; Spearman(depth, loss) = {rho:.3f}")
    ax.legend()
    paths.append(_save(fig, out / "depth_histogram.png"))
    return paths


def draw_logit_lens(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.plot(summary["logit_lens_layers"], summary["logit_lens_nll"], marker="o")
    ax.set(xlabel="layer read by the head (0 = embeddings, last = model output)", ylabel="validation NLL (nats/token)",
           title="logit lens: how early the answer is there")
    return _save(fig, out / "logit_lens.png")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def audit(model: GPT, data: TokenData, out: Path, cfg: EvalConfig) -> dict:
    """Measure, summarise and draw; writes out/depth.json and the PNGs. Returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    labels, classes, axis = describe_vocab(data)
    m = measure(model, data, cfg)
    taps = model.taps if model.shortcut else []
    summary = summarise(m, taps, model.cfg.n_layer, classes)
    pictures = [draw_logit_lens(summary, out)]
    if model.shortcut:
        sec = data.meta.get("seconds_per_token")
        pictures += draw(m, summary, taps, labels, axis, sec, out, cfg)
    summary["pictures"] = [str(p) for p in pictures]
    tmp = out / "depth.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "depth.json")
    if model.shortcut:
        np.savez_compressed(out / "attention.npz", profile=m["profile"].numpy(), loss=m["loss"].numpy(),
                            targets=m["targets"].numpy(), inputs=m["inputs"].numpy(), starts=m["starts"],
                            first_sequence_attention=m["attn"].numpy(), taps=np.array(taps))
        log.info("depth audit: mean profile %s over taps %s, Spearman(depth, loss) %.3f (n=%d) -> %s",
                 np.round(summary["mean_profile"], 3).tolist(), taps, summary["spearman_depth_vs_loss"]["rho"],
                 summary["spearman_depth_vs_loss"]["n_tokens"], out)
    else:
        log.info("logit lens NLL by layer: %s -> %s", np.round(summary["logit_lens_nll"], 3).tolist(), out)
    return summary
