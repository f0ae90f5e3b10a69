"""`shortcut train`: the training loop, checkpoints and exact resume.

The run dir holds config.yaml (resolved), metrics.jsonl, summary.json and ckpt/. A checkpoint holds everything the
loop's future depends on (weights, optimizer, step, RNG); the learning rate and the batches are pure functions of
the step, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from shortcut import corpus
from shortcut.config import ModelConfig, TrainConfig, TrainJob, UserError
from shortcut.data import TokenData
from shortcut.model import GPT, flops_per_token, match_params, param_counts
from shortcut.runtime import autocast, make_optimizer, model_device, peak_flops, pick_device
from shortcut.tracking import MetricsLog, open_tracker

log = logging.getLogger(__name__)

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to min_lr at max_steps: a pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def plain(obj) -> dict:
    """A config dataclass as JSON-ready dicts and strings (enums as their names)."""
    return json.loads(json.dumps(asdict(obj), default=str))


def resolve_model(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """Fill in what depends on the data (vocab size) and apply parameter matching."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={cfg.vocab_size} is smaller than the corpus vocabulary ({vocab_size})")
    return match_params(replace(cfg, vocab_size=cfg.vocab_size or vocab_size))


# --- checkpoints ---

def save_checkpoint(ckpt_dir: Path, state: dict, keep: int) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{state['step']:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def load_latest_checkpoint(ckpt_dir: Path) -> dict | None:
    """The newest checkpoint that loads; a corrupt one is reported and the one before it used."""
    for path in sorted(ckpt_dir.glob("step_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state["path"] = str(path)
            return state
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, loudly
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path,
                        type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
    return None


# --- the loop ---

def evaluate_windows(model, data: TokenData, split: str, starts, batch_size: int, ctx) -> float:
    """Mean next-token loss (nats) over fixed windows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            x, y = data.windows(split, starts[i:i + batch_size])
            x, y = x.to(model_device(model)), y.to(model_device(model))
            with ctx:
                _, loss, _ = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    model.train()
    return total / count


def train(job: TrainJob, run_dir: Path, resolved_yaml: str | None = None, labels: dict | None = None) -> dict:
    """Train (or resume, or skip a finished run) in run_dir. labels (the CLI's config choices and overrides) go
    into summary.json so `shortcut compare` can name the variant."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = job.train
    data_dir = corpus.corpus_dir(job.data.root, job.domain.name, job.domain.source)
    data = TokenData(data_dir, job.model.block_size)
    if data.meta["tokenizer"] != str(job.domain.tokenizer):
        raise UserError(f"the corpus at {data_dir} was prepared with tokenizer={data.meta.get('tokenizer')}, not "
                        f"domain.tokenizer={job.domain.tokenizer}; prepare it again with this tokenizer")
    mcfg = resolve_model(job.model, data.vocab_size)
    device = pick_device(cfg.device)
    ctx = autocast(device, cfg.precision)

    ckpt_dir = run_dir / "ckpt"
    state = None
    if cfg.resume is not False:
        state = load_latest_checkpoint(ckpt_dir)
        if cfg.resume and state is None:
            raise UserError(f"train.resume=true but {ckpt_dir} has no usable checkpoint")
    job_dict = plain(job)
    if state is not None:
        saved = state["config"]
        # Where the inputs came from does not matter once prepared; the corpus itself must be the same.
        differ = sorted(_diff(saved, job_dict, ignore={"train.resume", "wandb", "domain.files", "domain.path"}))
        if state["data_hash"] != data.meta["content_hash"]:
            differ.append(f"the corpus at {data_dir} (data hash {state['data_hash']} then, "
                          f"{data.meta['content_hash']} now)")
        if differ:
            raise UserError(f"{run_dir} holds a run with other settings ({', '.join(differ[:5])}); choose another "
                            f"hydra.run.dir or train.resume=false to start over there")
        if int(state["step"]) >= cfg.max_steps and (run_dir / "summary.json").is_file():
            log.info("%s already finished (step %d of %d); nothing to train", run_dir, state["step"], cfg.max_steps)
            return json.loads((run_dir / "summary.json").read_text())
    elif ckpt_dir.exists():
        for old in ckpt_dir.glob("step_*.pt"):
            old.unlink()  # train.resume=false: start over

    torch.manual_seed(job.seed)
    model = GPT(mcfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step = int(state["step"])
        log.info("resumed from %s (step %d)", state["path"], step)
    fwd_model = torch.compile(model) if cfg.compile and device.type == "cuda" else model

    if resolved_yaml is not None:
        (run_dir / "config.yaml").write_text(resolved_yaml)
    counts = param_counts(mcfg)
    flops = flops_per_token(mcfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * mcfg.block_size
    peak = peak_flops(device)
    summary = {
        "domain": job.domain.name, "source": str(job.domain.source), "tokenizer": data.meta.get("tokenizer"),
        "arch": str(mcfg.arch), "model": plain(mcfg), **counts,
        "flops_per_token": flops["forward"], "train_flops_per_token": flops["train"], "seed": job.seed,
        "data_hash": data.meta["content_hash"], "data_dir": str(data_dir), "git_commit": git_commit(),
        "device": str(device), "max_steps": cfg.max_steps, "model_choice": str(job.model.arch), "overrides": [],
        **(labels or {}),
    }
    log.info("%s: %s params (%s non-embedding), %.3g FLOPs/token, taps %s", mcfg.arch, f"{counts['params']:,}",
             f"{counts['non_embedding_params']:,}", flops["forward"],
             mcfg.tap_layers() if mcfg.arch == "shortcut" else "-")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step)
    val_starts = data.fixed_starts("val", cfg.eval_windows)
    tracker = open_tracker(job.wandb, run_dir, name=run_dir.name, config=job_dict)
    best = state["best_val_loss"] if state else float("inf")
    last_val = state.get("last_val_loss") if state else None
    prior_wall, train_time = (float(state["wall_time"]), float(state["train_time"])) if state else (0.0, 0.0)
    session_start = time.perf_counter()
    failed = True
    try:
        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {mcfg.arch}", unit="step", dynamic_ncols=True,
                   mininterval=0.2 if sys.stderr.isatty() else 15)  # logs of sweeps stay readable
        t0, interval_tokens = time.perf_counter(), 0
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = data.train_batch(job.seed, step, micro, cfg.batch_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with ctx:
                    _, loss, _ = fwd_model(x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            train_loss = float(loss_sum) / cfg.grad_accum
            if not math.isfinite(train_loss):
                latest = sorted(ckpt_dir.glob("step_*.pt"))
                raise UserError(f"training loss became {train_loss} at step {step + 1}; stopped. The last good "
                                f"checkpoint is {latest[-1] if latest else 'none (none was written yet)'}; "
                                f"try a lower train.lr")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_tokens += tokens_per_step
            bar.update(1)
            val_loss = None
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                train_time += elapsed
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    val_loss = last_val = evaluate_windows(model, data, "val", val_starts, cfg.batch_size, ctx)
                    best = min(best, val_loss)
                tok_s = interval_tokens / elapsed if elapsed > 0 else None
                row = {"step": step, "tokens": step * tokens_per_step,
                       "train_flops": step * tokens_per_step * flops["train"], "train_loss": train_loss,
                       "val_loss": val_loss, "lr": lr, "tokens_per_s": tok_s,
                       "mfu": tok_s * flops["train"] / peak if peak and tok_s else None}
                metrics.append(row)
                tracker.log(row, step)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}" if tok_s else "-",
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
                t0, interval_tokens = time.perf_counter(), 0  # validation time stays out of tokens/s
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                save_checkpoint(ckpt_dir, {
                    "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    **({"rng_cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
                    "best_val_loss": best, "last_val_loss": last_val, "train_time": train_time,
                    "wall_time": prior_wall + time.perf_counter() - session_start,
                    "config": job_dict,
                    "model_config": summary["model"], "train_loss": train_loss, "data_hash": summary["data_hash"],
                }, cfg.keep_ckpts)
        bar.close()
        summary.update({"step": step, "final_val_loss": last_val, "best_val_loss": best if best < float("inf") else None,
                        "train_time_s": train_time, "wall_time_s": prior_wall + time.perf_counter() - session_start,
                        "finished": step >= cfg.max_steps})
        write_json(run_dir / "summary.json", summary)
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        log.info("done: step %d, val loss %s, run dir %s", step, f"{last_val:.4f}" if last_val else "-", run_dir)
        failed = False
        return summary
    finally:
        tracker.finish(failed=failed)


def _diff(a, b, ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (ignoring the given keys and sub-trees)."""
    if prefix.rstrip(".") in ignore:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in _diff(a.get(key), b.get(key), ignore, f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
