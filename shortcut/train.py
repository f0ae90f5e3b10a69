"""`shortcut train`: the training loop, checkpoints and exact resume.

The run dir (shortcut.rundir) holds config.yaml, metrics.jsonl, summary.json and ckpt/. A checkpoint holds
everything the loop's future depends on (weights, optimizer, step, RNG); the learning rate and the batches are pure
functions of the step, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

import torch
from tqdm import tqdm

from shortcut import corpus, diskio, rundir
from shortcut.attention import resolve_attn_impl
from shortcut.config import Arch, ModelConfig, TrainConfig, TrainJob, UserError
from shortcut.data import TokenData
from shortcut.costs import FlopsPerToken, flops_per_token, match_params, param_counts
from shortcut.model import GPT
from shortcut.rundir import Checkpoint, Summary
from shortcut.runtime import (Dist, allow_fast_math, autocast, close_distributed, effective_precision, init_distributed,
                              make_optimizer, model_device, peak_flops, pick_device)
from shortcut.stop import CHAIN, STOP, Stopped, Watch, name as signal_name
from shortcut.tracking import MetricsLog, Tracker, open_tracker

log = logging.getLogger(__name__)


class RunRefused(UserError):
    """The run dir belongs to another trainer or another run: refused before anything in it changed."""


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


def plain(obj) -> dict:
    """A config dataclass as JSON-ready dicts and strings (enums as their names)."""
    return json.loads(json.dumps(asdict(obj), default=str))


def resolve_model(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """Fill in what depends on the data (vocab size) and apply parameter matching."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={cfg.vocab_size} is smaller than the corpus vocabulary ({vocab_size})")
    return match_params(replace(cfg, vocab_size=cfg.vocab_size or vocab_size))


@dataclass
class Match:
    """The configuration whose training FLOPs train.match_flops spends: its (unresolved) model and its max_steps."""
    model: ModelConfig
    max_steps: int


def effective_train(cfg: TrainConfig, mcfg: ModelConfig, vocab_size: int, match: Match | None) -> TrainConfig:
    """The train config with max_steps set by a FLOP budget (train.flops_budget or train.match_flops)."""
    per_step = cfg.batch_size * cfg.grad_accum * mcfg.block_size * flops_per_token(mcfg).train
    budget = cfg.flops_budget
    if cfg.match_flops is not None:
        if match is None:
            raise UserError(f"train.match_flops={cfg.match_flops} needs the command line (shortcut train ...) to "
                            f"compose model={cfg.match_flops}; or give train.flops_budget")
        other = resolve_model(match.model, vocab_size)
        budget = match.max_steps * cfg.batch_size * cfg.grad_accum * other.block_size * flops_per_token(other).train
    if budget is None:
        return cfg
    steps = int(budget // per_step)
    if steps < 1:
        raise UserError(f"train.flops_budget={budget:.3g} is less than one step of this model ({per_step:.3g} FLOPs)")
    return replace(cfg, max_steps=steps)


# --- resume or start over ---

def resume_or_reset(job: TrainJob, run_dir: Path, data: TokenData, dist: Dist = Dist()) -> Checkpoint | None:
    """The checkpoint to resume from, or None after clearing everything an earlier model left in run_dir."""
    cfg = job.train
    state = Checkpoint.latest(run_dir) if cfg.resume is not False else None
    if cfg.resume and state is None:
        raise UserError(f"train.resume=true but {run_dir / rundir.CKPT} has no usable checkpoint")
    dist.barrier()  # every process has read the checkpoint before the first one clears the directory
    if state is None:
        removed = rundir.reset(run_dir) if dist.main else []
        if removed:
            log.info("fresh start in %s: removed %s", run_dir, ", ".join(removed))
        return None
    # Where the inputs came from does not matter once prepared; the corpus itself must be the same.
    differ = _diff(state.config, plain(job), ignore=RESUME_IGNORES)
    if state.data_hash != data.content_hash:
        differ.append(f"the corpus at {data.path} (data hash {state.data_hash} then, {data.content_hash} now)")
    if differ:
        raise RunRefused(f"{run_dir} holds a run with other settings ({', '.join(differ[:5])}); choose another "
                        f"hydra.run.dir, or add train.resume=false to DELETE that run (its checkpoints, metrics and "
                        f"eval) and start this one there")
    if dist.main:
        (run_dir / rundir.FAILED).unlink(missing_ok=True)
    return state


# What may change between a run and its resumption: how it executes and where its inputs and corpus live.
RESUME_IGNORES = ({"train.resume", "wandb", "domain.files", "domain.path", "data.root"}
                  | {f"train.{k}" for k in rundir.EXECUTION_KEYS["train"]}
                  | {f"model.{k}" for k in rundir.EXECUTION_KEYS["model"]})


def _diff(a, b, ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (ignoring the given keys and sub-trees)."""
    if prefix.rstrip(".") in ignore:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in _diff(a.get(key), b.get(key), ignore, f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def build(mcfg: ModelConfig, cfg: TrainConfig, seed: int, device: torch.device, state: Checkpoint | None,
          dist: Dist = Dist()):
    """Model and optimizer, initialised from the seed (the same on every process) or restored, with each process's
    RNG (dropout), from a checkpoint. After a change of the number of processes, process r takes saved state r mod
    the old number."""
    torch.manual_seed(seed)
    model = GPT(mcfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        cpu, cuda = state.rng["cpu"], state.rng.get("cuda") or []
        torch.set_rng_state(cpu[dist.rank % len(cpu)])
        if device.type == "cuda" and cuda and cuda[0] is not None:
            torch.cuda.set_rng_state(cuda[dist.rank % len(cuda)], device)
        log.info("resumed from %s (step %d)", state.path, state.step)
    elif dist.rank > 0:
        torch.manual_seed(seed + 1_000_003 * dist.rank)  # same weights, different dropout
    return model, optimizer


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
                _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    model.train()
    return total / count


@dataclass
class Loop:
    """What the loop needs besides the model: the data, the schedule, where to write, and its running totals."""
    job: TrainJob
    cfg: TrainConfig  # effective (max_steps from a FLOP budget)
    run_dir: Path
    data: TokenData
    device: torch.device
    flops: FlopsPerToken
    peak: float | None
    step: int = 0
    best: float = math.inf
    last_val: float | None = None
    train_time: float = 0.0
    prior_wall: float = 0.0
    weights_hash: str = ""  # of the newest checkpoint
    dist: Dist = field(default_factory=Dist)
    loss_sum: torch.Tensor | None = None  # training losses since the last check, on the device (no sync per step)
    loss_steps: int = 0
    peak_source: str | None = None
    attn_kernels: list[str] = field(default_factory=list)  # the shortcut's attention kernel, each change in order
    last_train: float = math.nan  # the training loss last read
    last_ckpt: Path | None = None  # the checkpoint last written (first process)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.data.block_size

    def micro_batches(self) -> list[np.ndarray]:
        """This process's share of the step's batch (window starts), in micro-batches of at most batch_size: the
        step's batch_size x grad_accum windows are drawn from (seed, step) and split evenly over the processes."""
        cfg, d = self.cfg, self.dist
        per_rank = cfg.batch_size * cfg.grad_accum // d.world
        micro = max(k for k in range(1, min(cfg.batch_size, per_rank) + 1) if per_rank % k == 0)
        starts = self.data.step_starts(self.job.seed, self.step, cfg.batch_size * cfg.grad_accum)
        mine = starts[d.rank * per_rank:(d.rank + 1) * per_rank]
        return [mine[i:i + micro] for i in range(0, per_rank, micro)]


def sample_exit(mcfg: ModelConfig, seed: int, step: int) -> tuple[int, ...]:
    """The early exit a step trains besides the full depth (model.exit_train): () or (d,), drawn from (seed, step)
    like the batch, so a resumed run and every process draw the same."""
    shallow = mcfg.exit_depths()[:-1]
    if not mcfg.exit_train or not shallow:
        return ()
    rng = np.random.default_rng([seed, step, 0xE417])  # a stream of its own: the batches are unchanged
    u, d = rng.random(), shallow[rng.integers(len(shallow))]
    return (int(d),) if u < mcfg.exit_train else ()


def train_step(loop: Loop, model, fwd_model, optimizer, ctx) -> None:
    """One optimizer step over this process's micro-batches of the step's batch. Gradients are synchronised across
    processes on the last micro-batch only (no_sync before it). The loss stays on the device until the next check."""
    cfg = loop.cfg
    lr = lr_at(loop.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts = loop.micro_batches()
    exits = sample_exit(model.cfg, loop.job.seed, loop.step)
    for k, starts in enumerate(parts):
        x, y = loop.data.windows("train", starts)
        if loop.device.type == "cuda":  # page-locked (and contiguous), so the copy overlaps the step's kernels
            x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
        x, y = x.to(loop.device, non_blocking=True), y.to(loop.device, non_blocking=True)
        with fwd_model.no_sync() if loop.dist.world > 1 and k < len(parts) - 1 else nullcontext():
            with ctx:
                _, loss = fwd_model(x, y, exits=exits) if exits else fwd_model(x, y)
            (loss / len(parts)).backward()
        loop.loss_sum = loss.detach().float() / len(parts) + (0 if loop.loss_sum is None else loop.loss_sum)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    loop.loss_steps += 1


def read_loss(loop: Loop) -> float:
    """The mean training loss since the last check, over processes; stops the run if it is not finite. This is the
    only place the loop waits for the device."""
    loss = float(loop.dist.mean(loop.loss_sum)) / loop.loss_steps
    loop.loss_sum, loop.loss_steps = None, 0
    loop.last_train = loss
    if not math.isfinite(loss):
        latest = Checkpoint.paths(loop.run_dir)
        raise UserError(f"training loss became {loss} by step {loop.step}; stopped. The last good checkpoint is "
                        f"{latest[-1] if latest else 'none (none was written yet)'}; try a lower train.lr")
    return loss


def run_loop(loop: Loop, model, metrics: MetricsLog | None, tracker, optimizer, ctx, session_start: float,
             watch: Watch | None = None) -> None:
    """Train from loop.step to max_steps: log, validate and checkpoint on their intervals (this process's share);
    after each step, act on the signals any process received (shortcut.stop)."""
    cfg = loop.cfg
    watch = watch or Watch()
    watch.join_group(loop.dist.world)
    fwd_model = model
    if loop.dist.world > 1:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[loop.device.index] if loop.device.type == "cuda" else None)
    if cfg.compile and loop.device.type == "cuda":  # after DDP, so compiled graphs split at its gradient buckets
        fwd_model = torch.compile(fwd_model)
    val_starts = loop.data.fixed_starts("val", cfg.eval_windows)
    bar = tqdm(total=cfg.max_steps, initial=loop.step, desc=f"train {model.cfg.arch}", unit="step",
               dynamic_ncols=True, disable=not loop.dist.main,
               mininterval=0.2 if sys.stderr.isatty() else 15)  # logs of sweeps stay readable
    t0, interval_tokens = time.perf_counter(), 0
    while loop.step < cfg.max_steps:
        train_step(loop, model, fwd_model, optimizer, ctx)
        step = loop.step
        interval_tokens += loop.tokens_per_step
        bar.update(1)
        evaluate_now = step % cfg.eval_every == 0 or step == cfg.max_steps
        checkpoint_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        log_now = step % cfg.log_every == 0 or evaluate_now or checkpoint_now
        if log_now:
            train_loss = read_loss(loop)
            elapsed = time.perf_counter() - t0
            loop.train_time += elapsed
            val_loss = None
            if evaluate_now and loop.dist.main:
                val_loss = loop.last_val = evaluate_windows(model, loop.data, "val", val_starts, cfg.batch_size, ctx)
                loop.best = min(loop.best, val_loss)
            tok_s = interval_tokens / elapsed if elapsed > 0 else None
            row = {"step": step, "tokens": step * loop.tokens_per_step,
                   "train_flops": step * loop.tokens_per_step * loop.flops.train, "train_loss": train_loss,
                   "val_loss": val_loss, "lr": lr_at(step - 1, cfg), "tokens_per_s": tok_s,
                   "mfu": tok_s * loop.flops.train / (loop.peak * loop.dist.world) if loop.peak and tok_s else None}
            if metrics is not None:
                metrics.append(row)
            tracker.log(row, step)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}" if tok_s else "-",
                            **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
        if checkpoint_now:
            save(loop, model, optimizer, train_loss, session_start)
        if log_now:
            t0, interval_tokens = time.perf_counter(), 0  # validation and checkpoint time stay out of tokens/s
        due = watch.due(loop.dist.world) if step < cfg.max_steps else []  # the last step: the run just finishes
        if due:
            if not log_now:  # the time since the last row is training time; tokens/s restarts from here
                loop.train_time += time.perf_counter() - t0
                t0, interval_tokens = time.perf_counter(), 0
            on_signal(loop, model, optimizer, watch, due, checkpoint_now, session_start, bar)
    bar.close()


def on_signal(loop: Loop, model, optimizer, watch: Watch, due: list[int], saved: bool, session_start: float,
              bar) -> None:
    """At a step boundary after a signal (every process the same): write a checkpoint unless this step's was just
    written, say one line, then stop (raise Stopped), or run the handler that was there before ours (Submitit's:
    it requeues the job and exits), or go on (Submitit's SIGTERM)."""
    kind, signum = watch.decide(due)
    if not saved:
        save(loop, model, optimizer, None, session_start)
    sig, where, path = signal_name(signum), f"step {loop.step} of {loop.cfg.max_steps}", loop.last_ckpt
    if kind == STOP:
        bar.close()
        say(loop.dist, f"stopped at {where} by {sig}; checkpoint written to {path}; the same command resumes")
        raise Stopped(signum)
    if kind == CHAIN:
        say(loop.dist, f"{sig} at {where}: checkpoint written to {path}; {sig} goes on to the handler that was "
                       f"installed before ours (Submitit's requeues the job; the same command resumes)")
        watch.hand_over(signum)  # may exit; if it returns, training goes on
    else:
        say(loop.dist, f"{sig} at {where}: checkpoint written to {path}; training goes on (under Submitit, "
                       f"SIGTERM announces its preemption signal)")


def say(dist: Dist, message: str) -> None:
    """One line on stderr from the first process, clear of the progress bar."""
    if dist.main:
        tqdm.write(f"shortcut: {message}", file=sys.stderr)


def save(loop: Loop, model, optimizer, train_loss: float | None, session_start: float) -> None:
    """Every process hands over its RNG state; the first one writes the checkpoint. train_loss None: between two
    logged rows (a stop), whose losses so far the checkpoint keeps, so a resumed run logs the same next row."""
    d = loop.dist
    pending = 0.0
    if train_loss is None:
        pending = float(d.mean(loop.loss_sum)) if loop.loss_sum is not None else 0.0
        train_loss = pending / loop.loss_steps if loop.loss_steps else loop.last_train
    rng = d.gather({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(loop.device) if loop.device.type == "cuda" else None})
    if d.main:
        ckpt = checkpoint(loop, model, optimizer, train_loss, session_start)
        ckpt.rng = {"cpu": [r["cpu"] for r in rng], "cuda": [r["cuda"] for r in rng]}
        ckpt.loss_sum, ckpt.loss_steps = pending, loop.loss_steps  # 0, 0 right after a logged row
        loop.last_ckpt = ckpt.save(loop.run_dir / rundir.CKPT, loop.cfg.keep_ckpts)
        loop.weights_hash = ckpt.weights_hash
    d.barrier()


def checkpoint(loop: Loop, model, optimizer, train_loss: float, session_start: float) -> Checkpoint:
    return Checkpoint(
        step=loop.step, model=model.state_dict(), optimizer=optimizer.state_dict(),
        rng={},
        best_val_loss=loop.best, last_val_loss=loop.last_val, train_loss=train_loss, train_time=loop.train_time,
        wall_time=loop.prior_wall + time.perf_counter() - session_start, config=plain(loop.job),
        model_config=plain(model.cfg), data_hash=loop.data.content_hash, data_dir=str(loop.data.path),
        attn_kernels=list(loop.attn_kernels), max_steps=loop.cfg.max_steps)


# --- the command ---

def open_corpus(job: TrainJob) -> TokenData:
    data_dir = corpus.locate(job.data.root, job.domain)
    data = TokenData(data_dir, job.model.block_size)
    if data.meta["tokenizer"] != str(job.domain.tokenizer):
        raise UserError(f"the corpus at {data_dir} was prepared with tokenizer={data.meta.get('tokenizer')}, not "
                        f"domain.tokenizer={job.domain.tokenizer}; prepare it again with this tokenizer")
    return data


@dataclass
class Invocation:
    """What the command line gives a run besides its job (all optional when train() is called directly).

    resolved_yaml: config.yaml; reference: the same config choices composed without command-line values, from
    which the run's readable label is the difference; choices: {"model", "train", "experiment"} config names;
    match: what train.match_flops names; hydra_record: Hydra's own record of the command ({file name: text} for
    .hydra/), written, with train.log, only once the run is accepted (issue 19: a refused command changes nothing)."""
    resolved_yaml: str | None = None
    reference: TrainJob | None = None
    choices: dict | None = None
    match: Match | None = None
    hydra_record: dict[str, str] | None = None


def train(job: TrainJob, run_dir: Path, resolved_yaml: str | None = None, reference: TrainJob | None = None,
          choices: dict | None = None, match: Match | None = None, hydra_record: dict[str, str] | None = None
          ) -> Summary:
    """Train (or resume, or skip a finished run) in run_dir; under torchrun, this process's share of it (see
    Invocation for the optional arguments). SIGTERM/SIGINT stop it after the current step with a checkpoint and
    raise shortcut.stop.Stopped (a SystemExit of status 128 + the signal)."""
    how = Invocation(resolved_yaml, reference, choices, match, hydra_record)
    watch = Watch().install()  # first: a signal during the set-up stops the run after its first step
    dist = Dist()
    try:
        dist = init_distributed(job.train.device)
        return _train(job, Path(run_dir), how, dist, watch)
    except Stopped as exc:
        if exc.immediate and dist.main:
            newest = Checkpoint.paths(Path(run_dir))
            say(dist, f"stopped at once by a second {signal_name(exc.signum)}; " + (
                f"the newest checkpoint is {newest[-1]}; the same command resumes from there" if newest else
                "no checkpoint was written yet; the same command starts over"))
        raise
    finally:
        watch.restore()
        close_distributed(dist)


def _check_processes(cfg: TrainConfig, dist: Dist) -> None:
    if cfg.nproc > 1 and dist.world == 1:
        raise UserError(f"train.nproc={cfg.nproc} needs torchrun: run it through the `shortcut train` command, or "
                        f"`torchrun --nproc_per_node={cfg.nproc} -m shortcut train ...`")
    if cfg.nproc not in (1, dist.world):
        raise UserError(f"train.nproc={cfg.nproc} but torchrun started {dist.world} processes")
    if (cfg.batch_size * cfg.grad_accum) % dist.world:
        raise UserError(f"a step's batch of train.batch_size x train.grad_accum = {cfg.batch_size * cfg.grad_accum} "
                        f"windows cannot be split evenly over {dist.world} processes")


def lock_run_dir(run_dir: Path, dist: Dist):
    """One trainer per run dir: the first process holds an exclusive lock on run_dir/.lock while it trains (the
    operating system drops it when the process dies, kill -9 included). Every process learns whether it got it."""
    handle = None
    if dist.main:
        import fcntl

        handle = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            handle = None
    if not dist.gather(handle is not None or not dist.main)[0]:
        raise RunRefused(f"another `shortcut train` is running in {run_dir}; wait for it to finish or stop it first")
    return handle


def _train(job: TrainJob, run_dir: Path, how: Invocation, dist: Dist, watch: Watch) -> Summary:
    _check_processes(job.train, dist)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir, dist)
    try:
        return _train_locked(job, run_dir, how, dist, watch)
    finally:
        if lock is not None:
            lock.close()
        for tmp in (run_dir / rundir.CKPT).glob("*.tmp"):  # a save cut short by a second Ctrl-C
            tmp.unlink(missing_ok=True)


def _train_locked(job: TrainJob, run_dir: Path, how: Invocation, dist: Dist, watch: Watch) -> Summary:
    data = open_corpus(job)
    mcfg = resolve_model(job.model, data.vocab_size)
    cfg = effective_train(job.train, mcfg, data.vocab_size, how.match)
    # the device and the attention kernel first: a setting this machine cannot run is refused before run_dir changes
    device = pick_device(cfg.device, dist.local_rank)
    kernel = str(resolve_attn_impl(mcfg.attn_impl, device.type)) if mcfg.arch == Arch.shortcut else None
    state = resume_or_reset(job, run_dir, data, dist)
    if state is not None and state.step >= cfg.max_steps and (run_dir / rundir.SUMMARY).is_file():
        log.info("%s already finished (step %d of %d); nothing to train", run_dir, state.step, cfg.max_steps)
        return Summary.read(run_dir)
    # Accepted (lock held, settings compatible): only from here on does the command write into run_dir.
    with record_invocation(run_dir, how, dist):
        model, optimizer = build(mcfg, cfg, job.seed, device, state, dist)
        allow_fast_math(device)
        peak, peak_source = peak_flops(device)
        loop = Loop(job, cfg, run_dir, data, device, flops_per_token(mcfg), peak, dist=dist, peak_source=peak_source)
        if state is not None:
            restore_loop(loop, state)
        if kernel is not None and loop.attn_kernels[-1:] != [kernel]:
            if state is not None:  # the same function, other rounding: not bit-identical to an uninterrupted run
                log.warning("%s resumes at step %d with attention kernel %s; it trained with %s until now (same "
                            "function, float rounding differs)", run_dir, state.step, kernel,
                            " then ".join(loop.attn_kernels) or "a kernel its checkpoint does not record")
            loop.attn_kernels.append(kernel)
        counts = param_counts(mcfg)
        log.info("%s: %s params (%s non-embedding), %.3g FLOPs/token, %d steps%s, taps %s%s", mcfg.arch,
                 f"{counts.params:,}", f"{counts.non_embedding_params:,}", loop.flops.forward, cfg.max_steps,
                 f" on {dist.world} processes" if dist.world > 1 else "",
                 mcfg.tap_layers() if mcfg.arch == "shortcut" else "-", f", attention {kernel}" if kernel else "")
        return train_and_summarise(job, loop, model, optimizer, mcfg, counts, how, watch)


def restore_loop(loop: Loop, state: Checkpoint) -> None:
    """The loop's counters as the checkpoint left them, the training losses since the last logged row included (a
    run stopped between two rows logs the same next row as an uninterrupted one)."""
    loop.step, loop.best, loop.last_val = state.step, state.best_val_loss, state.last_val_loss
    loop.train_time, loop.prior_wall, loop.weights_hash = state.train_time, state.wall_time, state.weights_hash
    loop.attn_kernels = list(state.attn_kernels)
    loop.last_train = state.train_loss
    if state.loss_steps:
        loop.loss_sum = torch.tensor(state.loss_sum, dtype=torch.float32, device=loop.device)
        loop.loss_steps = state.loss_steps


def train_and_summarise(job: TrainJob, loop: Loop, model, optimizer, mcfg: ModelConfig, counts: dict,
                        how: Invocation, watch: Watch) -> Summary:
    dist, run_dir = loop.dist, loop.run_dir
    metrics = MetricsLog(run_dir / rundir.METRICS, resume_step=loop.step) if dist.main else None
    tracker = open_tracker(job.wandb, run_dir, name=run_dir.name, config=plain(job)) if dist.main else Tracker()
    session_start, failed = time.perf_counter(), True
    try:
        run_loop(loop, model, metrics, tracker, optimizer, autocast(loop.device, loop.cfg.precision), session_start,
                 watch)
        summary = summarise(job, loop, mcfg, counts, how.reference, how.choices, session_start)
        if dist.main:
            summary.write(run_dir)
            tracker.summary({k: v for k, v in summary.to_dict().items() if isinstance(v, (int, float, str))})
            log.info("done: step %d, val loss %s, run dir %s", loop.step,
                     f"{loop.last_val:.4f}" if loop.last_val is not None else "-", run_dir)
        failed = False
        return summary
    finally:
        tracker.finish(failed=failed)


LOG_FILE, LOG_FORMAT = "train.log", "[%(asctime)s] %(message)s"  # the format conf/train.yaml gives the console


@contextmanager
def record_invocation(run_dir: Path, how: Invocation, dist: Dist):
    """Write the command's config.yaml and .hydra/ and log into run_dir/train.log while the run trains (first
    process). Hydra itself writes nothing into a train run dir (conf/train.yaml), so a refused command leaves it
    as it was."""
    if not dist.main:
        yield
        return
    if how.resolved_yaml is not None:
        atomic_text(run_dir / rundir.CONFIG, how.resolved_yaml)
    handler = None
    if how.hydra_record is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        for name, text in how.hydra_record.items():
            atomic_text(run_dir / ".hydra" / name, text)
        handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def atomic_text(path: Path, text: str) -> None:
    diskio.atomic_write(path, text)


def summarise(job: TrainJob, loop: Loop, mcfg: ModelConfig, counts: dict, reference: TrainJob | None,
              choices: dict | None, session_start: float) -> Summary:
    """summary.json: what was trained (identity, sizes, FLOPs), on what, and how it ended."""
    if reference is None:  # called without the CLI: the defaults are the dataclasses'
        m = job.model
        reference = TrainJob(domain=job.domain, model=ModelConfig(arch=m.arch, match_params=m.match_params,
                                                                  match_by=m.match_by))
    effective = {**plain(loop.cfg), "precision": effective_precision(loop.cfg.precision, loop.device)}
    identity = rundir.identify(plain(job.model), plain(mcfg), plain(job.train), effective,
                               {"model": plain(reference.model), "train": plain(reference.train)}, choices or {})
    return Summary(
        identity=identity, domain=job.domain.name, source=str(job.domain.source), tokenizer=loop.data.meta["tokenizer"],
        arch=str(mcfg.arch), model=plain(mcfg), train=plain(loop.cfg), seed=job.seed, params=counts.params, non_embedding_params=counts.non_embedding_params,
        flops_per_token=loop.flops.forward, train_flops_per_token=loop.flops.train,
        tokens_per_step=loop.tokens_per_step, max_steps=loop.cfg.max_steps, data_hash=loop.data.content_hash,
        data_dir=str(loop.data.path), git_commit=git_commit(), device=str(loop.device), step=loop.step,
        train_flops=float(loop.step * loop.tokens_per_step * loop.flops.train), final_val_loss=loop.last_val,
        best_val_loss=loop.best if loop.best < math.inf else None, train_time_s=loop.train_time,
        wall_time_s=loop.prior_wall + time.perf_counter() - session_start, finished=loop.step >= loop.cfg.max_steps,
        checkpoint_hash=loop.weights_hash, finished_at=rundir.now(),
        peak_flops=loop.peak, peak_flops_source=loop.peak_source, nproc=loop.dist.world,
        attn_kernels=list(loop.attn_kernels) or None)
