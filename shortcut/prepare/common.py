"""What the domains' prepare steps share: finding inputs, splitting them whole (by piece, file, speaker), counting
the ones left out, and running the work in parallel processes whose results come back in order."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from shortcut import corpus
from shortcut.config import OnError, PrepareConfig, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunTokenizer:
    """A trained run's own tokenizer, handed to a prepare step so that another source is tokenized exactly as the
    run's corpus was (eval.shift, shortcut.prepare.shift): nothing is fitted on the new source."""
    key: str  # its identity (a hash of the vocabulary, tokenizer.json or codebook): part of the corpus' folder name
    vocab: list[str] | None = None  # text, char tokenizer: the run's characters, id order (its <unk> placeholder last)
    unk: bool = False  # text: whether the last entry of vocab is the run's <unk> placeholder, not a character
    blob: bytes | None = None  # music: the run's tokenizer.json
    codebook: Any = None  # audio, kmeans: the run's codebook (codes, features) as a numpy array


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


# --- inputs that are missing or unusable ---

class Problems:
    """Inputs left out of a corpus: unusable ones (skipped, with the reason) and ones a dataset lists that are not
    there (missing). With domain.on_error=fail the first of either stops the prepare in one line."""

    SHOWN = 1000  # names kept in meta.json; the counts are always exact

    def __init__(self, on_error: OnError, what: str, state: dict | None = None):
        self.fail = on_error == OnError.fail
        self.what = what
        state = state or {}
        self.skipped: dict[str, str] = dict(state.get("skipped", {}))
        self.n_skipped = int(state.get("n_skipped", len(self.skipped)))
        self.missing: dict[str, list[str]] = {s: list(v) for s, v in state.get("missing", {}).items()}
        self.n_missing: dict[str, int] = dict(state.get("n_missing", {s: len(v) for s, v in self.missing.items()}))

    def skip(self, path, reason: str) -> None:
        if self.fail:
            raise UserError(f"{path}: {reason} (domain.on_error=fail; use domain.on_error=skip to leave such "
                            f"{self.what} files out)")
        self.n_skipped += 1
        if len(self.skipped) < self.SHOWN:
            self.skipped[str(path)] = reason

    def absent(self, split: str, paths: list, kind: str = "") -> None:
        """Inputs the dataset lists for `split` that are not there (an interrupted extraction, a partial copy)."""
        if not paths:
            return
        key = f"{split}{'/' + kind if kind else ''}"
        if self.fail:
            raise UserError(f"{len(paths)} {kind or self.what} file(s) of the {split} split are missing, e.g. "
                            f"{', '.join(str(p) for p in paths[:3])} (domain.on_error=fail; complete the dataset "
                            f"folder, or use domain.on_error=skip to go on without them)")
        self.n_missing[key] = self.n_missing.get(key, 0) + len(paths)
        self.missing.setdefault(key, []).extend(str(p) for p in paths[: self.SHOWN])

    def state(self) -> dict:
        return {"skipped": self.skipped, "n_skipped": self.n_skipped, "missing": self.missing,
                "n_missing": self.n_missing}

    def report(self) -> None:
        if self.n_missing:
            counts = ", ".join(f"{n} of {k}" for k, n in self.n_missing.items())
            first = [p for v in self.missing.values() for p in v[:2]][:4]
            log.warning("went on without %d missing input(s) (%s), e.g. %s; they are listed under 'missing' in "
                        "meta.json", sum(self.n_missing.values()), counts, ", ".join(first))
        report_skipped(self.skipped, self.n_skipped)


def survey(found: list[Path] | dict[str, list[Path]], identity: str, problems: Problems):
    """Drop the inputs that are not there (counted per split in `problems`) and hash the rest's manifest.

    Returns (what is there, in the same shape as found; the input hash)."""
    input_hash, missing = corpus.manifest_hash(inputs_of(found), identity)
    if missing:
        gone = set(missing)
        if isinstance(found, list):
            problems.absent("all", missing)
            found = [p for p in found if p not in gone]
        else:
            for s in corpus.SPLITS:
                problems.absent(s, [p for p in found[s] if p in gone])
            found = {s: [p for p in found[s] if p not in gone] for s in corpus.SPLITS}
    return found, input_hash


def already_done(out: Path, input_hash: str, problems: Problems) -> bool:
    """Whether out holds the corpus these inputs make (then prepare is a no-op). With domain.on_error=fail, a corpus
    made without some of its inputs is refused rather than reused."""
    why = corpus.stale_reason(out, input_hash)
    if why is not None:
        if (out / corpus.META).is_file():
            log.info("preparing %s again: %s", out, why)
        return False
    meta = corpus.read_meta(out)
    if problems.fail and (meta.get("n_skipped") or meta.get("n_missing")):
        first = next(iter(meta.get("skipped", {}).items()), None)
        example = f"{first[0]}: {first[1]}" if first else next(p for v in meta["missing"].values() for p in v)
        raise UserError(f"{out} was prepared without {meta.get('n_skipped', 0)} unusable and "
                        f"{sum(meta.get('n_missing', {}).values())} missing input(s), e.g. {example} "
                        f"(domain.on_error=fail; fix or remove them, or use domain.on_error=skip)")
    log.info("%s is up to date (inputs unchanged); nothing to do", out)
    return True


# --- running the work: parallel, bounded, in order ---

def worker_count(opts: PrepareConfig | None, units: int, per_worker_mb: float = 0) -> int:
    """prepare.workers (default: all cores), no more than there are units of work, and no more than
    prepare.max_memory_mb leaves room for at `per_worker_mb` each."""
    opts = opts or PrepareConfig()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, min(opts.workers or cores, units))
    if per_worker_mb > 0:
        fits = max(1, int(opts.max_memory_mb // per_worker_mb))
        if fits < n:
            log.info("prepare.max_memory_mb=%d leaves room for %d worker(s) of ~%.0f MB; using %d", opts.max_memory_mb,
                     fits, per_worker_mb, fits)
            n = fits
    return n


def _die_with_parent() -> None:
    """A worker ends when the prepare that started it ends, even by kill -9 (Linux), instead of lingering."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_worker(initializer, initargs) -> None:
    _die_with_parent()
    if initializer is not None:
        initializer(*initargs)


def process_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """A pool of `workers` forked processes, started now. The parent's objects are frozen out of the garbage
    collector while the workers fork, so that a collection in a worker does not write to (and so copy) every page
    that holds them: without this, each worker soon held a private copy of most of the parent's heap."""
    import gc
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(initializer, initargs))
    gc.collect()
    gc.freeze()
    try:
        pool.submit(int).result()  # forks every worker (fork start method: all at the first submit)
    finally:
        gc.unfreeze()
    return pool


def ordered_map(fn: Callable, items: Iterable, workers: int, initializer: Callable | None = None,
                initargs: tuple = (), window: int | None = None) -> Iterator:
    """fn(item) for each item, computed by `workers` processes and yielded in the order of items, so what is written
    does not depend on the number of workers. At most `window` items (default 2 per worker) are in flight, which
    bounds memory. With one worker, runs in this process."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    window = window or 2 * workers
    pool = process_pool(workers, initializer, initargs)
    try:
        it = iter(items)
        pending = deque(pool.submit(fn, item) for item in itertools.islice(it, window))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            if not pending:  # the last result: let the workers go now, not when the caller drops this generator
                pool.shutdown(wait=True)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def kept(writer: corpus.CorpusWriter, name: str, make: Callable, to_bytes: Callable = lambda v: json.dumps(v).encode(),
         from_bytes: Callable = json.loads):
    """What an interrupted prepare saved as `name` in the writer's work folder, else make()'s result, saved there:
    a resumed prepare goes on with the same plan, codebook or tokenizer (JSON unless to_bytes/from_bytes say)."""
    blob = writer.load(name)
    if blob is not None:
        return from_bytes(blob)
    value = make()
    writer.save(name, to_bytes(value))
    return value


class Committer:
    """Commits a CorpusWriter every few seconds of work (and at the end), so a kill loses at most that much."""

    SECONDS = 2.0

    def __init__(self, writer: corpus.CorpusWriter):
        self.writer, self.last = writer, time.monotonic()

    def __call__(self, done: int, stats: Callable[[], dict], force: bool = False) -> None:
        if force or time.monotonic() - self.last >= self.SECONDS:
            self.writer.commit(done, stats())
            self.last = time.monotonic()


def report_skipped(skipped: dict[str, str], total: int | None = None) -> None:
    total = len(skipped) if total is None else total
    if total:
        shown = [f"{k}: {v}" for k, v in list(skipped.items())[:10]]
        more = (f"\n  ... and {total - len(shown)} more (listed under 'skipped' in meta.json)"
                if total > len(shown) else "")
        log.warning("skipped %d input(s) that could not be used:\n  %s%s", total, "\n  ".join(shown), more)
