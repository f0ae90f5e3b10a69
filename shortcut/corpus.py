"""The on-disk token corpus every domain prepares and training reads.

<root>/<domain>/<source>-<settings hash>/ holds train.bin, val.bin, test.bin (flat unsigned-integer token arrays)
and meta.json.
A corpus is written into a temporary folder and renamed into place, so a half-written one never looks complete.
Each combination of domain settings (tokenizer, codebook size, split fractions, ...) gets its own folder, so two
settings of one source never overwrite each other and a run can never train on a corpus its config does not describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from shortcut.config import UserError

SPLITS = ("train", "val", "test")
META = "meta.json"
FORMAT = 2  # bump when what prepare writes changes, so existing corpora are rebuilt rather than reused


# Where a corpus' inputs live is not a setting of the corpus: the same files moved elsewhere make the same corpus.
NOT_SETTINGS = ("files", "path")


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


def hash_files(paths: list[Path], extra: str = "") -> str:
    """sha256 over the inputs' bytes and names plus the settings that shape the corpus."""
    h = hashlib.sha256(f"format={FORMAT}|{extra}".encode())
    for p in paths:
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise UserError(f"no prepared corpus at {path} (run `shortcut prepare domain=...` with the same domain, "
                        f"domain.source and data.root first)")
    return json.loads(meta_file.read_text())


def up_to_date(path: Path, input_hash: str) -> bool:
    """True when path holds a complete corpus made from exactly these inputs and settings."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("input_hash") == input_hash and all((Path(path) / f"{s}.bin").is_file() for s in SPLITS)


def write_corpus(path: Path, splits: dict[str, np.ndarray], meta: dict,
                 extra_files: dict[str, bytes] | None = None) -> dict:
    """Write the three splits, meta.json and any extra files (a tokenizer, say) atomically into path."""
    path = Path(path)
    vocab_size = int(meta["vocab_size"])
    dtype = token_dtype(vocab_size)
    for name, arr in splits.items():
        if arr.size and int(arr.max()) >= vocab_size:
            raise ValueError(f"{name} split has token {int(arr.max())} >= vocab_size {vocab_size}")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        content = hashlib.sha256()
        for name in SPLITS:
            data = np.ascontiguousarray(splits[name], dtype=dtype)
            data.tofile(tmp / f"{name}.bin")
            content.update(data.tobytes())
        for name, blob in (extra_files or {}).items():
            (tmp / name).write_bytes(blob)
            content.update(blob)
        meta = {**meta, "dtype": dtype.name, "tokens": {s: int(splits[s].size) for s in SPLITS},
                "content_hash": content.hexdigest()[:16], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / META).write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def load_split(path: Path, split: str, meta: dict | None = None) -> np.memmap:
    meta = meta or read_meta(path)
    return np.memmap(Path(path) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
