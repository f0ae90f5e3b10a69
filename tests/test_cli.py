"""The command line: every config composes, bad input ends in one clear line, Hydra's flags and multirun work."""

import json
import subprocess
import sys

import pytest

from conftest import TINY
from shortcut.cli import compose, config_dir, main
from shortcut.config import UserError


def shortcut(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "shortcut.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def cli(capsys, monkeypatch):
    """shortcut.cli.main in this process (fast): cli(*args) -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main hands its own argv to Hydra

    def run(*args):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.mark.slow
def test_every_command_and_group_option_composes():
    conf = config_dir()
    for cmd in ("prepare", "eval"):
        compose(cmd, ["run_dir=x"] if cmd == "eval" else [])
    for group in ("model", "train", "wandb", "domain", "dataset", "experiment"):
        for option in sorted((conf / group).glob("*.yaml")):
            job = compose("train", [f"{group}={option.stem}"])
            assert job.model.n_embd % job.model.n_head == 0
            if group in ("domain", "dataset"):
                compose("prepare", [f"{group}={option.stem}"])


@pytest.mark.parametrize("experiment,datasets", [("paper", ["text8", "wikitext103", "maestro", "librispeech"]),
                                                 ("paper_cpu", ["chorales", "speech", "text_local"])])
def test_paper_experiments_compose_for_every_dataset_and_model(experiment, datasets):
    for dataset in datasets:
        for model in ("baseline", "shortcut", "baseline_matched"):
            job = compose("train", [f"experiment={experiment}", f"dataset={dataset}", f"model={model}"])
            assert job.seed == 0 and job.train.max_steps > 0
    sweep = (config_dir() / "experiment" / f"{experiment}.yaml").read_text()
    assert f"dataset: {','.join(datasets)}" in sweep and "seed: 0,1,2" in sweep


def test_model_options():
    assert compose("train", ["model=shortcut"]).model.tap_layers() == [0, 1, 2, 3]
    matched = compose("train", ["model=baseline_matched"]).model
    assert matched.arch == "baseline" and matched.match_params == "shortcut"
    assert compose("train", ["model=shortcut", "model.taps=[0,3]"]).model.tap_layers() == [0, 3]


@pytest.mark.parametrize("args,key", [
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd"),
    (["model.n_layer=abc"], "model.n_layer"),
    (["model.nlayer=4"], "nlayer"),
    (["model=transformer"], "model"),
    (["domain=video"], "domain"),
    (["domain.source=books"], "domain.source"),
    (["domain.tokenizer=bpe"], "domain.tokenizer"),
    (["model.taps=[0,9]"], "model.taps"),
    (["model.taps=deep"], "model.taps"),
    (["model.feature_map=conv"], "model.feature_map"),
    (["train.lr=-1"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.max_steps=1.5"], "train.max_steps"),
    (["wandb=maybe"], "wandb"),
    (["seed=0,1"], "seed"),
    (["model.dropout=2"], "model.dropout"),
])
def test_bad_overrides_end_in_one_line(args, key):
    r = shortcut("train", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shortcut: error:"), r.stderr
    assert key in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("command,args,message", [
    ("train", ["+model.n_embed=64"], "unknown key model.n_embed: did you mean model.n_embd?"),
    ("train", ["++model.n_embed=64"], "unknown key model.n_embed: did you mean model.n_embd?"),
    ("train", ["model.n_embed=64"], "unknown key model.n_embed: did you mean model.n_embd?"),
    ("train", ["+train.bogus=1"], "unknown key train.bogus: train has no such setting"),
    ("train", ["+bogus=1"], "unknown key bogus:"),
    ("train", ["+domain.bogus=1"], "unknown key domain.bogus:"),
    ("train", ["-m", "model=baseline,shortcut", "+train.max_step=5"], "did you mean train.max_steps?"),
    ("train", ["+model.n_embed=64", "--cfg", "job"], "unknown key model.n_embed"),
    ("eval", ["run_dir=x", "+eval.strid=8"], "unknown key eval.strid: did you mean eval.stride?"),
    ("sample", ["run_dir=x", "+sample.temprature=0"], "did you mean sample.temperature?"),
    ("compare", ["+wandb.mod=off"], "unknown key wandb.mod: did you mean wandb.mode?"),
    ("prepare", ["+prepare.worker=2"], "did you mean prepare.workers?"),
])
def test_unknown_keys_are_refused_with_or_without_plus(cli, tmp_path, command, args, message):
    """Issue 19: `+key=value` added a key nothing read (exit 0, the default used, config.yaml claiming otherwise)."""
    rc, out, err = cli(command, *args, f"hydra.run.dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 's'}")
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("shortcut: error: "), err
    assert message in err and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()
    with pytest.raises(UserError, match="unknown key"):  # the Python API refuses them too
        compose(command, [a for a in args if "=" in a and "," not in a])


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--cfg=job"], ["--cfg", "all"], ["-c", "job", "-p", "model"]])
def test_cfg_job_validates_like_a_run(cli, flag):
    """Issue 19: `--cfg job` printed configs that the run then refused (n_embd=30 with 4 heads)."""
    rc, out, err = cli("train", "model.n_embd=30", *flag)
    assert rc == 2 and err.strip() == "shortcut: error: model.n_embd: 30 is not divisible by model.n_head=4", err
    assert out == ""
    rc, out, err = cli("train", "model.n_embd=32", *flag)
    assert rc == 0 and "n_embd: 32" in out, err


def run_dir_of(overrides, key="hydra.run.dir"):
    """The run dir (or sweep dir/subdir) Hydra would give a train job with these overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from shortcut.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return OmegaConf.select(cfg, key)


@pytest.mark.slow
def test_default_run_dirs_of_other_settings_never_collide():
    """Issue 19: the default run dir named the group choices only, so model.n_embd=32 and =16 shared one."""
    plain = run_dir_of([])
    assert plain == "runs/text-files/baseline-default/seed0"  # the plain command keeps its plain path
    dirs = {run_dir_of(o) for o in (["model.n_embd=32"], ["model.n_embd=16"], ["train.lr=0.01"], ["dataset=text8"],
                                    ["experiment=paper"], ["domain=maestro"], ["model.n_embd=16", "train.lr=0.01"])}
    assert len(dirs) == 7 and plain not in dirs
    # what the path names, what a resume may change, and how a value is spelled do not move a run
    assert run_dir_of(["domain=text", "domain.source=files", "data.root=/elsewhere", "wandb=off",
                       "train.resume=true", "train.nproc=2", "hydra/launcher=local_parallel"]) == plain
    assert run_dir_of(["model.n_embd=16", "train.lr=1e-2"]) == run_dir_of(["train.lr=0.01", "model.n_embd=16"])
    assert run_dir_of(["seed=1", "model=shortcut", "train=smoke"]) == "runs/text-files/shortcut-smoke/seed1"
    # the experiments' layouts stay as they were; a setting their path does not name gets its own folder
    job = ["experiment=paper_cpu", "dataset=chorales", "model=baseline", "seed=0"]
    assert run_dir_of(job, "hydra.sweep.subdir") == "chorales/baseline/seed0"
    assert run_dir_of(job + ["train.lr=0.01"], "hydra.sweep.subdir").startswith("chorales/baseline+")
    assert run_dir_of(["experiment=scaling_cpu", "model=shortcut", "model.n_embd=96"], "hydra.sweep.subdir") \
        == "shortcut-d96/seed0"
    assert run_dir_of(["experiment=demo", "model=shortcut"]) == "runs/demo/shortcut/seed0"


def test_two_widths_train_into_two_run_dirs(cli, tmp_path, prepared, monkeypatch):
    """The reproduction: `model.n_embd=32` then `model.n_embd=16` with the default run dir. Before, the second was
    refused and told to use train.resume=false, which would have deleted the first."""
    monkeypatch.chdir(tmp_path)
    tiny = [a for a in TINY if not a.startswith("model.n_embd")] + ["train.max_steps=3", "train.eval_every=3"]
    for width in (32, 16, 32):  # the third resumes (finds finished) the first, in its own dir
        rc, out, err = cli("train", *prepared, *tiny, f"model.n_embd={width}")
        assert rc == 0, err
    runs = {json.loads(p.read_text())["model"]["n_embd"]: p.parent
            for p in (tmp_path / "runs" / "text-files").glob("baseline-default*/seed0/summary.json")}
    assert sorted(runs) == [16, 32]
    # the refusal in an explicit run dir says what train.resume=false would delete
    rc, out, err = cli("train", *prepared, *tiny, "model.n_embd=16", f"hydra.run.dir={runs[32]}")
    assert rc == 2 and "holds a run with other settings (model.n_embd)" in err and "DELETE that run" in err


def test_wandb_mode_in_the_environment_wins(cli, tmp_path, prepared, monkeypatch):
    """Issue 19: WANDB_MODE=disabled was ignored and the default wandb=offline still wrote a W&B run."""
    monkeypatch.setenv("WANDB_MODE", "disabled")  # conftest sets it too; said here because it is the point
    tiny = [a if a != "wandb=off" else "wandb=offline" for a in TINY]
    rc, out, err = cli("train", *prepared, *tiny, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 0, err
    assert not (tmp_path / "r" / "wandb").exists() and not (tmp_path / "r" / "wandb_id").exists()
    assert "mode: 'off'" in (tmp_path / "r" / "config.yaml").read_text()  # the record says what the run used
    from shortcut.config import WandbMode, wandb_mode

    assert wandb_mode(WandbMode.online) == WandbMode.off
    for env, mode in (("offline", "offline"), ("dryrun", "offline"), ("online", "online"), ("", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert wandb_mode("online" if not env else "off") == mode
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    rc, out, err = cli("train", "--cfg", "job")
    assert rc == 2 and err.strip() == ("shortcut: error: WANDB_MODE='sometimes' is not one of disabled, off, offline, "
                                       "dryrun, online, run; unset it to use wandb.mode")


@pytest.mark.slow
def test_data_dependent_errors_are_one_line_too(tmp_path, prepared):
    r = shortcut("train", *prepared, *TINY, "model.block_size=100000", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("shortcut: error: model.block_size=100000 is larger")
    r = shortcut("eval", f"run_dir={tmp_path / 'missing'}")
    assert r.returncode != 0 and r.stderr.strip() == f"shortcut: error: run_dir='{tmp_path / 'missing'}' is not a directory"
    r = shortcut("frobnicate")
    assert r.returncode != 0 and "unknown command" in r.stderr


def test_hydra_flags_still_work():
    r = shortcut("train", "model=shortcut", "--cfg", "job")
    assert r.returncode == 0 and "arch: shortcut" in r.stdout
    r = shortcut("train", "--help")
    assert r.returncode == 0 and "model: attnres, baseline, baseline_matched, connect_last," in r.stdout
    r = shortcut("--help")
    assert r.returncode == 0 and "prepare" in r.stdout


@pytest.mark.parametrize("command,groups,keys", [
    ("eval", [], ["run_dir: ???", "  stride: null"]),
    ("sample", [], ["run_dir: ???", "  max_new_tokens: 256"]),
    ("compare", ["wandb"], ["runs: runs/**", "compute_multiplier: false"]),
    ("prepare", ["dataset", "domain"], ["  max_memory_mb: 2048"]),
])
def test_help_shows_only_the_commands_own_groups_and_keys(cli, command, groups, keys):
    """Issue 19: `shortcut eval --help` and `compare --help` listed train's groups, which they then refuse."""
    rc, out, err = cli(command, "--help")
    assert rc == 0 and out.startswith(f"shortcut {command} "), out
    listed = [ln.split(":")[0] for ln in out.splitlines() if ": " in ln and ln.split(":")[0] in
              ("dataset", "domain", "experiment", "model", "train", "wandb", "schema/domain")]
    assert listed == groups, out
    for group in groups:
        options = ", ".join(sorted(p.stem for p in (config_dir() / group).glob("*.yaml")))
        assert f"{group}: {options}\n" in out
    assert all(k in out.splitlines() for k in keys), out


@pytest.mark.slow
def test_multirun_runs_every_job_and_reports_failures(tmp_path, prepared):
    sweep = tmp_path / "sweep"
    r = shortcut("train", "-m", *prepared, *TINY, "model=baseline,shortcut", "train.max_steps=5",
                 f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    archs = sorted(json.loads((sweep / str(i) / "summary.json").read_text())["arch"] for i in range(2))
    assert archs == ["baseline", "shortcut"]
    # A job that fails at run time is reported; the others still run; the exit status says something failed.
    r = shortcut("train", "-m", *prepared, *TINY, "model.block_size=100000,16", "train.max_steps=5",
                 f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    assert r.returncode == 1
    assert "1 job(s) failed" in r.stderr and "block_size=100000" in r.stderr
    assert (tmp_path / "sweep2" / "1" / "summary.json").is_file()


@pytest.mark.parametrize("launcher", ["slurm_gpu", "slurm_node", "local_parallel"])
def test_cluster_launcher_configs_compose(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose, initialize_config_dir

    from shortcut.cli import config_dir
    from shortcut.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", ["experiment=paper", f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.timeout_min > 0


@pytest.mark.slow
def test_a_sweep_through_submitit_runs_its_jobs(tmp_path, prepared):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    r = shortcut("train", "-m", *prepared, *TINY, "train.max_steps=5", "seed=0,1", "hydra/launcher=local_parallel",
                 f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(json.loads((sweep / str(i) / "summary.json").read_text())["seed"] for i in range(2)) == [0, 1]
