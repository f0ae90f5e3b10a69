"""What the domains' prepare steps share: finding input files and splitting them whole (by piece, file, speaker)."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from shortcut import corpus
from shortcut.config import UserError

log = logging.getLogger(__name__)


def find_files(pattern: str | None, example: str, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Files matched by comma-separated globs (recursive with **) or folders (searched for `suffixes`), sorted."""
    if not pattern:
        raise UserError(f"domain.source=files needs domain.files, e.g. domain.files='{example}'")
    found: set[Path] = set()
    for part in (p.strip() for p in pattern.split(",")):
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found.update(p for p in Path(part).rglob("*")
                         if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes))
        else:
            found.update(Path(p) for p in glob.glob(part, recursive=True) if os.path.isfile(p))
    if not found:
        raise UserError(f"domain.files={pattern!r} matches no files")
    return sorted(found)


def split_whole(paths: list[Path], val_frac: float, test_frac: float,
                key: Callable[[Path], str] = lambda p: p.name, unit: str = "piece") -> dict[str, list[Path]]:
    """Deterministic split that never cuts a group (a piece, an utterance, a speaker's files): groups are ordered
    by a hash of their key, so the split does not depend on listing order and a group keeps its split when others
    are added. At least one group each goes to val and test."""
    groups = sorted({key(p) for p in paths}, key=lambda g: hashlib.sha1(g.encode()).hexdigest())
    if len(groups) < 3:
        raise UserError(f"no usable data left for a train/val/test split: {len(groups)} usable {unit}(s), "
                        f"need at least 3")
    n_test, n_val = max(1, round(len(groups) * test_frac)), max(1, round(len(groups) * val_frac))
    where = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(groups)}
    return {s: sorted(p for p in paths if where[key(p)] == s) for s in corpus.SPLITS}


def inputs_of(found: list[Path] | dict[str, list[Path]]) -> list[Path]:
    return found if isinstance(found, list) else [p for s in corpus.SPLITS for p in found[s]]


def check_inputs(out: Path, inputs: list[Path], settings: str) -> tuple[str, bool]:
    """The inputs' hash, and whether out already holds the corpus they make (then prepare is a no-op)."""
    input_hash = corpus.hash_files(inputs, settings)
    done = corpus.up_to_date(out, input_hash)
    if done:
        log.info("%s is up to date (inputs unchanged); nothing to do", out)
    return input_hash, done


def read_and_split(found: list[Path] | dict[str, list[Path]], read: Callable[[Path], Any], skipped: dict[str, str],
                   split: Callable[[list[Path]], dict[str, list[Path]]], what: str) -> tuple[dict, dict]:
    """Read every input with `read`, skipping (and naming in `skipped`) the ones it cannot use, then split the
    rest: a flat list with `split`, an official split (a dict) as given. Returns ({split: [paths]}, {path: data})."""
    inputs = inputs_of(found)
    data = {}
    for path in tqdm(inputs, desc=f"read {what}", disable=len(inputs) < 20):
        try:
            data[path] = read(path)
        except Exception as exc:  # noqa: BLE001 - unreadable files are skipped and named
            skipped[str(path)] = f"{type(exc).__name__}: {str(exc)[:120]}"
    splits = split(list(data)) if isinstance(found, list) else {s: [p for p in found[s] if p in data]
                                                                  for s in corpus.SPLITS}
    empty = [s for s in corpus.SPLITS if not splits[s]]
    if empty:
        raise UserError(f"no usable {what} left for the {'/'.join(empty)} split(s) "
                        f"({len(skipped)} file(s) skipped: {', '.join(list(skipped)[:5])})")
    return splits, data


def report_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        shown = [f"{k}: {v}" for k, v in list(skipped.items())[:10]]
        more = f"\n  ... and {len(skipped) - 10} more (all are listed under 'skipped' in meta.json)" \
            if len(skipped) > 10 else ""
        log.warning("skipped %d input(s) that could not be used:\n  %s%s", len(skipped), "\n  ".join(shown), more)
