"""The `shortcut` command: a thin front end that takes the sub-command and hands the rest to Hydra.

This is the only module that knows about Hydra. Every command gets a typed, validated config object; problems the
user can fix end in one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import sys
from pathlib import Path

USAGE = """usage: shortcut COMMAND [hydra overrides...]

commands:
  prepare   build a token corpus:        shortcut prepare domain=text domain.source=files domain.files='books/*.txt'
  train     train a model:               shortcut train domain=text model=shortcut train=smoke
  eval      test NLL of a trained run:   shortcut eval run_dir=runs/...
  sample    generate and decode:         shortcut sample run_dir=runs/... sample.n=4  (text, MIDI, wav)
  compare   runs side by side:           shortcut compare baseline vs shortcut   (or runs='runs/sweep/**')

Overrides are Hydra's: -m sweeps (seed=0,1), --cfg job prints the config, `shortcut COMMAND --help` lists groups."""

COMMANDS = ("prepare", "train", "eval", "sample", "compare")
# Hydra flags that describe the app rather than a config: no pre-flight validation for them. `--cfg job` prints the
# config a run would get, so it is validated like a run (issue 19): it never shows a config the run refuses.
_INSPECT_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
# Hydra flags that take a value as the next word (`--cfg job`, `-p model`): not an override.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun"}
# Lines of OmegaConf/Hydra messages that describe internals rather than the user's mistake.
_NOISE = ("full_key:", "object_type", "reference_type", "Set the env", "provider=", "invalid literal")
_failures: list[str] = []
log = logging.getLogger("shortcut")


def config_dir() -> Path:
    """conf/ beside the package in a source checkout (editable install), shortcut/conf inside a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"shortcut's Hydra configs are missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def one_line(exc: BaseException) -> str:
    """A user-facing one-line description of a config or input error, naming the key where one is known."""
    from omegaconf.errors import OmegaConfBaseException

    unknown = _unknown_key(exc)
    if unknown:
        return unknown
    parts: list[str] = []
    seen: set[str] = set()
    e: BaseException | None = exc
    while e is not None:
        text = str(getattr(e, "msg", None) or e).strip()
        # OmegaConf appends "full_key: ..., object_type=..." lines; keep only the message and name the key.
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(_NOISE) and "$VALUE" not in ln]
        if "Config search path:" in lines:
            lines = lines[: lines.index("Config search path:")]
        for ln in lines:
            if ln not in seen:
                seen.add(ln)
                parts.append(ln)
        key = getattr(e, "full_key", None)
        if isinstance(e, OmegaConfBaseException) and key and key not in " ".join(parts):
            parts.append(f"(key: {key})")
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return " ".join(parts) or type(exc).__name__


def _unknown_key(exc: BaseException) -> str | None:
    """Hydra's "Could not override 'model.nlayer'. To append to your config use +model.nlayer=..." as our own line:
    the `+` it suggests would only add a key that nothing reads (issue 19)."""
    from dataclasses import fields, is_dataclass

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from shortcut.config import unknown_key

    e: BaseException | None = exc
    while e is not None:
        schema, key = getattr(e, "object_type", None), getattr(e, "key", None)
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and is_dataclass(schema) and isinstance(key, str) \
                and key not in {f.name for f in fields(schema)}:
            return unknown_key(str(getattr(e, "full_key", None) or key), [f.name for f in fields(schema)])
        e = e.__cause__ or e.__context__
    return None


def _typed(cfg):
    """The typed job object of a composed config: unknown keys refused, WANDB_MODE applied (so that the config a run
    records says what it used), then the schemas' __post_init__ checks."""
    from omegaconf import OmegaConf

    from shortcut.config import check_known_keys, wandb_mode

    check_known_keys(cfg)
    if "wandb" in cfg:
        mode = wandb_mode(cfg.wandb.mode)
        if mode != cfg.wandb.mode:
            log.info("WANDB_MODE=%s in the environment overrides wandb.mode=%s", os.environ["WANDB_MODE"],
                     cfg.wandb.mode)
            cfg.wandb.mode = mode
    return OmegaConf.to_object(cfg)


# What a run dir's path names: `${seed}`, `${model.n_embd}`, `${hydra:runtime.choices.model}`.
_NAMED_KEY = re.compile(r"\$\{([\w.]+)\}")
_NAMED_CHOICE = re.compile(r"\$\{hydra:runtime\.choices\.([\w/]+)\}")


def _unnamed_hash(*named: str, _parent_, _root_) -> str:
    """`${shortcut.unnamed_hash:}` in a run dir: "+" and a short hash of the command line's settings that the rest
    of the path does not name, or "" when there are none, so that `model.n_embd=32` and `model.n_embd=16` never
    share a run dir (issue 19) while the plain command keeps its plain path. Left out: what a resume may change
    (train.RESUME_IGNORES: execution, W&B, where the inputs live) and Hydra's own settings. `named`: keys the path
    names literally (an experiment's own folder names `experiment`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from shortcut.train import RESUME_IGNORES

    spec = " ".join(str(_parent_._get_node(k)._value()) for k in _parent_)  # dir and subdir, unresolved
    keys, choices = set(named) | set(_NAMED_KEY.findall(spec)), set(_NAMED_CHOICE.findall(spec))
    hydra = _root_.hydra
    settings = {}
    for o in OverridesParser.create().parse_overrides(list(hydra.overrides.task)):
        key = o.key_or_group
        if key in keys or key in choices or key.split(".")[0].split("/")[0] == "hydra" or any(
                key == k or key.startswith(f"{k}.") for k in RESUME_IGNORES):
            continue
        if "hydra.job.override_dirname" in keys and key not in hydra.job.config.override_dirname.exclude_keys:
            continue
        if key in hydra.runtime.choices:  # a group: its choice, named where the path shows e.g. ${domain.name}
            value = hydra.runtime.choices[key]
            if f"{key}.name" in keys and value == _plain_at(_root_, f"{key}.name"):
                continue
        else:
            value = "~" if o.is_delete() else _plain_at(_root_, key)
        settings[key] = value
    if not settings:
        return ""
    return "+" + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _plain_at(cfg, key: str):
    """The resolved value at a dotted key, as plain Python."""
    from omegaconf import Container, OmegaConf

    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


def _options(group: str) -> str:
    """`${shortcut.options:wandb}` in a --help text: the group's choices, "off, offline, online"."""
    return ", ".join(sorted(p.stem for p in (config_dir() / group).glob("*.yaml")))


def _register_resolvers() -> None:
    """Called at import: a Submitit worker unpickles _task (importing this module) and then resolves the sweep
    subdir, before any of our code runs."""
    from omegaconf import OmegaConf

    for name, resolver in (("shortcut.unnamed_hash", _unnamed_hash), ("shortcut.options", _options)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


_register_resolvers()


def _fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process has the same reason: say it once
        print(f"shortcut: error: {message}", file=sys.stderr)
    sys.exit(2)


def compose(command: str, overrides: list[str]):
    """Compose and validate one command's config with Hydra's compose API; returns the typed job object."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from shortcut.config import UserError, register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
        try:
            cfg = hydra_compose(config_name=command, overrides=overrides)
        except Exception as exc:
            unknown = _unknown_key(exc)
            if unknown:
                raise UserError(unknown) from None
            raise
    return _typed(cfg)


def _preflight(command: str, args: list[str]) -> None:
    """Compose every job a command line would run and stop at the first bad one, in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = _overrides_of(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    choices: list[list[str]] = []
    try:
        for o in OverridesParser.create().parse_overrides(overrides):
            if o.key_or_group.startswith("hydra"):
                continue
            if o.is_sweep_override() and multirun:
                choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
            else:
                choices.append([o.input_line])
        for combo in itertools.islice(itertools.product(*choices), 256):
            job = compose(command, list(combo))
            match = getattr(getattr(job, "train", None), "match_flops", None)
            if match:  # the model it names must compose too
                try:
                    compose(command, [c for c in combo if not c.lstrip("+~").startswith(_MATCH_DROPS)]
                            + [f"model={match}"])
                except Exception as exc:  # noqa: BLE001
                    raise ValueError(f"train.match_flops={match}: {one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - every composition failure is the user's to fix
        _fail(one_line(exc))


def _task(cfg) -> None:
    """What Hydra runs, once per job: convert to the typed config and run the command."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    from shortcut.config import UserError

    hc = HydraConfig.get()
    try:
        _run(hc.job.name, _typed(cfg), cfg, hc)  # _typed: unknown keys refused, the schemas' __post_init__ checks run
    except (UserError, OmegaConfBaseException, OSError) as exc:
        from shortcut import diskio

        if isinstance(exc, OSError) and not diskio.is_disk_error(exc):
            raise
        _job_failed(hc, exc)


def _run(command: str, job, cfg, hc) -> None:
    """The command's function on its typed job (train also gets what only Hydra knows)."""
    if command == "prepare":
        from shortcut.prepare import prepare

        prepare(job)
    elif command == "train":
        _train(job, cfg, hc)
    elif command == "eval":
        from shortcut.evaluate import evaluate

        evaluate(job)
    elif command == "sample":
        from shortcut.sample import sample

        sample(job)
    elif command == "compare":
        from shortcut.compare import compare

        compare(job)


def _train(job, cfg, hc) -> None:
    """train with the config choices (a run's label is its difference from them composed without command-line
    values), the model train.match_flops names and the Hydra record; or torchrun's launch for train.nproc > 1."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from shortcut.runtime import launched_by_torchrun
    from shortcut.train import Match, train

    if job.train.nproc > 1 and not launched_by_torchrun():
        return _launch_torchrun(job, list(hc.overrides.task), Path(hc.runtime.output_dir))
    choices = {g: hc.runtime.choices.get(g) for g in _CHOICE_GROUPS}
    reference = _compose_in_app([f"{g}={c}" for g, c in choices.items() if c])
    match = None
    if job.train.match_flops:
        other = _compose_in_app([o for o in hc.overrides.task if not o.lstrip("+~").startswith(_MATCH_DROPS)]
                                + [f"model={job.train.match_flops}"])
        match = Match(other.model, other.train.max_steps)
    record = {"config.yaml": OmegaConf.to_yaml(cfg), "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
              "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg)}  # .hydra/, once accepted
    train(job, Path(hc.runtime.output_dir), resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True),
          reference=reference, choices=choices, match=match, hydra_record=record)


def _job_failed(hc, exc: BaseException) -> None:
    """A job's one-line error ends a single run; in a multirun it is logged (and a train job's run dir gets
    failed.txt, so that compare can say what is missing) and the other jobs go on."""
    from hydra.types import RunMode

    from shortcut import diskio

    # A write no module guarded (a picture, W&B's offline files): still one line naming the place.
    message = diskio.describe(Path(exc.filename or hc.runtime.output_dir), "output", exc) \
        if isinstance(exc, OSError) else one_line(exc)
    if hc.mode == RunMode.MULTIRUN:  # report and carry on with the other jobs
        log.error("job %s (%s) failed: %s", hc.job.num, " ".join(hc.overrides.task), message)
        if hc.job.name == "train" and os.environ.get("RANK", "0") == "0":
            from shortcut.rundir import write_failed
            from shortcut.train import RunRefused

            if not isinstance(exc, RunRefused):  # a refused run dir is another run's: it stays as it was
                write_failed(Path(hc.runtime.output_dir), message)
        _failures.append(f"job {hc.job.num} ({' '.join(hc.overrides.task)}): {message}")
        return
    _fail(message)


_CHOICE_GROUPS = ("domain", "dataset", "model", "train", "experiment")
# What train.match_flops=<choice> replaces: the model's kind (its sizes stay), and the matching itself.
_MATCH_DROPS = ("model=", "model.arch=", "model.match_params=", "model.match_by=", "train.match_flops=")


def _launch_torchrun(job, overrides: list[str], run_dir: Path) -> None:
    """`shortcut train train.nproc=N`: the same job as N data-parallel processes (torchrun, one machine). What can
    be checked here is checked before any process starts; the launcher dies with this process (even kill -9)."""
    import signal

    from shortcut import corpus
    from shortcut.config import UserError
    from shortcut.stop import run_launcher

    n, cfg = job.train.nproc, job.train
    if (cfg.batch_size * cfg.grad_accum) % n:
        raise UserError(f"a step's batch of train.batch_size x train.grad_accum = {cfg.batch_size * cfg.grad_accum} "
                        f"windows cannot be split evenly over train.nproc={n} processes")
    corpus.locate(job.data.root, job.domain)  # a missing corpus is one line here, not N tracebacks there
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")  # Hydra's quoted-string escapes
    cmd = [sys.executable, "-m", "shortcut.launch", "--standalone", f"--nproc_per_node={n}",
           "-m", "shortcut", "train", *overrides, f"hydra.run.dir='{quoted}'"]
    log.info("launching %d processes: %s", n, " ".join(cmd))

    def die_with_parent() -> None:  # Linux: the launcher (and so its workers) get SIGTERM if we are killed
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    rc = run_launcher(cmd, preexec_fn=die_with_parent)  # passes SIGTERM/SIGINT on and waits; Stopped after one
    if rc != 0:
        raise UserError(f"the {n}-process run in {run_dir} failed (exit status {rc}); its reason is above")


def _compose_in_app(overrides: list[str]):
    """Compose the train config inside a running Hydra app (its config search path is already set up)."""
    from hydra import compose as hydra_compose

    try:
        return _typed(hydra_compose(config_name="train", overrides=overrides))
    except Exception as exc:  # noqa: BLE001 - e.g. train.match_flops naming a model choice that does not exist
        from shortcut.config import UserError

        raise UserError(one_line(exc)) from None


def _overrides_of(args: list[str]) -> list[str]:
    """The overrides of a command line: the words that are neither Hydra flags nor a flag's value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _VALUE_FLAGS
        else:
            out.append(a)
    return out


def _variants_as_override(args: list[str]) -> list[str]:
    """`shortcut compare baseline vs shortcut [vs ...]` -> variants=[baseline,shortcut] (the rest stays Hydra's).
    The order says nothing (issue 19): compare finds each row's reference itself."""
    words = [a for a in args if "=" not in a and not a.startswith("-") and a != "vs"]
    if not words:
        return args
    rest = [a for a in args if "=" in a or a.startswith("-")]
    return [*rest, f"variants=[{','.join(words)}]"]


_LIST_KEYS = ("eval.noise",)  # comma-separated values that are one list, never a sweep


def _lists_as_override(args: list[str]) -> list[str]:
    """`eval.noise=0.05,0.2` -> eval.noise=[0.05,0.2] (issue 23): the noise levels one evaluation measures, not a
    Hydra sweep of evaluations that would each overwrite the run's eval.json."""
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") in _LIST_KEYS and "," in value and not value.lstrip().startswith(("[", "'", '"')):
            a = f"{key}=[{value}]"
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    if command == "compare":
        args = _variants_as_override(args)
    if command == "eval":
        args = _lists_as_override(args)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun process
        if command != "train" or any(a in ("-m", "--multirun") for a in args):
            _fail("torchrun runs one `shortcut train` job; sweep with `shortcut train -m ... train.nproc=N` instead")
        if os.environ.get("RANK", "0") != "0":  # one log and one .hydra/ per run: the first process's
            args = [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if not _INSPECT_FLAGS.intersection(a.split("=")[0] for a in args):
        _preflight(command, args)

    import hydra

    from shortcut.config import register_schemas

    register_schemas()
    _failures.clear()
    sys.argv = [f"shortcut {command}", *args]
    hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(_task)()
    if _failures:
        print(f"shortcut: {len(_failures)} job(s) failed:\n  " + "\n  ".join(_failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
