"""Inputs the model was not trained on (issue 23): noisy context and shifted sources, and what changes under each:
the NLL, the depth each token draws on, and how often an early exit says something the full model would not.

Conditions (eval.json's "conditions"): in-domain (the eval split as eval.json scores it), noise p (eval.noise: each
context token replaced, with probability p, by one of the other ids drawn uniformly; the targets stay clean, so the
NLL measures how much worse the model predicts the same text from a damaged context), and shift (eval.shift:
another source of the domain, tokenized with the run's own tokenizer, shortcut.prepare.shift). Every condition is
scored with the eval's sliding windows (eval.stride; eval.robust_max_tokens caps the targets), so the in-domain
condition is eval.json's NLL and noise at p = 0 is the in-domain condition exactly.

Per condition: the NLL and its difference from in-domain; for a model that weighs layers, the depth profile (the
head-averaged mass the mix nearest the output puts on each tap) and its shift against in-domain with a 95%
bootstrap interval over windows (the same draws for both when the windows are the same, i.e. paired, for noise);
Spearman(depth, loss) within position, as the audit computes it; for exit-capable models (eval.exit=confidence or
both), per threshold: the share of tokens exiting before the full depth, the share of those whose top-1 differs
from the full model's (unsafe exits) and their NLL increase, and the expected calibration error of the confidence
that decided (equal-width bins, Guo et al. 2017, arXiv 1706.04599).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shortcut.config import EvalConfig, ExitPolicy, UserError
from shortcut.data import TokenData
from shortcut.model import GPT
from shortcut.scoring import sliding_windows

log = logging.getLogger(__name__)

N_BOOT = 1000  # bootstrap resamples of the windows
BOOT_SEED = 0  # fixed: the intervals are a function of the checkpoint and the data alone
ECE_BINS = 10  # equal-width confidence bins
SAMPLES = 8  # windows per condition kept in audit/conditions.npz (tokens, depth, NLL, exits) for the report
SAMPLES_FILE = "conditions.npz"  # under audit/
UNKNOWN_POLICY = ("a target the run's vocabulary lacks is not scored (the model gives it no probability: its NLL "
                  "would be infinite); an unknown context symbol is read as the run's most frequent training token "
                  "(every id the model reads is one it was trained on; the run's <unk> id, where it has one, never "
                  "occurs in training)")


# --- the conditions ---

def corrupt(tokens: np.ndarray, p: float, seed: int, vocab_size: int) -> np.ndarray:
    """Each token replaced, with probability p, by one of the other vocab_size - 1 ids, drawn uniformly. Token j's
    fate depends on (seed, j) alone: the same for every model and every length, and nested in p (a token replaced
    at p is replaced, by the same id, at every larger p)."""
    n = len(tokens)
    u = np.random.default_rng([seed, 0]).random(n)
    offset = 1 + np.floor(np.random.default_rng([seed, 1]).random(n) * (vocab_size - 1)).astype(np.int64)
    return np.where(u < p, (tokens + offset) % vocab_size, tokens)


@dataclass
class Condition:
    """One way of presenting a split to the model: what it reads (inputs) and what it is scored on (targets)."""
    name: str
    kind: str  # in_domain | noise | shift
    data: TokenData  # the corpus whose split is scored: the run's, or a shifted one
    split: str
    vocab_size: int  # the run's: noise draws from it, and a shifted corpus marks what it lacks with an id >= it
    p: float | None = None
    seed: int | None = None
    shift: Any = None  # shortcut.prepare.shift.Shift
    substitute: int | None = None  # shift: the id an unknown context symbol is read as

    def arrays(self, n: int, split: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The first n tokens (of the scored split, or of `split`) as the model reads them, as they are scored, and
        which targets count (None: all)."""
        clean = np.asarray(self.data.splits[split or self.split][:n], dtype=np.int64)
        if self.kind == "noise":
            return corrupt(clean, self.p, self.seed, self.vocab_size), clean, None
        unknown = clean >= self.vocab_size
        if self.kind == "shift" and unknown.any():
            return np.where(unknown, self.substitute, clean), np.where(unknown, 0, clean), ~unknown
        return clean, clean, None


def thresholds(cfg: EvalConfig) -> list[float]:
    return list(cfg.exit_thresholds) if cfg.exit in (ExitPolicy.confidence, ExitPolicy.both) else []


def max_targets(cfg: EvalConfig) -> int | None:
    caps = [n for n in (cfg.max_tokens, cfg.robust_max_tokens) if n is not None]
    return min(caps) if caps else None


def wanted(cfg: EvalConfig, stride: int) -> list[dict]:
    """What each condition eval.noise and eval.shift ask for is measured with (eval.json records it, so a sweep
    re-evaluates a run whose conditions were measured otherwise)."""
    if not (cfg.noise or cfg.shift):
        return []
    base = {"split": cfg.split, "stride": stride, "max_tokens": max_targets(cfg), "thresholds": thresholds(cfg)}
    return ([{"kind": "in_domain", **base}] + [{"kind": "noise", "p": p, "seed": cfg.noise_seed, **base}
                                               for p in cfg.noise]
            + [{"kind": "shift", "shift": s, **base} for s in cfg.shift])


def stale_conditions(have: list | None, cfg: EvalConfig, stride: int) -> str | None:
    """Why eval.json's conditions are not what these settings ask for (None when they are): other settings, or a
    shifted corpus prepared again since."""
    from shortcut import corpus

    want = wanted(cfg, stride)
    if [c.get("settings") for c in have or []] != want:
        return "its robustness conditions are missing or were measured with other settings"
    for c in have:
        try:
            now = corpus.read_meta(Path(c["corpus"])).get("content_hash")
        except UserError:
            now = None
        if now != c["data_hash"]:
            return f"the corpus of its condition {c['name']!r} changed or is gone"
    return None


def most_frequent(data: TokenData) -> int:
    """The run's most frequent training token, counted in chunks (a uint16 split need not be copied whole)."""
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    train = data.splits["train"]
    for i in range(0, len(train), 1 << 23):
        counts += np.bincount(np.asarray(train[i:i + (1 << 23)]), minlength=data.vocab_size)[:data.vocab_size]
    return int(counts.argmax())


def conditions(cfg: EvalConfig, data: TokenData, domain: dict) -> list[Condition]:
    """In-domain, each noise level and each shift (prepared now, once, with the run's tokenizer; an incompatible
    one is refused in one line before anything is scored)."""
    V = data.vocab_size
    out = [Condition("in-domain", "in_domain", data, cfg.split, V)]
    out += [Condition(f"noise p={p:g}", "noise", data, cfg.split, V, p=p, seed=cfg.noise_seed) for p in cfg.noise]
    if cfg.shift:
        from shortcut.prepare.shift import prepare_shift

        substitute = most_frequent(data)
        for spec in cfg.shift:
            shift = prepare_shift(spec, domain, data.meta, data.path, data.path.parent.parent)
            try:
                shifted = TokenData(shift.path, data.block_size)
            except UserError as exc:
                raise UserError(f"eval.shift={spec!r}: {exc}") from None
            name = f"{cfg.split}.bin"
            if shifted.meta.get("hashes", {}).get(name) == data.meta.get("hashes", {}).get(name):
                raise UserError(f"eval.shift={spec!r} describes the run's own corpus (its {cfg.split} split holds "
                                f"the same tokens); name another source")
            if shifted.vocab_size > V + 1:
                raise UserError(f"eval.shift={spec!r}: {shift.path} has ids up to {shifted.vocab_size - 1}, past the "
                                f"run's vocabulary of {V} (and its one reserved id): not this run's tokenizer")
            out.append(Condition(f"shift {spec}", "shift", shifted, cfg.split, V, shift=shift, substitute=substitute))
    return out


# --- measuring one condition ---

def _ece_bins(conf: torch.Tensor, hit: torch.Tensor) -> np.ndarray:
    """(3, ECE_BINS): tokens, summed confidence and summed hits per equal-width confidence bin."""
    b = (conf.double() * ECE_BINS).long().clamp(0, ECE_BINS - 1)
    return np.stack([torch.bincount(b, minlength=ECE_BINS).double().cpu().numpy(),
                     torch.bincount(b, conf.double(), minlength=ECE_BINS).cpu().numpy(),
                     torch.bincount(b, hit.double(), minlength=ECE_BINS).cpu().numpy()])


def ece(bins: np.ndarray) -> float | None:
    """Expected calibration error: sum over bins of |hits - confidence| / tokens."""
    n = bins[0].sum()
    return float(np.abs(bins[2] - bins[1]).sum() / n) if n else None


class Tally:
    """Per-window sums over one condition's scored tokens (the window is what the bootstrap resamples), exit
    counts per threshold, and the first SAMPLES windows token by token."""

    def __init__(self, windows: list, stride: int, thresholds: list[float]):
        T = windows[0][1]
        self.P = min(stride, T)  # the positions [T - P, T) every full window scores: within-position Spearman
        self.rect = {k for k, (_, length, first) in enumerate(windows) if length == T and first <= T - self.P}
        self.total, self.count, self.windows = 0.0, 0, len(windows)
        self.per_window = {"count": [], "nll": [], "profile": []}
        self.pos_depth, self.pos_loss, self.depth, self.loss = [], [], [], []
        self.exits = {t: {"early": 0, "unsafe": 0, "inc_early": 0.0, "inc_unsafe": 0.0, "nll": 0.0, "depth": 0.0,
                          "bins": np.zeros((3, ECE_BINS)), "agree_bins": np.zeros((3, ECE_BINS))} for t in thresholds}
        self.full_bins = np.zeros((3, ECE_BINS))
        self.samples: dict[str, list] = {}

    def add(self, k0: int, x, y, keep, nll, logits, profile, depth, outcomes, full_depth: int) -> None:
        """One batch of windows k0, k0 + 1, ...: inputs x, targets y, scored keep (B, T), the full model's nll and
        logits, the profile (B, T, K) and mean depth (B, T) or None, per threshold the exit outcomes
        (early_exit.confidence_details)."""
        self.total += nll[keep].sum().item()  # summed as shortcut.scoring.split_nll sums: the same number
        self.count += int(keep.sum())
        kf = keep.double()
        self.per_window["count"].append(kf.sum(1).cpu())
        self.per_window["nll"].append((nll.double() * kf).sum(1).cpu())
        probs = logits.float().softmax(-1)
        conf, top1 = probs.max(-1)
        self.full_bins += _ece_bins(conf[keep], (top1 == y)[keep])
        if profile is not None:
            self.per_window["profile"].append((profile.double() * kf[..., None]).sum(1).cpu())
            self.depth.append(depth[keep].cpu())
            self.loss.append(nll.double()[keep].cpu())
            rows = [b for b in range(x.size(0)) if k0 + b in self.rect]
            self.pos_depth.append(depth[rows, -self.P:].cpu())
            self.pos_loss.append(nll.double()[rows, -self.P:].cpu())
        for t, o in outcomes.items():
            self._add_exits(self.exits[t], o, keep, y, top1, nll, full_depth)
        self._keep_samples(k0, x, y, keep, nll, profile, outcomes)

    @staticmethod
    def _add_exits(acc: dict, o: dict, keep, y, full_top1, full_nll, full_depth: int) -> None:
        early = keep & (o["depth"] < full_depth)
        unsafe = early & (o["top1"] != full_top1)
        increase = o["nll"] - full_nll
        acc["early"] += int(early.sum())
        acc["unsafe"] += int(unsafe.sum())
        acc["inc_early"] += increase[early].double().sum().item()
        acc["inc_unsafe"] += increase[unsafe].double().sum().item()
        acc["nll"] += o["nll"][keep].double().sum().item()
        acc["depth"] += o["depth"][keep].double().sum().item()
        acc["bins"] += _ece_bins(o["confidence"][keep], (o["top1"] == y)[keep])
        acc["agree_bins"] += _ece_bins(o["confidence"][keep], (o["top1"] == full_top1)[keep])

    def _keep_samples(self, k0, x, y, keep, nll, profile, outcomes) -> None:
        n = max(0, min(x.size(0), SAMPLES - k0))
        if not n:
            return
        parts = {"inputs": x[:n], "targets": y[:n], "scored": keep[:n], "loss": nll[:n].float()}
        if profile is not None:
            parts["profile"] = profile[:n].float()
        if outcomes:
            parts["exit_depth"] = torch.stack([o["depth"][:n] for o in outcomes.values()], 1)  # (n, thresholds, T)
            parts["exit_confidence"] = torch.stack([o["confidence"][:n].float() for o in outcomes.values()], 1)
        for key, v in parts.items():
            self.samples.setdefault(key, []).append(v.cpu().numpy())


@torch.no_grad()
def measure(model: GPT, cond: Condition, cfg: EvalConfig, stride: int, ctx) -> tuple[dict, Tally]:
    """Score one condition: its record (without the comparison with in-domain) and its tally."""
    from shortcut.early_exit import confidence_details

    n_split = len(cond.data.splits[cond.split])
    windows = sliding_windows(n_split, cond.data.block_size, stride, max_targets(cfg))
    inputs, targets, scored = cond.arrays(max(s + length for s, length, _ in windows) + 1)
    levels = thresholds(cfg)
    full_depth = model.cfg.exit_depths()[-1] if levels else None
    weighs = model.weighs_layers
    tally = Tally(windows, stride, levels)
    info = None
    device = next(model.parameters()).device
    for i in range(0, len(windows), cfg.batch_size):
        chunk = windows[i:i + cfg.batch_size]
        T = chunk[0][1]
        x = torch.from_numpy(np.stack([inputs[s:s + T] for s, _, _ in chunk])).to(device)
        y = torch.from_numpy(np.stack([targets[s + 1:s + T + 1] for s, _, _ in chunk])).to(device)
        first = torch.tensor([f for _, _, f in chunk], device=device)
        keep = torch.arange(T, device=device)[None, :] >= first[:, None]
        if scored is not None:
            keep &= torch.from_numpy(np.stack([scored[s + 1:s + T + 1] for s, _, _ in chunk])).to(device)
        with ctx:
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        profile = depth = None
        if weighs:
            lw = model.layer_weights(x)
            profile, info = lw.pop("weights")[:, :, -1, :], lw  # the mix nearest the output: (B, T, sources)
            depth = profile.double() @ torch.tensor(info["sources"], dtype=torch.float64, device=device)  # (B, T)
        outcomes = {}
        for t in levels:
            with ctx:
                outcomes[t] = confidence_details(model, x, y, t)
        tally.add(i, x, y, keep, nll, logits, profile, depth, outcomes, full_depth)
    return _record(cond, tally, inputs, windows, info, model.cfg.n_layer, cfg), tally


# --- the numbers ---

def _record(cond: Condition, tally: Tally, inputs: np.ndarray, windows: list, info: dict | None, n_layer: int,
            cfg: EvalConfig) -> dict:
    if tally.count == 0:
        raise UserError(f"{cond.name}: no target of the {cond.split} split is scorable (every one lies outside the "
                        f"run's vocabulary)")
    rec = {"name": cond.name, "kind": cond.kind, "p": cond.p, "seed": cond.seed,
           "shift": cond.shift.spec if cond.shift else None, "split": cond.split, "corpus": str(cond.data.path),
           "data_hash": cond.data.content_hash, "n_tokens": tally.count, "n_windows": len(windows),
           "nll": tally.total / tally.count, "delta_nll": None,
           "inputs_hash": hashlib.sha256(np.ascontiguousarray(inputs).tobytes()).hexdigest()[:16]}
    if cond.kind == "noise":
        clean = np.asarray(cond.data.splits[cond.split][:len(inputs)], dtype=np.int64)
        rec["changed"] = float((inputs != clean).mean())  # the share of context tokens the noise changed
    if cond.kind == "shift":
        policy = (UNKNOWN_POLICY if cond.shift.meta.get("reserved_id") is not None else
                  "notes outside the pitch range never become tokens (miditok leaves them out): counted, not scored"
                  if cond.data.meta["domain"] == "music" else "nothing to leave out")
        rec["unknown"] = {**cond.shift.unknown(cond.split), "policy": policy,
                          "substitute_id": cond.substitute,
                          "unscored_targets": sum(length - f for _, length, f in windows) - tally.count}
    rec["depth"] = _depth(tally, info, n_layer, cfg) if info is not None else None
    rec["exits"] = _exits(tally) if tally.exits else None
    return rec


def _depth(tally: Tally, info: dict, n_layer: int, cfg: EvalConfig) -> dict:
    from scipy.stats import spearmanr

    from shortcut.audit import within_position_spearman

    sources = list(info["sources"])
    count = torch.cat(tally.per_window["count"]).sum().item()
    profile = (torch.cat(tally.per_window["profile"]).sum(0) / count).tolist()
    shallow = [i for i, l in enumerate(sources) if l < n_layer / 2]
    out = {"kind": info["kind"], "taps": sources, "normalised": bool(info.get("normalised")), "profile": profile,
           "shallow_taps": [sources[i] for i in shallow], "shift": None}
    if out["normalised"]:  # a distribution over taps: its expected layer and its mass on the lower half
        out["mean_depth"] = float(np.dot(profile, sources))
        out["shallow_mass"] = float(sum(profile[i] for i in shallow))
        depth, loss = torch.cat(tally.depth).numpy(), torch.cat(tally.loss).numpy()  # per scored token
        rho = spearmanr(depth, loss)[0] if len(depth) > 2 else float("nan")
        pos_d, pos_l = torch.cat(tally.pos_depth).numpy(), torch.cat(tally.pos_loss).numpy()
        pick = np.unique(np.linspace(0, len(pos_d) - 1, min(len(pos_d), cfg.audit_sequences)).round().astype(int))
        within = within_position_spearman(pos_d[pick], pos_l[pick]) if len(pick) > 1 else {
            "within_position_rho": None, "within_position_ci_low": None, "within_position_ci_high": None,
            "n_sequences": int(len(pick))}
        out["spearman_depth_vs_loss"] = {"rho": None if np.isnan(rho) else float(rho), **within,
                                         "positions": f"the last {tally.P} of each window (those every window scores)"}
    return out


def _exits(tally: Tally) -> dict:
    out = {"full_ece": ece(tally.full_bins), "thresholds": []}
    n = tally.count
    for t, a in tally.exits.items():
        out["thresholds"].append({
            "threshold": t, "early_share": a["early"] / n, "n_early": a["early"], "n_unsafe": a["unsafe"],
            "unsafe_share": a["unsafe"] / a["early"] if a["early"] else None,  # of the early exits
            "unsafe_rate": a["unsafe"] / n,  # of all scored tokens
            "nll_increase_unsafe": a["inc_unsafe"] / a["unsafe"] if a["unsafe"] else None,
            "nll_increase_early": a["inc_early"] / a["early"] if a["early"] else None,
            "nll": a["nll"] / n, "mean_exit_depth": a["depth"] / n,
            "ece": ece(a["bins"]), "ece_agreement": ece(a["agree_bins"])})
    return out


def _resample(n: int, seed: int) -> np.ndarray:
    """(N_BOOT, n): how often each of n windows is drawn when n are drawn with replacement."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=N_BOOT).astype(np.float64)


def _difference(base: tuple, other: tuple, paired: bool) -> list[dict]:
    """other's token-weighted means minus base's, per column, with 95% percentile intervals from resampling
    windows; base, other: (per-window sums (n, k), per-window token counts (n,)). Paired: the same draws for
    both (the same windows read two ways)."""
    (bs, bn), (os_, on) = base, other
    wb = _resample(len(bn), BOOT_SEED)
    wo = wb if paired else _resample(len(on), BOOT_SEED + 1)
    point = os_.sum(0) / on.sum() - bs.sum(0) / bn.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (wo @ os_) / (wo @ on)[:, None] - (wb @ bs) / (wb @ bn)[:, None]
    out = []
    for j in range(bs.shape[1]):
        b = boot[:, j][np.isfinite(boot[:, j])]
        lo, hi = np.quantile(b, [0.025, 0.975]) if len(b) and min(len(bn), len(on)) > 1 else (None, None)
        out.append({"delta": float(point[j]), "ci_low": None if lo is None else float(lo),
                    "ci_high": None if hi is None else float(hi)})
    return out


def depth_shift(base: Tally, other: Tally, record: dict, base_record: dict, paired: bool) -> dict:
    """How the condition's depth use differs from in-domain: per tap, on the shallow taps together, and in mean
    depth, each with a bootstrap interval over windows."""
    def parts(t: Tally, rec: dict):
        prof = torch.cat(t.per_window["profile"]).numpy()  # (n windows, K) summed mass
        n = torch.cat(t.per_window["count"]).numpy()
        sources = np.array(rec["depth"]["taps"], dtype=np.float64)
        shallow = np.isin(sources, rec["depth"]["shallow_taps"])
        return np.column_stack([prof, prof[:, shallow].sum(1), prof @ sources]), n

    diff = _difference(parts(base, base_record), parts(other, record), paired)
    K = len(record["depth"]["taps"])
    return {"vs": "in-domain", "paired": paired, "method": f"bootstrap over windows, {N_BOOT} resamples"
            + (", the same draws for both (the same windows)" if paired else ", drawn independently"),
            "profile": diff[:K], "shallow_mass": diff[K], "mean_depth": diff[K + 1]}


def measure_all(model: GPT, conds: list[Condition], cfg: EvalConfig, stride: int, audit_dir: Path, ctx) -> list[dict]:
    """Every condition's record for eval.json ("conditions"), and audit/conditions.npz (SAMPLES windows of each,
    token by token: what the model read, its loss, depth profile and exits)."""
    from shortcut import rundir

    records, tallies = [], []
    for cond in conds:
        record, tally = measure(model, cond, cfg, stride, ctx)
        records.append(record)
        tallies.append(tally)
    base = records[0]
    arrays = {"thresholds": np.array(thresholds(cfg))}
    def nll_parts(t: Tally):  # per-window summed NLL and token counts
        return torch.cat(t.per_window["nll"]).numpy()[:, None], torch.cat(t.per_window["count"]).numpy()

    for i, (rec, tally, cond) in enumerate(zip(records, tallies, conds)):
        rec["delta_nll"] = rec["nll"] - base["nll"]
        if cond.kind != "in_domain":  # within this run: resampling windows (paired for noise)
            rec["delta_nll_interval"] = _difference(nll_parts(tallies[0]), nll_parts(tally), cond.kind == "noise")[0]
        normalised = rec["depth"] is not None and rec["depth"]["normalised"]
        if normalised and cond.kind != "in_domain":
            rec["depth"]["shift"] = depth_shift(tallies[0], tally, rec, base, paired=cond.kind == "noise")
        rec["settings"] = wanted(cfg, stride)[i]
        rec["samples"] = {"file": f"{rundir.AUDIT}/{SAMPLES_FILE}", "prefix": f"c{i}_"}
        arrays.update({f"c{i}_{k}": np.concatenate(v) for k, v in tally.samples.items()})
        log.info("%s", headline(rec))
    audit_dir.mkdir(parents=True, exist_ok=True)
    tmp = audit_dir / f".{SAMPLES_FILE}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(audit_dir / SAMPLES_FILE)
    return records


def headline(rec: dict) -> str:
    parts = [f"{rec['name']}: NLL {rec['nll']:.4f} ({rec['delta_nll']:+.4f} vs in-domain) over {rec['n_tokens']:,} "
             f"tokens"]
    if rec.get("unknown"):
        parts.append(f"{100 * rec['unknown']['rate']:.2f}% {rec['unknown']['what']}")
    d = rec["depth"]
    if d and d.get("shallow_mass") is not None:
        sh = (d["shift"] or {}).get("shallow_mass")
        parts.append(f"shallow-tap mass {d['shallow_mass']:.3f}" + (
            f" ({sh['delta']:+.3f} [{_f(sh['ci_low'])}, {_f(sh['ci_high'])}])" if sh else ""))
    for e in (rec["exits"] or {}).get("thresholds", [])[-1:]:
        parts.append(f"at exit threshold {e['threshold']:g}: " + (
            f"{100 * e['early_share']:.1f}% exit early, {100 * e['unsafe_share']:.1f}% of them unsafe (top-1 not the "
            f"full model's)" if e["n_early"] else "no token exits early"))
    return "; ".join(parts)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


# --- the conditions in report.html ---

def report_views(model: GPT, conds: list[Condition], records: list[dict], cfg: EvalConfig, data: TokenData,
                 audit_dir: Path, run: dict | None = None) -> Path | None:
    """Add each shifted and noisy condition to the audit's report.html (written by the in-domain audit just
    before, or by an earlier evaluation of the same checkpoint), replacing any other shifted or noisy views, so
    its condition switch shows these and no others: the audit's measurement on the condition's own validation
    windows (the same starts as in-domain for noise, so a window reads token by token against its clean self; the
    shifted corpus' own for a shift), with the eval split's numbers of this module as the headline. The windows'
    count and length are the page's own (an earlier audit's, when this evaluation ran without eval.audit); run:
    the evaluation's record, for the header."""
    from shortcut import audit, report

    path = audit_dir / report.FILE
    if not path.exists():  # no audit of this checkpoint (evaluate removes another checkpoint's)
        return None
    doc = report.read(path)
    shape, caps = doc["identity"]["audit"], doc["caps"]
    labels = audit.describe_vocab(data)[0]
    views = []
    for cond, rec in zip(conds[1:], records[1:]):
        T = min(shape["seq_len"], len(cond.data.splits["val"]) - 1)  # a window reads T + 1 tokens
        if T < 2:
            log.warning("%s: its validation split is too short to show in report.html", cond.name)
            continue
        starts = cond.data.fixed_starts("val", shape["sequences"], T)
        inputs, targets, counts = cond.arrays(int(starts.max()) + T + 1, split="val")
        source = targets if counts is None else np.where(counts, targets, -1)  # -1: a symbol the run lacks
        x = torch.from_numpy(np.stack([inputs[s:s + T] for s in starts]))
        y = torch.from_numpy(np.stack([targets[s + 1:s + T + 1] for s in starts]))
        m = audit.measure(model, data, cfg, windows=(starts, x, y))
        m["source"] = np.stack([source[s:s + T + 1] for s in starts])
        n, W = min(caps["sequences"], len(starts)), min(caps["tokens"], T)  # as many as the in-domain view shows
        exits = audit.token_exits(model, x[:n, :W], y[:n, :W], cfg)
        taps = {"taps": list(model.taps) if model.shortcut else []}
        views.append(report.condition(cond.name, cond.kind, m, taps, labels, data, exits, n, W,
                                      note=_view_note(cond, rec), headline=_view_headline(rec)))
    return report.set_conditions(path, views, run)[0]


def _view_note(cond: Condition, rec: dict) -> str:
    what = (f"the validation windows of the in-domain view, each context token replaced with probability {cond.p:g} "
            f"(struck through: what the model read instead)" if cond.kind == "noise" else
            f"validation windows of {cond.data.meta['source']} ({cond.shift.spec}), read with the run's tokenizer")
    return f"{what}; the headline numbers are the {rec['split']} split's ({rec['n_tokens']:,} scored tokens)"


def _view_headline(rec: dict) -> dict:
    """The condition's numbers over its whole eval split, as eval.json records them."""
    def ci(d: dict | None) -> str:
        return "" if not d else f" [{_f(d.get('ci_low'))}, {_f(d.get('ci_high'))}]"

    out = {f"{rec['split']} NLL": f"{rec['nll']:.4f} ({rec['delta_nll']:+.4f}{ci(rec.get('delta_nll_interval'))} "
                                  f"vs in-domain)"}
    if rec.get("changed") is not None:
        out["context tokens changed"] = f"{100 * rec['changed']:.1f}%"
    if rec.get("unknown"):
        u = rec["unknown"]
        out["symbols the vocabulary lacks"] = f"{100 * u['rate']:.2f}% ({u['what']})"
    d = rec.get("depth")
    if d and d.get("shallow_mass") is not None:
        sh = (d.get("shift") or {}).get("shallow_mass")
        out["shallow-tap mass"] = f"{d['shallow_mass']:.3f}" + (f" ({sh['delta']:+.3f}{ci(sh)} vs in-domain)"
                                                                 if sh else "")
    for e in (rec.get("exits") or {}).get("thresholds", []):
        out[f"exits at threshold {e['threshold']:g}"] = (
            f"{100 * e['early_share']:.1f}% early, {100 * e['unsafe_share']:.1f}% of them unsafe"
            if e["n_early"] else "none early")
    return out
