"""`shortcut eval run_dir=DIR`: test NLL, perplexity and bits of a trained run, written to DIR/eval.json.

The split is scored with a sliding window (eval.stride, default block_size/2), as published text8, WikiText-103 and
MAESTRO numbers are: every token is predicted exactly once, and every token after the first window from at least
block_size - stride tokens of context. eval.json records what it measured (checkpoint weights, corpus, settings), so
a re-run over a sweep re-evaluates whatever changed and `shortcut compare` refuses a record that no longer matches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch

from shortcut import corpus, rundir
from shortcut.attention import runnable_impls
from shortcut.config import (
    AttnImpl,
    EvalConfig,
    EvalJob,
    ExitPolicy,
    ModelConfig,
    Precision,
    UserError,
    WandbConfig,
)
from shortcut.costs import flops_per_token
from shortcut.data import TokenData
from shortcut.model import GPT
from shortcut.rundir import Checkpoint, EvalRecord, Summary
from shortcut.runtime import autocast, effective_precision, pick_device
from shortcut.scoring import split_nll

log = logging.getLogger(__name__)


def load_run(run_dir: Path, device: torch.device | str = "cpu", data_root: str | None = None
             ) -> tuple[GPT, TokenData, Checkpoint]:
    """The trained model (eval mode), its corpus and the checkpoint it came from. A finished run is evaluated at
    its final checkpoint or not at all (an unreadable final checkpoint is not silently replaced by an older one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir={str(run_dir)!r} is not a directory")
    state = Checkpoint.latest(run_dir)
    if state is None:
        raise UserError(f"{run_dir} has no usable checkpoint in ckpt/ (train it first: shortcut train ...)")
    summary = Summary.read(run_dir)
    if summary is not None and state.weights_hash != summary.checkpoint_hash:
        if state.step < summary.step:
            raise UserError(f"the final checkpoint of {run_dir} (step {summary.step}) is missing or unreadable; the "
                            f"newest readable one is step {state.step}. Run the same `shortcut train` command again: "
                            f"it resumes from there and rebuilds it")
        raise UserError(f"the checkpoint at step {state.step} of {run_dir} ({Path(state.path).name}) holds weights "
                        f"{state.weights_hash}, but its summary.json names {summary.checkpoint_hash}: it is not this "
                        f"run's checkpoint (copied from another run?); restore the run's own checkpoint, or train "
                        f"it again with train.resume=false")
    mcfg = ModelConfig(**state.model_config)
    if mcfg.attn_impl not in runnable_impls(torch.device(device).type):  # how the training device computed it
        mcfg = replace(mcfg, attn_impl=AttnImpl.auto)  # (flex on a GPU, chunked on a CPU): the same function
    data_dir = Path(state.data_dir)
    if data_root is not None:  # the corpora moved: the same settings' folder under the new root
        data_dir = corpus.locate(data_root, state.config["domain"])
    elif not (data_dir / corpus.META).is_file():
        data_dir = corpus.locate(state.config["data"]["root"], state.config["domain"])
    data = TokenData(data_dir, mcfg.block_size)
    if state.data_hash != data.content_hash:
        raise UserError(f"the corpus at {data.path} changed since {run_dir} was trained (hash {state.data_hash} "
                        f"then, {data.content_hash} now); prepare the original corpus again")
    model = GPT(mcfg)
    model.load_state_dict(state.model)
    return model.to(device).eval(), data, state


def resolved_stride(cfg: EvalConfig, block_size: int, where: Path) -> int:
    stride = cfg.stride or max(1, block_size // 2)
    if stride > block_size:
        raise UserError(f"eval.stride={stride} is longer than the run's model.block_size={block_size} ({where}); "
                        f"use eval.stride={block_size} (non-overlapping windows) or less")
    return stride


def evaluate(job: EvalJob) -> dict:
    """Evaluate run_dir; if it is not a run but a folder of runs (a sweep), every finished run under it whose
    eval.json does not already describe its final checkpoint with these settings, naming every run dir it skips
    and why. Returns the result (or {run dir: result} for a folder)."""
    root = Path(job.run_dir)
    if not (root.is_dir() and not (root / rundir.CKPT).is_dir()):
        return evaluate_run(job)
    runs, skipped = find_runs(root)
    for run, why in skipped.items():
        log.warning("%s: skipped: %s", run, why)
    if not runs:
        raise UserError(f"{root} is neither a run dir (no ckpt/) nor a folder of finished runs" + (
            f"; skipped {len(skipped)}: " + "; ".join(f"{r} ({why})" for r, why in skipped.items()) if skipped else ""))
    results, problems = {}, []
    for run in runs:
        try:
            why = needs_eval(run, job.eval)
            if why is None:
                log.info("%s: eval.json is up to date", run)
                continue
            log.info("%s: evaluating (%s)", run, why)
            results[str(run)] = evaluate_run(replace(job, run_dir=str(run)))
        except UserError as exc:  # one bad run does not stop the others; all are named at the end
            problems.append(str(exc))
    if problems:
        raise UserError(f"{len(problems)} of {len(runs)} run(s) could not be evaluated: " + "; ".join(problems))
    return results


def find_runs(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """The finished runs under root (summary.json and ckpt/), and every other run dir there with why it is not
    evaluated (unfinished, failed, or without checkpoints)."""
    found = {p.parent for name in (rundir.SUMMARY, rundir.FAILED) for p in root.glob(f"**/{name}")}
    found |= {p.parent for p in root.glob(f"**/{rundir.CKPT}") if p.is_dir()}
    runs, skipped = [], {}
    for d in sorted(found):
        has_ckpt = bool(Checkpoint.paths(d))
        if (d / rundir.SUMMARY).is_file() and (d / rundir.CKPT).is_dir():
            runs.append(d)
        elif rundir.failed_message(d) is not None:
            skipped[d] = f"its training failed ({rundir.failed_message(d)})"
        elif (d / rundir.SUMMARY).is_file() or not has_ckpt:
            skipped[d] = "it has no checkpoint in ckpt/ to score"
        else:
            step, max_steps = checkpoint_progress(Checkpoint.paths(d)[-1])
            skipped[d] = (f"unfinished: its newest checkpoint is step {step}{f' of {max_steps}' if max_steps else ''}"
                          f" and it has no summary.json (stopped or killed); run its `shortcut train` command again "
                          f"to finish it, or score this checkpoint with `shortcut eval run_dir={d}`")
    return runs, skipped


def checkpoint_progress(path: Path) -> tuple[int | str, int | None]:
    """(step, the run's max_steps) of a checkpoint file, read without loading its tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"]), state.get("max_steps") or state["config"]["train"].get("max_steps")
    except Exception:  # noqa: BLE001 - an unreadable file: its name still says the step
        return path.stem.removeprefix("step_").lstrip("0") or "0", None


def run_length(state: Checkpoint, summary: Summary | None) -> int | None:
    """The number of steps the run trains for: recorded in new checkpoints; older ones give the configured
    max_steps unless a FLOP budget set it."""
    if state.max_steps is not None:
        return state.max_steps
    if summary is not None:
        return summary.max_steps
    train = state.config.get("train", {})
    return None if train.get("flops_budget") or train.get("match_flops") else train.get("max_steps")


def needs_eval(run: Path, cfg: EvalConfig) -> str | None:
    """Why run's eval.json must be (re)computed with these settings, or None when it is current."""
    summary = Summary.read(run)
    try:
        record = EvalRecord.read(run)
    except UserError:
        return "its eval.json is from another version"
    if record is None:
        return "no eval.json yet"
    stale = record.stale_reason(summary)
    if stale:
        return stale
    want = {"split": cfg.split, "stride": resolved_stride(cfg, summary.model["block_size"], run),
            "max_tokens": cfg.max_tokens, "precision": effective_precision(Precision.auto, pick_device(cfg.device))}
    if record.settings() != want:
        return f"it was measured with {record.settings()}, now {want}"
    depth = rundir.read_depth(run)
    if cfg.audit and (depth is None or depth.get("checkpoint_hash") != summary.checkpoint_hash):
        return "its audit is missing or belongs to another checkpoint"
    if cfg.exit != ExitPolicy.none:
        want = exit_settings(cfg)
        have = {k: (record.exit or {}).get(k) for k in want}
        if have != want:
            return f"its early-exit curves were measured with {have}, now {want}"
    if cfg.noise or cfg.shift:
        from shortcut.robustness import stale_conditions

        why = stale_conditions(record.conditions, cfg, resolved_stride(cfg, summary.model["block_size"], run))
        if why:
            return why
    if cfg.decode_tokens:
        from shortcut.adaptive import decode_settings

        if (record.decode or {}).get("settings") != decode_settings(cfg):
            return "its decoding speeds are missing or were measured with other settings"
    return None


def adaptive_figures(model: GPT, data: TokenData, cfg: EvalConfig, stride: int, record: EvalRecord, ctx) -> None:
    """A routed model's training-rule NLL and causal shares; decoding speeds (eval.decode_tokens)."""
    from shortcut import adaptive

    if model.cfg.mod_capacity is not None:
        record.routing = adaptive.routing_figures(model, data, cfg, stride, ctx)
        log.info("routing: causal NLL %.4f (evaluation), training-rule (top-k) NLL %.4f; causal shares %s of "
                 "capacity %s", record.nll, record.routing["train_mode_nll"],
                 [round(s, 3) for s in record.routing["causal_share"]], model.cfg.mod_capacity)
    if cfg.decode_tokens:
        record.decode = adaptive.decode_figures(model, data, cfg)
        log.info("decoding %s tokens: %s", cfg.decode_tokens, ", ".join(
            f"{k} {v['tokens_per_s']:,.0f} tok/s (x{v['speedup']:.2f})" for k, v in record.decode.items()
            if isinstance(v, dict) and "tokens_per_s" in v))


def exit_settings(cfg: EvalConfig) -> dict:
    return {"policy": str(cfg.exit), "thresholds": list(cfg.exit_thresholds), "max_tokens": cfg.exit_max_tokens}


def evaluate_run(job: EvalJob) -> dict:
    cfg, run_dir = job.eval, Path(job.run_dir)
    device = pick_device(cfg.device)
    model, data, state = load_run(run_dir, device, job.data_root)
    stride = resolved_stride(cfg, model.cfg.block_size, run_dir)
    if cfg.exit != ExitPolicy.none:  # before any work: a variant has no exits
        from shortcut.early_exit import check_supported

        check_supported(model, run_dir)
    conditions = None
    if cfg.noise or cfg.shift:  # shifted corpora prepared (or refused) before anything is scored
        from shortcut import robustness

        conditions = robustness.conditions(cfg, data, state.config["domain"])
    total, n, mean_context = split_nll(model, data, cfg.split, stride, cfg.max_tokens, cfg.batch_size,
                                       autocast(device, Precision.auto))
    nll, units = total / n, per_unit(total, n, data.meta, cfg.split)
    finished, max_steps = _progress(run_dir, state)
    record = EvalRecord(split=cfg.split, nll=nll, n_tokens=n, stride=stride, mean_context=mean_context,
                        max_tokens=cfg.max_tokens, checkpoint_step=state.step, checkpoint_hash=state.weights_hash,
                        checkpoint=state.path, data_hash=data.content_hash,
                        flops_per_token=flops_per_token(model.cfg).forward, domain=data.meta["domain"],
                        source=data.meta["source"], tokenizer=data.meta["tokenizer"], units=units,
                        precision=effective_precision(Precision.auto, device), max_steps=max_steps, finished=finished)
    record.audit = _audit(model, data, cfg, run_dir, state, record.to_dict())
    if cfg.exit != ExitPolicy.none:
        record.exit = early_exits(model, data, cfg, stride, run_dir, state, autocast(device, Precision.auto))
    else:  # curves of an earlier evaluation must not sit beside this one
        for name in (rundir.EXIT_CURVE, "exit_curve.png"):
            (run_dir / rundir.AUDIT / name).unlink(missing_ok=True)
    adaptive_figures(model, data, cfg, stride, record, autocast(device, Precision.auto))
    if conditions is not None:
        record.conditions = robustness.measure_all(model, conditions, cfg, stride, run_dir / rundir.AUDIT,
                                                   autocast(device, Precision.auto))
    _report_views(model, conditions, record, cfg, data, run_dir / rundir.AUDIT)
    record.write(run_dir)
    result = record.to_dict()
    track(run_dir, state, result)
    log.info("%s NLL %.4f nats/token, ppl %.3f, %.4f bits/token%s over %s tokens (stride %d, mean context %.0f) -> %s",
             cfg.split, nll, math.exp(nll), result["bits_per_token"],
             "".join(f", {v['bits']:.4f} bits/{u}" for u, v in units.items()), f"{n:,}", stride, mean_context,
             run_dir / rundir.EVAL)
    return result


def _report_views(model: GPT, conditions: list | None, record: EvalRecord, cfg: EvalConfig, data: TokenData,
                  audit_dir: Path) -> None:
    """report.html's condition views become this evaluation's: its shifted and noisy conditions, or none, so that
    views and samples of an earlier evaluation never sit beside this one. A page that cannot be updated (an older
    format) is left, with a warning: the evaluation itself is not lost for it."""
    from shortcut import report, robustness

    if conditions is None:
        (audit_dir / "conditions.npz").unlink(missing_ok=True)
    try:
        if conditions is not None:
            robustness.report_views(model, conditions, record.conditions, cfg, data, audit_dir, record.to_dict())
        elif (audit_dir / report.FILE).exists():
            report.set_conditions(audit_dir / report.FILE, [], record.to_dict())
    except UserError as e:
        log.warning("report.html not updated with this evaluation's conditions: %s", e)


def per_unit(total: float, n: int, meta: dict, split: str) -> dict:
    """NLL per unit of the domain (character of text, note of music, second of audio): total nats over the units
    the n scored tokens cover (the split's units in proportion; exact for char-level text, where a token is a unit)."""
    units = {}
    for unit, counts in meta.get("units", {}).items():
        if counts.get(split):
            covered = counts[split] * n / meta["tokens"][split]
            units[unit] = {"nll": total / covered, "bits": total / covered / math.log(2)}
    return units


def _progress(run_dir: Path, state: Checkpoint) -> tuple[bool, int | None]:
    """Whether the run had finished, and its length; an unfinished run's number is not its final one: say so."""
    summary = Summary.read(run_dir)
    finished, max_steps = summary is not None and summary.finished, run_length(state, summary)
    if not finished:  # e.g. killed or stopped at step 50 of 200
        log.warning("%s is unfinished: scored its checkpoint at step %d of %s (%s); run its `shortcut train` command "
                    "again to finish it", run_dir, state.step, max_steps or "?",
                    "it has no summary.json" if summary is None else "its summary.json says it did not finish")
    return finished, max_steps


def _audit(model: GPT, data: TokenData, cfg: EvalConfig, run_dir: Path, state: Checkpoint,
           run: dict | None = None) -> dict | None:
    """eval.audit's figures for eval.json (the audit writes audit/, report.html with the run's record `run`);
    without eval.audit, an audit of another model is removed, so that it never sits beside this evaluation."""
    audit_dir = run_dir / rundir.AUDIT
    depth = rundir.read_depth(run_dir)
    if cfg.audit:
        from shortcut.audit import audit

        found = audit(model, data, audit_dir, cfg, checkpoint_hash=state.weights_hash, run=run)
        return {k: found[k] for k in ("taps", "mean_profile", "mean_depth", "spearman_depth_vs_loss", "pictures",
                                      "logit_lens_nll", "layer_weights", "blocks_run") if k in found}
    if depth is not None and depth.get("checkpoint_hash") != state.weights_hash:
        import shutil

        shutil.rmtree(audit_dir)
    return None


def early_exits(model: GPT, data: TokenData, cfg: EvalConfig, stride: int, run_dir: Path, state: Checkpoint,
                ctx) -> dict:
    """eval.exit's curves, written to audit/exit_curve.json and exit_curve.png; returned for eval.json."""
    from shortcut import early_exit

    curve = {**early_exit.exit_curve(model, data, cfg, stride, ctx), **exit_settings(cfg),
             "checkpoint_hash": state.weights_hash}
    audit_dir = run_dir / rundir.AUDIT
    audit_dir.mkdir(exist_ok=True)
    rundir.write_json(audit_dir / rundir.EXIT_CURVE, curve)
    png = early_exit.plot_curves({str(model.cfg.arch): [curve]}, audit_dir / "exit_curve.png",
                                 f"{run_dir.name}: early exit ({cfg.split}, {curve['n_tokens']:,} tokens)")
    curve["pictures"] = [str(png)]
    log.info("%s early exit: %s", run_dir, early_exit.headline(curve))
    return curve


def track(run_dir: Path, state: Checkpoint, result: dict) -> None:
    """Log the evaluation (scalars and audit pictures) to the run's own W&B run, when it tracks one."""
    from shortcut.tracking import open_tracker

    saved = state.config.get("wandb") or {}
    tracker = open_tracker(WandbConfig(**saved), run_dir, name=run_dir.name, config=None)
    try:
        scalars = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("format", "step", "checkpoint_step")}
        tracker.log(scalars, state.step)
        tracker.summary(scalars)
        pictures = [*(result.get("audit") or {}).get("pictures", []), *(result.get("exit") or {}).get("pictures", [])]
        tracker.images({f"audit/{Path(p).stem}": Path(p) for p in pictures}, state.step)
        tracker.html({"audit/report": run_dir / rundir.AUDIT / "report.html"}, state.step)
    finally:
        tracker.finish()
