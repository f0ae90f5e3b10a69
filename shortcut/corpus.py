"""The on-disk token corpus every domain prepares and training reads.

<root>/<domain>/<source>-<settings hash>/ holds train.bin, val.bin, test.bin (flat unsigned-integer token arrays)
and meta.json.
meta.json records each file's size (tokens x dtype) and sha256 ("hashes"), and content_hash over all of them in
order; every open checks the sizes and every train start and eval the hashes (`verify`), so a truncated, extended or
overwritten file is refused in one line rather than trained on or scored (issue 19).
A corpus is streamed into a hidden work folder beside it (.<name>.partial/, with a journal of the shards written so
far, so an interrupted prepare resumes) and renamed into place once meta.json is written, so a half-written one never
looks complete.
Each combination of domain settings (tokenizer, codebook size, split fractions, ...) gets its own folder, so two
settings of one source never overwrite each other and a run can never train on a corpus its config does not describe.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from shortcut import diskio
from shortcut.config import UserError

SPLITS = ("train", "val", "test")
META = "meta.json"
FORMAT = 3  # bump when what prepare writes changes, so existing corpora are rebuilt rather than reused
JOURNAL = "journal.json"  # in the work folder: how far an unfinished prepare got
# Files a domain may add beside the splits (finish's extra_files), in the order they were hashed: corpora prepared
# before meta.json recorded "hashes" are verified against content_hash over the splits and these.
EXTRA_FILES = ("tokenizer.json", "codebook.npy")
HASH_CHUNK = 1 << 20  # reads of 1 MiB: the fastest of 1 and 16 MiB for sha256 here
REPREPARE = "re-run `shortcut prepare` with the same domain settings"

log = logging.getLogger(__name__)

# Where a corpus' inputs live is not a setting of the corpus: the same files moved elsewhere make the same corpus.
# Nor is on_error: it decides whether prepare stops at a bad input, never what a finished corpus holds.
NOT_SETTINGS = ("files", "path", "on_error")


def settings_of(domain) -> dict:
    """The domain settings that shape a corpus (a domain config dataclass, or its dict from a saved config)."""
    items = domain.items() if isinstance(domain, dict) else vars(domain).items()
    return json.loads(json.dumps({k: v for k, v in items if k not in NOT_SETTINGS}, sort_keys=True, default=str))


def settings_hash(domain) -> str:
    return hashlib.sha256(json.dumps(settings_of(domain), sort_keys=True).encode()).hexdigest()[:8]


def corpus_dir(root: str | Path, domain) -> Path:
    """<root>/<domain>/<source>-<hash of the settings>: one folder per combination of settings."""
    s = settings_of(domain)
    return Path(root) / s["name"] / f"{s['source']}-{settings_hash(domain)}"


def locate(root: str | Path, domain) -> Path:
    """The prepared corpus for these domain settings, or a one-line error naming the corpora of the same source
    that exist and the settings in which they differ."""
    path = corpus_dir(root, domain)
    if (path / META).is_file():
        return path
    want = settings_of(domain)
    others = []
    for meta_file in sorted(path.parent.glob(f"{want['source']}-*/{META}")):
        have = json.loads(meta_file.read_text()).get("settings") or {}
        differ = [f"domain.{k}={have.get(k)!r} (yours {v!r})" for k, v in sorted(want.items()) if have.get(k) != v]
        others.append(f"{meta_file.parent} has {', '.join(differ[:4]) or 'other settings'}")
    hint = (f"; prepared corpora of this source: {'; '.join(others[:3])}. Pass the same domain.* settings as to "
            f"prepare" if others else " (run `shortcut prepare domain=...` with the same domain settings and "
                                       "data.root first)")
    raise UserError(f"no prepared corpus for these domain settings at {path}{hint}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def manifest_hash(paths: list[Path], extra: str = "") -> tuple[str, list[Path]]:
    """A hash of the inputs' (path, size, mtime) plus the settings that shape the corpus, and the paths that are not
    there. Reading a file's metadata, never its bytes, decides whether a corpus is up to date (issue 14)."""
    h = hashlib.sha256(f"format={FORMAT}|{extra}".encode())
    missing = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            missing.append(Path(p))
            continue
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest(), missing


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise UserError(f"no prepared corpus at {path} (run `shortcut prepare domain=...` with the same domain, "
                        f"domain.source and data.root first)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_file} is unreadable ({exc}); {REPREPARE}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file} is not a corpus description; {REPREPARE}")
    return meta


def stale_reason(path: Path, input_hash: str) -> str | None:
    """Why path does not hold a complete, intact corpus made from exactly these inputs and settings (None when it
    does). The outputs are verified too (sizes and hashes): a split changed after prepare is rebuilt, not kept."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return "no complete corpus there yet"
    if not isinstance(meta, dict) or meta.get("input_hash") != input_hash:
        return "its inputs or settings changed"
    try:
        verify(path, meta)
    except UserError as exc:
        return str(exc).split("; re-run")[0]
    return None


def up_to_date(path: Path, input_hash: str) -> bool:
    """True when path holds a complete, intact corpus made from exactly these inputs and settings."""
    return stale_reason(path, input_hash) is None


# --- reading and verifying ---

def check_size(path: Path, split: str, meta: dict) -> Path:
    """The split's file, after checking that its size is the token count meta.json records times the dtype's size
    (a stat: cheap, done at every open)."""
    file = Path(path) / f"{split}.bin"
    try:
        dtype, n = np.dtype(meta["dtype"]), int(meta["tokens"][split])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{Path(path) / META} does not say how many tokens of which dtype {file.name} holds; "
                        f"{REPREPARE}") from None
    try:
        have = file.stat().st_size
    except OSError as exc:
        raise UserError(f"{file} is missing or unreadable ({exc.strerror}); {REPREPARE}") from None
    want = n * dtype.itemsize
    if have != want:
        how = "truncated" if have < want else "extended"
        raise UserError(f"{file} has {have:,} bytes but {META} says {n:,} {dtype.name} tokens ({want:,} bytes): it "
                        f"was {how} or replaced after it was prepared; {REPREPARE}")
    return file


def hash_files(path: Path, names: list[str]) -> tuple[dict[str, str], str]:
    """sha256 of each file (full hex, as `sha256sum` prints it) and content_hash (sha256 of all of them in this
    order, 16 hex digits), in one streamed pass of HASH_CHUNK reads.

    Cost of this function on a 1 GB file, measured on the shared 2-core development machine (x86 with sha_ni,
    issue 19): 1.3-2.1 s with the file in the page cache (one sha256 alone: 0.7-1.0 s; the read alone: 0.2-0.3 s),
    4.8 s when it is read from the disk. Two hashes are kept so that content_hash stays what prepare always
    recorded (runs trained before keep matching) while each file can be named. A process verifies a corpus once."""
    total, each = hashlib.sha256(), {}
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    for name in names:
        h = hashlib.sha256()
        with open(Path(path) / name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                total.update(view[:n])
        each[name] = h.hexdigest()
    return each, total.hexdigest()[:16]


_verified: dict[tuple, str] = {}  # (files' identities) -> content hash, verified by this process


def _identity(path: Path, names: list[str]) -> tuple:
    """What tells these files apart from a rewritten copy without reading them: size, mtime, inode."""
    stats = [os.stat(Path(path) / n) for n in [META, *names]]
    return (str(Path(path).resolve()), *((n, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
                                         for n, st in zip([META, *names], stats)))


def verify(path: Path, meta: dict | None = None) -> str:
    """Check the corpus' files against meta.json: every split's size, then every file's sha256; returns the content
    hash computed from the bytes (what a run records). A mismatch is a one-line UserError naming the file.

    A corpus prepared before meta.json recorded per-file "hashes" is verified against its content_hash alone, over
    the splits and the EXTRA_FILES present (how that hash was always computed): a change is still refused, but the
    message cannot say which file changed. It need not be prepared again.
    A process verifies a corpus once: the same files (size, mtime, inode) later are taken as verified."""
    meta = meta or read_meta(path)
    for split in SPLITS:
        check_size(path, split, meta)
    recorded = meta.get("hashes")
    if isinstance(recorded, dict):
        names = list(recorded)
    else:
        names = [f"{s}.bin" for s in SPLITS] + [n for n in EXTRA_FILES if (Path(path) / n).is_file()]
    try:
        key = _identity(path, names)
    except OSError as exc:
        raise UserError(f"{Path(path) / Path(exc.filename).name} is missing or unreadable ({exc.strerror}); "
                        f"{REPREPARE}") from None
    if key in _verified:
        return _verified[key]
    each, content = hash_files(path, names)
    for name in names if isinstance(recorded, dict) else ():
        if each[name] != recorded[name]:
            raise UserError(f"{Path(path) / name} is not the file that was prepared (sha256 {each[name][:16]}..., "
                            f"{META} says {str(recorded[name])[:16]}...): it was changed after prepare; {REPREPARE}")
    if content != meta.get("content_hash"):
        which = "its files" if isinstance(recorded, dict) else ", ".join(names)
        raise UserError(f"the content of {path} ({which}) does not match the content_hash in its {META} "
                        f"({content}, recorded {meta.get('content_hash')}): it was changed after prepare; "
                        f"{REPREPARE}")
    _verified[key] = content
    return content


def load_split(path: Path, split: str, meta: dict | None = None) -> np.memmap:
    """The split's tokens, memory-mapped, after checking the file's size against meta.json."""
    meta = meta or read_meta(path)
    return np.memmap(check_size(path, split, meta), dtype=np.dtype(meta["dtype"]), mode="r")


class CorpusWriter:
    """Streams a corpus into .<name>.partial/ beside its final place and renames it there when complete.

    Tokens are appended split by split (train, then val, then test) in chunks. `commit(done, stats)` makes what was
    appended durable and journals how many work units are done, the splits' lengths and the running statistics; a
    later writer for the same inputs and settings (input_hash) resumes there: `done` and `stats` come back, the split
    files are cut back to their committed length. Intermediate results (a plan, a fitted codebook) survive too
    (`save`/`load`). The content hash is computed while appending, once (on resume, the committed part is read back).
    Only one prepare writes a corpus at a time (a lock beside it)."""

    def __init__(self, path: Path, input_hash: str, resume: bool = True):
        self.path = Path(path)
        self.work = self.path.parent / f".{self.path.name}.partial"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A POSIX record lock: released when this process dies, and not held by its forked workers.
        self._lock = open(self.path.parent / f".{self.path.name}.lock", "a+")
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UserError(f"another `shortcut prepare` is writing {self.path} now; let it finish (or stop it), "
                            f"then run again") from None
        state = None
        if resume:
            try:
                state = json.loads((self.work / JOURNAL).read_text())
            except (OSError, ValueError):
                state = None
        if state and state.get("format") == FORMAT and state.get("input_hash") == input_hash:
            self.state = state
            self.resumed = True
        else:
            shutil.rmtree(self.work, ignore_errors=True)
            self.state = {"format": FORMAT, "input_hash": input_hash, "done": 0, "dtype": None,
                          "tokens": {s: 0 for s in SPLITS}, "stats": {}}
            self.resumed = False
        self._files: dict = {}
        if not self.resumed:
            try:
                (self.work / "stage").mkdir(parents=True)
                self._write_journal()
            except (OSError, diskio.DiskError) as exc:
                self.__exit__(type(exc), exc, None)
                raise
        self._content = None  # sha256 of everything appended, in order (content_hash)
        self._hashes: dict = {}  # each split file's own sha256
        self._split = 0  # index in SPLITS of the split being appended to; earlier ones are closed for appends

    # --- the journal and intermediate results ---

    @property
    def done(self) -> int:
        """Work units completed and committed (0 for a fresh corpus)."""
        return int(self.state["done"])

    @property
    def stats(self) -> dict:
        return self.state["stats"]

    @staticmethod
    def _write_durably(target: Path, blob: bytes) -> None:
        diskio.atomic_write(target, blob, durable=True)

    def _write_journal(self) -> None:
        self._write_durably(self.work / JOURNAL, json.dumps(self.state).encode())

    def save(self, name: str, blob: bytes) -> None:
        """Keep an intermediate result (a plan, a codebook) so that a resumed prepare need not compute it again."""
        self._write_durably(self.work / "stage" / name, blob)

    def load(self, name: str) -> bytes | None:
        target = self.work / "stage" / name
        return target.read_bytes() if target.is_file() else None

    # --- streaming the tokens ---

    def begin(self, dtype, limit: int | None = None) -> None:
        """Open the split files for appending tokens of `dtype`, each checked to lie in [0, limit)."""
        dtype = np.dtype(dtype)
        if self.state["dtype"] not in (None, dtype.name):
            raise RuntimeError(f"corpus dtype changed on resume ({self.state['dtype']} -> {dtype.name})")
        self.state["dtype"] = dtype.name
        self.dtype, self.limit = dtype, limit
        self._content = hashlib.sha256()
        self._hashes = {name: hashlib.sha256() for name in SPLITS}
        for i, name in enumerate(SPLITS):
            file = self.work / f"{name}.bin"
            f = open(file, "r+b" if file.exists() else "w+b")
            keep = self.state["tokens"][name] * dtype.itemsize
            f.truncate(keep)  # whatever follows the last commit was never journaled: drop it
            f.seek(0)
            while chunk := f.read(HASH_CHUNK):
                self._content.update(chunk)
                self._hashes[name].update(chunk)
            f.seek(keep)
            self._files[name] = f
            if keep:
                self._split = i
        if self.resumed and self.done:
            log.info("resuming %s: %d work unit(s) already done (tokens so far %s)", self.path, self.done,
                     "/".join(f"{self.state['tokens'][s]:,}" for s in SPLITS))

    def append(self, split: str, tokens) -> None:
        i = SPLITS.index(split)
        if i < self._split:
            raise RuntimeError(f"{split} tokens after {SPLITS[self._split]} tokens: splits are written in order")
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        self._split = i
        if self.limit is not None and (int(arr.max()) >= self.limit or (arr.dtype.kind != "u" and int(arr.min()) < 0)):
            raise ValueError(f"{split} split has a token outside [0, {self.limit}): {int(arr.min())}..{int(arr.max())}")
        data = memoryview(np.ascontiguousarray(arr, dtype=self.dtype)).cast("B")
        self._files[split].write(data)
        self._content.update(data)
        self._hashes[split].update(data)
        self.state["tokens"][split] += int(arr.size)

    def tokens(self, split: str) -> int:
        return int(self.state["tokens"][split])

    def commit(self, done: int, stats: dict) -> None:
        """Make everything appended so far durable and record that `done` work units are finished."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        self.state["done"], self.state["stats"] = int(done), stats
        self._write_journal()

    def finish(self, meta: dict, extra_files: dict[str, bytes] | None = None) -> dict:
        """Write meta.json (plus extra files, e.g. a tokenizer) and move the finished corpus into place."""
        if self._content is None:
            raise RuntimeError("finish() before begin()")
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = {}
        content = self._content
        hashes = {f"{s}.bin": self._hashes[s].hexdigest() for s in SPLITS}
        for name, blob in (extra_files or {}).items():
            (self.work / name).write_bytes(blob)
            content.update(blob)
            hashes[name] = hashlib.sha256(blob).hexdigest()
        meta = {**meta, "format": FORMAT, "dtype": self.dtype.name, "tokens": {s: self.tokens(s) for s in SPLITS},
                "hashes": hashes, "content_hash": content.hexdigest()[:16],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        shutil.rmtree(self.work / "stage", ignore_errors=True)
        (self.work / JOURNAL).unlink(missing_ok=True)
        self._write_durably(self.work / META, json.dumps(meta, indent=2).encode())  # from here on it is complete
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            self.path.rename(old)
        self.work.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        self.close()
        return meta

    def close(self) -> None:
        """Release the corpus (an unfinished one stays in .<name>.partial/ to be resumed)."""
        for f in self._files.values():
            try:
                f.close()
            except OSError:  # its buffer could not be flushed (a full disk): unjournaled, so nothing is lost
                pass
        self._files = {}
        if not self._lock.closed:
            self._lock.close()

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc is not None and (diskio.is_disk_error(exc) or isinstance(exc, diskio.DiskError)):
            # Resuming would need the space the corpus did not fit in: the partial corpus goes, and its space with it.
            written = sum(f.stat().st_size for f in self.work.rglob("*") if f.is_file()) if self.work.is_dir() else 0
            diskio.remove(self.work)
            cause = exc.os_error if isinstance(exc, diskio.DiskError) else exc
            message = diskio.describe(self.path, "the corpus", cause)
            raise diskio.DiskError(f"{message}; it needs more than the {written / diskio.MB:,.1f} MB written, and "
                                   f"its partial files ({self.work.name}/) were removed") from None


def write_corpus(path: Path, splits: dict[str, np.ndarray], meta: dict,
                 extra_files: dict[str, bytes] | None = None) -> dict:
    """Write whole in-memory splits, meta.json and any extra files atomically into path (small corpora, tests)."""
    vocab_size = int(meta["vocab_size"])
    with CorpusWriter(path, str(meta.get("input_hash", "")), resume=False) as w:
        w.begin(token_dtype(vocab_size), limit=vocab_size)
        for name in SPLITS:
            w.append(name, splits[name])
        return w.finish(meta, extra_files)
