"""The on-disk token corpus every domain prepares and training reads.

<root>/<domain>/<source>/ holds train.bin, val.bin, test.bin (flat unsigned-integer token arrays) and meta.json.
A corpus is written into a temporary folder and renamed into place, so a half-written one never looks complete.
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


def corpus_dir(root: str | Path, domain: str, source: str) -> Path:
    return Path(root) / domain / str(source)


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


def write_corpus(path: Path, splits: dict[str, np.ndarray], meta: dict, extra_files: dict[str, bytes] | None = None) -> dict:
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
