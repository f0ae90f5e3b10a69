"""Where metrics go: metrics.jsonl in the run dir, and Weights & Biases (offline by default).

The training loop talks to a Tracker and never asks whether logging is on: `wandb=off` gives one that does nothing.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
from dataclasses import replace
from pathlib import Path

from shortcut import diskio
from shortcut.config import UserError, WandbConfig, WandbMode, wandb_mode
from shortcut.download import require_network
from shortcut.rundir import WANDB_ID


class MetricsLog:
    """Append-only metrics.jsonl. On resume, lines past the checkpoint's step are dropped so the file matches an
    uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        lines = []
        if resume_step and self.path.is_file():
            lines = [json.dumps(row) for row in self.read(self.path) if row["step"] <= resume_step]
        diskio.atomic_write(self.path, "".join(ln + "\n" for ln in lines))

    def append(self, row: dict) -> None:
        # A line cut short by a full disk is what read() drops: the file stays readable.
        with diskio.guard(self.path, "a metrics row"), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The rows; a last line cut short (a process killed while appending) is dropped, a damaged one inside is
        refused."""
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        rows = []
        for i, ln in enumerate(lines):
            try:
                rows.append(json.loads(ln))
            except ValueError:
                if i == len(lines) - 1:
                    break
                raise UserError(f"{path} line {i + 1} is damaged; train the run again") from None
        return rows


class Tracker:
    """Does nothing: what `wandb=off` gives."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def images(self, pictures: dict[str, Path], step: int | None = None) -> None:
        pass

    def html(self, pages: dict[str, Path], step: int | None = None) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg: WandbConfig, run_dir: Path, name: str, config: dict | None):
        import wandb

        id_file = run_dir / WANDB_ID  # the same W&B run continues across resumes, and eval logs into it
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(mode=str(cfg.mode), dir=str(run_dir), project=cfg.project, entity=cfg.entity,
                              group=cfg.group, tags=list(cfg.tags) or None, name=name, id=run_id, resume="allow",
                              config=config, settings=wandb.Settings(quiet=True))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def images(self, pictures: dict[str, Path], step: int | None = None) -> None:
        import wandb

        if pictures:
            self.run.log({k: wandb.Image(str(p)) for k, p in pictures.items() if Path(p).is_file()}, step=step)

    def html(self, pages: dict[str, Path], step: int | None = None) -> None:
        """Self-contained pages (the audit's report.html) as wandb.Html, without W&B's injected stylesheet."""
        import wandb

        found = {k: wandb.Html(str(p), inject=False) for k, p in pages.items() if Path(p).is_file()}
        if found:
            self.run.log(found, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def open_tracker(cfg: WandbConfig, run_dir: Path, name: str, config: dict | None) -> Tracker:
    """A tracker for cfg, with WANDB_MODE from the environment winning over cfg.mode (shortcut.config.wandb_mode)."""
    cfg = replace(cfg, mode=wandb_mode(cfg.mode))
    if cfg.mode == WandbMode.off:
        return Tracker()
    if cfg.mode == WandbMode.online:
        if not _has_wandb_key():
            raise UserError("wandb=online needs an API key: run `wandb login` or set WANDB_API_KEY "
                            "(or use wandb=offline and `wandb sync` later)")
        require_network("https://api.wandb.ai", "to W&B", "Use wandb=offline and `wandb sync` the run later.")
    return WandbTracker(cfg, Path(run_dir), name, config)
