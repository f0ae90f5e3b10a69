"""compare's adaptive-compute table (issue 21): per row, what `eval.decode_tokens` and routing measured (decoding
speeds of plain, exit and speculative decoding, the exit policy's NLL, a routed model's training-rule NLL) and one
picture per dataset of test NLL against the measured cost of decoding a token.

Each figure is a ratio or a mean over the row's seeds, read from their eval.json; nothing is re-measured here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def figures(evals: list[dict]) -> dict | None:
    """A row's adaptive-compute figures from its seeds' eval.json records (None: no seed measured any). A figure
    is given only where every seed measured it, so that a mean never mixes seeds with and without it."""
    routing = [e["routing"] for e in evals if e.get("routing")]
    decode = [e["decode"] for e in evals if e.get("decode")]
    if not evals or not (routing or decode):
        return None
    out: dict = {"seeds": len(evals)}
    if len(routing) == len(evals):
        out["train_mode_nll"] = _mean_std([r["train_mode_nll"] for r in routing])
        out["causal_flops_per_token"] = float(np.mean([r["causal_flops_per_token"] for r in routing]))
        out["capacity"] = routing[0]["capacity"]
    if len(decode) == len(evals):
        first = decode[0]
        out.update(decode_tokens=first["tokens"], threshold=first["threshold"], draft_depth=first["draft_depth"],
                   draft_tokens=first["draft_tokens"],
                   plain_tokens_per_s=_mean_std([d["plain"]["tokens_per_s"] for d in decode]))
        for mode in ("exit", "speculative"):
            got = [d for d in decode if mode in d]
            if len(got) != len(decode):
                continue
            speed = [d[mode]["speedup"] for d in got]
            m = {"speedup": float(np.mean(speed)), "speedup_range": [float(min(speed)), float(max(speed))],
                 "flops_ratio": float(np.mean([d[mode]["flops_per_token"] / d["plain"]["flops_per_token"]
                                               for d in got]))}
            for key in ("mean_exit_depth", "acceptance"):
                vals = [d[mode][key] for d in got if d[mode].get(key) is not None]
                m[key] = float(np.mean(vals)) if len(vals) == len(got) else None
            if mode == "exit":
                m["nll"] = float(np.mean([d[mode]["nll"] for d in got]))
                m["nll_increase"] = float(np.mean([d[mode]["nll"] - d[mode]["full_nll"] for d in got]))
            else:
                m["same_output"] = all(d[mode]["same_output"] for d in got)
            out[mode] = m
    return out


def _speed(m: dict) -> str:
    lo, hi = m["speedup_range"]
    return f"x{m['speedup']:.2f} [{lo:.2f}–{hi:.2f}]"


def markdown(entries: list) -> list[str]:
    """One table per dataset of the entries (compare.Entry) that carry figures; nothing if none do."""
    lines = []
    for ds in sorted({e.dataset for e in entries if e.adaptive}):
        rows = [e for e in entries if e.dataset == ds and e.adaptive]
        a0 = next((e.adaptive for e in rows if "plain_tokens_per_s" in e.adaptive), {})
        exit_h = f"exit τ={a0['threshold']}: NLL (Δ vs full), depth, FLOPs, speed" if a0 else "exit"
        spec_h = (f"speculative (draft depth {a0['draft_depth']}, {a0['draft_tokens']} drafts): speed, acceptance, "
                  f"same output" if a0 else "speculative")
        lines += [f"#### adaptive compute: {ds}", "",
                  f"| variant | seeds | test NLL | routed: training-rule NLL, FLOPs/token (causal) | plain decoding "
                  f"tokens/s | {exit_h} | {spec_h} |", "|---|---|---:|---|---:|---|---|"]
        for e in rows:
            a = e.adaptive
            test = f"{e.test_nll[0]:.4f}" if e.test_nll else "–"
            routed = (f"{a['train_mode_nll'][0]:.4f}, {a['causal_flops_per_token']:.3g}" if "train_mode_nll" in a
                      else "–")
            plain = f"{a['plain_tokens_per_s'][0]:,.0f}" if "plain_tokens_per_s" in a else "–"
            x = a.get("exit")
            exit_c = (f"{x['nll']:.4f} ({x['nll_increase']:+.4f}), {x['mean_exit_depth']:.1f}, "
                      f"x{x['flops_ratio']:.2f}, {_speed(x)}" if x else "–")
            s = a.get("speculative")
            acc = f"{s['acceptance']:.2f}" if s and s["acceptance"] is not None else "–"
            spec_c = f"{_speed(s)}, {acc}, {'yes' if s['same_output'] else 'NO'}" if s else "–"
            lines.append(f"| {e.variant} | {','.join(map(str, e.seeds))} | {test} | {routed} | {plain} | {exit_c} | "
                         f"{spec_c} |")
        lines += ["", "Speeds are each run's own ratio to its plain KV-cache decoding (greedy, the best of 2 "
                  "interleaved rounds), mean [min–max] over seeds; tokens/s are absolute and comparable between rows "
                  "only when the runs were evaluated on an equally idle machine. Routed rows' test NLL uses the "
                  "causal rule; the training rule (top-k over the whole sequence) sees the future.", ""]
    return lines


def plot(entries: list, out_dir: Path, plt) -> list[Path]:
    """Per dataset with decoding figures: test NLL against milliseconds per decoded token, one marker per decoder
    (the exit decoder at its own NLL: the full test NLL plus the exit policy's measured increase)."""
    pictures = []
    datasets = sorted({e.dataset for e in entries if e.adaptive and "plain_tokens_per_s" in e.adaptive})
    for i, ds in enumerate(datasets):
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        for e in (e for e in entries if e.dataset == ds and e.adaptive and e.test_nll
                  and "plain_tokens_per_s" in e.adaptive):
            a = e.adaptive
            plain_ms = 1000.0 / a["plain_tokens_per_s"][0]
            points = [("o", plain_ms, e.test_nll[0])]
            if a.get("exit"):
                points.append(("v", plain_ms / a["exit"]["speedup"], e.test_nll[0] + a["exit"]["nll_increase"]))
            if a.get("speculative"):
                points.append(("s", plain_ms / a["speculative"]["speedup"], e.test_nll[0]))
            line, = ax.plot([p[1] for p in points], [p[2] for p in points], ":", alpha=0.5)
            for marker, x, y in points:
                ax.plot([x], [y], marker, color=line.get_color())
            ax.annotate(e.variant, (points[0][1], points[0][2]), fontsize=7)
        ax.set(xlabel="ms per decoded token (measured)", ylabel="test NLL (nats/token)",
               title=f"{ds}\no plain, v exit, s speculative (exact)")
        png = out_dir / f"adaptive_{i}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pictures.append(png)
    return pictures
