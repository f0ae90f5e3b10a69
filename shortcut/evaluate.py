"""`shortcut eval run_dir=DIR`: test NLL, perplexity and bits of a trained run, written to DIR/eval.json.

The whole split is covered by non-overlapping windows of block_size tokens (the last one shorter), so every token
is predicted once, from up to block_size - 1 tokens of context.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from shortcut import corpus
from shortcut.config import EvalJob, ModelConfig, Precision, UserError
from shortcut.data import TokenData
from shortcut.model import GPT, flops_per_token
from shortcut.runtime import autocast, pick_device
from shortcut.train import load_latest_checkpoint, write_json

log = logging.getLogger(__name__)


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[GPT, TokenData, dict]:
    """The trained model (eval mode), its corpus and the checkpoint it came from."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir={str(run_dir)!r} is not a directory")
    state = load_latest_checkpoint(run_dir / "ckpt")
    if state is None:
        raise UserError(f"{run_dir} has no usable checkpoint in ckpt/ (train it first: shortcut train ...)")
    mcfg = ModelConfig(**state["model_config"])
    job = state["config"]
    data = TokenData(corpus.corpus_dir(job["data"]["root"], job["domain"]["name"], job["domain"]["source"]),
                     mcfg.block_size)
    model = GPT(mcfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), data, state


def nll_windows(n_tokens: int, block_size: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """(start, length) of non-overlapping windows predicting tokens 1..n-1 (at most max_tokens of them)."""
    targets = n_tokens - 1 if max_tokens is None else min(n_tokens - 1, max_tokens)
    return [(s, min(block_size, targets - s)) for s in range(0, targets, block_size)]


@torch.no_grad()
def split_nll(model: GPT, data: TokenData, split: str, max_tokens: int | None, batch_size: int, ctx) -> tuple[float, int]:
    """Summed next-token NLL (nats) over a split and the number of tokens it covers."""
    windows = nll_windows(len(data.splits[split]), data.block_size, max_tokens)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    by_length: dict[int, list[int]] = {}
    for start, length in windows:
        by_length.setdefault(length, []).append(start)
    for length, starts in by_length.items():
        for i in range(0, len(starts), batch_size):
            x, y = data.windows(split, starts[i:i + batch_size], length)
            with ctx:
                logits, _, _ = model(x.to(device))
            total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
            count += y.numel()
    return total, count


def evaluate(job: EvalJob) -> dict:
    """Evaluate run_dir; if it is not a run but a folder of runs (a sweep), every finished run under it, skipping
    those whose eval.json already belongs to their latest checkpoint. Returns the result (or {run dir: result})."""
    root = Path(job.run_dir)
    if root.is_dir() and not (root / "ckpt").is_dir():
        runs = sorted(p.parent for p in root.glob("**/summary.json") if (p.parent / "ckpt").is_dir())
        if not runs:
            raise UserError(f"{root} is neither a run dir (no ckpt/) nor a folder of finished runs")
        results = {}
        for run in runs:
            done = run / "eval.json"
            summary = json.loads((run / "summary.json").read_text())
            previous = json.loads(done.read_text()) if done.is_file() else {}
            if [previous.get(k) for k in ("step", "split", "max_tokens")] == [summary.get("step"), job.eval.split,
                                                                              job.eval.max_tokens]:
                log.info("%s: eval.json is up to date", run)
                continue
            results[str(run)] = evaluate_run(replace(job, run_dir=str(run)))
        return results
    return evaluate_run(job)


def evaluate_run(job: EvalJob) -> dict:
    cfg = job.eval
    device = pick_device(cfg.device)
    model, data, state = load_run(Path(job.run_dir), device)
    trained_on = state["data_hash"]
    if trained_on != data.meta["content_hash"]:
        raise UserError(f"the corpus at {data.path} changed since this run was trained (hash {trained_on} then, "
                        f"{data.meta['content_hash']} now); prepare the original corpus again")
    total, n = split_nll(model, data, cfg.split, cfg.max_tokens, cfg.batch_size, autocast(device, Precision.auto))
    nll = total / n
    result = {
        "split": cfg.split, f"{cfg.split}_nll": nll, f"{cfg.split}_ppl": math.exp(nll),
        "bits_per_token": nll / math.log(2), "n_tokens": n, "flops_per_token": flops_per_token(model.cfg)["forward"],
        "step": int(state["step"]), "max_tokens": cfg.max_tokens, "checkpoint": state["path"],
        "data_hash": data.meta["content_hash"],
        "domain": data.meta["domain"], "source": data.meta["source"], "tokenizer": data.meta["tokenizer"],
    }
    # Per unit of the domain (character of text, note of music, second of audio): the split's tokens per unit
    # times the per-token figure, which is exact for the whole split and an estimate under eval.max_tokens.
    for unit, counts in data.meta.get("units", {}).items():
        if counts.get(cfg.split):
            tokens_per_unit = data.meta["tokens"][cfg.split] / counts[cfg.split]
            result[f"nll_per_{unit}"] = nll * tokens_per_unit
            result[f"bits_per_{unit}"] = result["bits_per_token"] * tokens_per_unit
    if cfg.audit:
        from shortcut.audit import audit

        depth = audit(model, data, Path(job.run_dir) / "audit", cfg)
        result["audit"] = {k: depth[k] for k in ("mean_profile", "mean_depth", "spearman_depth_vs_loss", "pictures",
                                                 "logit_lens_nll") if k in depth}
    write_json(Path(job.run_dir) / "eval.json", result)
    log.info("%s NLL %.4f nats/token, ppl %.3f, %.4f bits/token%s over %s tokens -> %s", cfg.split, nll,
             math.exp(nll), result["bits_per_token"],
             "".join(f", {v:.4f} {k.replace('_per_', '/')}" for k, v in result.items() if k.startswith("bits_per_")
                     and k != "bits_per_token"), f"{n:,}",
             Path(job.run_dir) / "eval.json")
    return result

