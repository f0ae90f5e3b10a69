"""The run directory: what train writes and eval, the audit, compare and tracking read (the counterpart of corpus.py).

<run>/config.yaml, metrics.jsonl, summary.json, eval.json, ckpt/step_*.pt, audit/, wandb/, wandb_id, failed.txt.
Every record carries a format version and what produced it (settings, corpus, checkpoint hashes), so a reader that
finds it out of date recomputes or refuses; it never reports an old number next to a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from shortcut import diskio
from shortcut.config import UserError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a run dir holds changes meaning; older run dirs are then refused, not misread
CONFIG, METRICS, SUMMARY, EVAL, FAILED, WANDB_ID = "config.yaml", "metrics.jsonl", "summary.json", "eval.json", \
    "failed.txt", "wandb_id"
CKPT, AUDIT, WANDB, SAMPLES = "ckpt", "audit", "wandb", "samples"
DEPTH = "depth.json"  # under audit/
# Everything derived from a model: a fresh start (train.resume=false) removes all of it.
DERIVED = (CONFIG, METRICS, SUMMARY, EVAL, FAILED, WANDB_ID, CKPT, AUDIT, WANDB, SAMPLES)

# Keys that change how a run executes or is logged, not what it learns: outside every identity hash.
EXECUTION_KEYS = {"model": ("attn_impl",),
                  "train": ("resume", "device", "compile", "log_every", "eval_every", "ckpt_every",
                            "keep_ckpts", "nproc")}
# How long a run trains: part of a row's identity (a run at equal FLOPs is its own row), not of the setup's.
LENGTH_KEYS = ("max_steps", "flops_budget", "match_flops")


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    diskio.atomic_write(Path(path), json.dumps(obj, indent=2, default=str))


def short_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state dict: what torch.save will write, within its small overhead."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names and bytes: the identity of a trained model, whatever file holds it."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reset(run_dir: Path) -> list[str]:
    """Remove everything derived from an earlier model in run_dir (train.resume=false); returns what was removed."""
    removed = []
    for name in DERIVED:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


# --- records -------------------------------------------------------------------------------------------------

_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,),
          "None": (type(None),), "Identity": (dict,)}


def _type_ok(value: Any, annotation: str) -> bool:
    """A JSON value against a field's annotation ("int", "float | None", ...); bool is not a number here."""
    allowed = [_TYPES.get(a.strip()) for a in str(annotation).split("|")]
    if any(a is None for a in allowed):  # an annotation this check does not know: accept
        return True
    if isinstance(value, bool) and ("bool" not in str(annotation)):
        return False
    return any(isinstance(value, t) for a in allowed for t in a)


class _Record:
    """A dataclass written as JSON with its format version, read back refusing other versions."""

    FILE = ""

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: Path | str = "?"):
        if d.get("format") != FORMAT:
            raise UserError(f"{where} was written by {'an older' if (d.get('format') or 0) < FORMAT else 'a newer'} "
                            f"shortcut (run-dir format {d.get('format')}, this one reads {FORMAT}); train it again "
                            f"with train.resume=false" + (" or re-run shortcut eval" if cls is EvalRecord else ""))
        wrong = [f"{f.name}={d[f.name]!r} (not {f.type})" for f in fields(cls)
                 if f.name in d and not _type_ok(d[f.name], f.type)]
        if wrong:
            raise UserError(f"{where} holds values of the wrong type ({', '.join(wrong[:3])}); it was edited or "
                            f"damaged: train or evaluate the run again")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls)
                         if f.name not in d and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise UserError(f"{where} is incomplete (missing {', '.join(missing)}); train or evaluate it again")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, run_dir: Path):
        path = Path(run_dir) / cls.FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); evaluate or train the run again") from None
        return cls.from_dict(d, path)

    def write(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / self.FILE, self.to_dict())


@dataclass
class Identity:
    """What a run is, computed once at train time from the resolved config: rows of `compare` are groups of these.

    setup_hash: the training settings that shape learning (not how long, not how it executes) + the corpus.
    variant_hash: the resolved model config + how long it trains (steps, or a FLOP budget).
    labels: the model choice and the settings that differ from the defaults of the chosen config files;
    variant_settings: those of the variant label, each whole ("model.n_embd=32"), so that no reader splits the label.
    A record written before variant_settings existed (issue 20) has its label only: model choice and settings joined
    by spaces, which is where they are taken from then."""
    setup_hash: str
    variant_hash: str
    variant_label: str
    setup_label: str
    model_choice: str
    variant_settings: list[str] | None = None

    def __post_init__(self):
        if self.variant_settings is None:  # an older record: its label is the model choice, then the settings
            self.variant_settings = self.variant_label.split()[1:]

    @property
    def settings_hash(self) -> str:
        return short_hash([self.setup_hash, self.variant_hash], 12)


@dataclass
class Summary(_Record):
    FILE = SUMMARY

    identity: Identity
    domain: str
    source: str
    tokenizer: str
    arch: str
    model: dict  # the resolved ModelConfig (vocabulary, parameter matching applied)
    train: dict  # the effective TrainConfig (max_steps set by a FLOP budget, if any)
    seed: int
    params: int
    non_embedding_params: int
    flops_per_token: int  # forward, analytic
    train_flops_per_token: int
    tokens_per_step: int
    max_steps: int
    data_hash: str
    data_dir: str
    git_commit: str | None
    device: str
    step: int
    train_flops: float  # spent: step x tokens_per_step x train_flops_per_token
    final_val_loss: float | None
    best_val_loss: float | None
    train_time_s: float
    wall_time_s: float
    finished: bool
    checkpoint_hash: str  # weights of the last checkpoint: eval.json must name the same
    finished_at: str
    peak_flops: float | None = None
    peak_flops_source: str | None = None
    nproc: int = 1
    attn_kernels: list | None = None  # the shortcut's attention kernel(s) as resolved on the device, in order

    @classmethod
    def from_dict(cls, d: dict, where: Path | str = "?"):
        s = super().from_dict(d, where)
        if isinstance(s.identity, dict):
            try:
                s.identity = Identity(**s.identity)
            except TypeError:
                raise UserError(f"{where} has an identity this shortcut does not read ({sorted(s.identity)}); "
                                f"train it again with train.resume=false") from None
        return s


@dataclass
class EvalRecord(_Record):
    """eval.json: what eval measured and exactly on what (checkpoint, corpus, settings)."""

    FILE = EVAL

    split: str
    nll: float
    n_tokens: int
    stride: int
    mean_context: float
    max_tokens: int | None
    checkpoint_step: int
    checkpoint_hash: str
    checkpoint: str
    data_hash: str
    flops_per_token: int
    domain: str
    source: str
    tokenizer: str
    units: dict = field(default_factory=dict)  # {"char": {"nll": ..., "bits": ...}, ...}
    audit: dict | None = None
    precision: str = "float32"  # of the forward passes: bfloat16 on CUDA, float32 on CPUs
    exit: dict | None = None  # eval.exit's curves (shortcut.early_exit.exit_curve), also in audit/exit_curve.json
    routing: dict | None = None  # a routed model's training-rule NLL and causal shares (shortcut.adaptive)
    decode: dict | None = None  # eval.decode_tokens' decoding speeds (shortcut.adaptive)
    max_steps: int | None = None  # the run's length: checkpoint_step of max_steps was scored (None: not recorded)
    finished: bool | None = None  # whether the run had finished training (summary.json); False: an unfinished run
    conditions: list | None = None  # eval.noise / eval.shift (shortcut.robustness): in-domain, each noise level and
    # shift, each with its NLL, depth profile and exits

    def to_dict(self) -> dict:
        """The JSON keeps today's flat keys (test_nll, test_ppl, bits_per_token, bits_per_char, ...) for readers."""
        import math

        flat = {f"{self.split}_nll": self.nll, f"{self.split}_ppl": math.exp(self.nll),
                "bits_per_token": self.nll / math.log(2), "step": self.checkpoint_step}
        for unit, v in self.units.items():
            flat[f"nll_per_{unit}"], flat[f"bits_per_{unit}"] = v["nll"], v["bits"]
        return {**super().to_dict(), **flat}

    def settings(self) -> dict:
        return {"split": self.split, "stride": self.stride, "max_tokens": self.max_tokens, "precision": self.precision}

    def stale_reason(self, summary: Summary | None, checkpoint_hash: str | None = None) -> str | None:
        """Why this record no longer describes the run (None when it does)."""
        want = checkpoint_hash or (summary.checkpoint_hash if summary else None)
        if want and self.checkpoint_hash != want:
            return f"it measured another checkpoint (weights {self.checkpoint_hash}, the run's are now {want})"
        if summary and self.data_hash != summary.data_hash:
            return f"it measured another corpus ({self.data_hash}, the run trained on {summary.data_hash})"
        return None


def _value(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def _diff(values: dict, reference: dict, prefix: str, skip) -> list[str]:
    return [f"{prefix}.{k}={_value(v)}" for k, v in sorted(values.items())
            if k not in skip and v != reference.get(k)]


def identify(model: dict, resolved_model: dict, train: dict, effective: dict, reference: dict, choices: dict
             ) -> Identity:
    """A run's identity from plain dicts of its configs. model, train: the job's sections as configured;
    resolved_model: after the corpus' vocabulary and parameter matching; effective: the train section as run
    (max_steps set by a FLOP budget, precision resolved for the device); reference: {"model": ..., "train": ...}
    composed from the same config choices without command-line values (the "defaults"); choices: {"model",
    "train", "experiment"}."""
    setup = {k: v for k, v in effective.items() if k not in EXECUTION_KEYS["train"] and k not in LENGTH_KEYS}
    # How long it trains: the settings as given, and the steps they came to (a budget depends on the model).
    length = {**{k: train[k] for k in LENGTH_KEYS if train.get(k) is not None}, "steps": effective["max_steps"]}
    variant = {k: v for k, v in resolved_model.items() if k not in EXECUTION_KEYS["model"]}
    model_choice = choices.get("model") or str(model["arch"])
    if model["arch"] != reference["model"]["arch"]:  # e.g. model=baseline model.arch=shortcut: name what it is
        model_choice = str(model["arch"])
    variant_settings = [*_diff(model, reference["model"], "model", (*EXECUTION_KEYS["model"], "arch")),
                        *_diff({k: train.get(k) for k in LENGTH_KEYS}, reference["train"], "train", ())]
    setup_label = " ".join([*([f"experiment={choices['experiment']}"] if choices.get("experiment") else []),
                            *([f"train={choices['train']}"] if choices.get("train") not in (None, "default") else []),
                            *_diff(train, reference["train"], "train", (*EXECUTION_KEYS["train"], *LENGTH_KEYS))])
    return Identity(setup_hash=short_hash(setup), variant_hash=short_hash([variant, length]),
                    variant_label=" ".join([model_choice, *variant_settings]), setup_label=setup_label,
                    model_choice=model_choice, variant_settings=variant_settings)


# --- checkpoints ---------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """Everything the training loop's future depends on; the lr and the batches are functions of the step."""

    step: int
    model: dict  # the uncompiled module's state dict
    optimizer: dict
    rng: dict  # {"cpu": tensor, "cuda": tensor (CUDA runs)}
    best_val_loss: float
    last_val_loss: float | None
    train_loss: float
    train_time: float
    wall_time: float
    config: dict  # the job as plain dicts (resume compares it)
    model_config: dict  # the resolved ModelConfig
    data_hash: str
    data_dir: str
    weights_hash: str = ""
    attn_kernels: list = field(default_factory=list)  # the shortcut's attention kernel, each change in order
    max_steps: int | None = None  # the run's length (effective: a FLOP budget's steps), for "step N of M"
    loss_sum: float = 0.0  # training losses since the last logged row (a stop between two rows), over processes
    loss_steps: int = 0
    path: str = ""  # where it was read from (not saved)

    def save(self, ckpt_dir: Path, keep: int) -> Path:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        self.weights_hash = weights_hash(self.model)
        what = f"the step-{self.step} checkpoint"
        need = state_bytes(self.model) + state_bytes(self.optimizer) + diskio.MB  # + pickled counters and RNG
        diskio.check_space(path, what, need)
        try:
            with diskio.guard(path, what, cleanup=(tmp,), need=need):
                torch.save({"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)
                                                 if f.name != "path"}}, tmp)
                os.replace(tmp, path)
        except RuntimeError as exc:  # torch's zip writer reports a full disk as "unexpected pos ..."
            diskio.remove(tmp)
            raise diskio.DiskError(diskio.describe(path, what, exc, need)) from None
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
            old.unlink()
        return path

    @classmethod
    def latest(cls, run_dir: Path) -> Checkpoint | None:
        """The newest checkpoint that loads; a corrupt one is reported and the one before it used. A checkpoint of
        another format is refused (not skipped: resuming past it would silently drop training)."""
        for path in sorted((Path(run_dir) / CKPT).glob("step_*.pt"), reverse=True):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, loudly
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path,
                            type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
                continue
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise UserError(f"{path} was written by another version of shortcut (format "
                                f"{state.get('format') if isinstance(state, dict) else '?'}, this one reads "
                                f"{FORMAT}); train.resume=false starts the run over")
            names = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in state.items() if k in names}, path=str(path))
        return None

    @staticmethod
    def paths(run_dir: Path) -> list[Path]:
        return sorted((Path(run_dir) / CKPT).glob("step_*.pt"))


def now() -> str:
    """UTC, so that runs finished on machines in other time zones order correctly (duplicates=newest)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


EXIT_CURVE = "exit_curve.json"  # under audit/


def read_depth(run_dir: Path) -> dict | None:
    p = Path(run_dir) / AUDIT / DEPTH
    return json.loads(p.read_text()) if p.is_file() else None


def failed_message(run_dir: Path) -> str | None:
    p = Path(run_dir) / FAILED
    return p.read_text().strip() if p.is_file() else None


def write_failed(run_dir: Path, message: str) -> None:
    """Best effort: it is written while the failure itself is reported (which may be a full disk)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        diskio.atomic_write(Path(run_dir) / FAILED, message + "\n")
    except (OSError, UserError):
        log.warning("could not write %s", Path(run_dir) / FAILED)


def is_run(d: Path) -> bool:
    return (Path(d) / SUMMARY).is_file()
