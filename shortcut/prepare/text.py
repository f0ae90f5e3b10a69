"""Text corpora: text8, WikiText-103 (raw) and local UTF-8 files, tokenized by character or by byte."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shortcut import corpus
from shortcut.config import TextDomain, TextSource, TextTokenizer, UserError
from shortcut.download import local_or_download, require_network
from shortcut.prepare.common import check_inputs, find_files

log = logging.getLogger(__name__)

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
WIKITEXT_HF = ("Salesforce/wikitext", "wikitext-103-raw-v1")
WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
CHUNK = 1 << 23  # characters per tokenization chunk


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One id per Unicode character seen in the training split (sorted), plus <unk> if other splits need it."""

    UNK = "\ufffd"

    def __init__(self, chars: list[str], unk: bool = False):
        self.chars = chars  # sorted by codepoint; with unk=True the last entry stands for any unseen character
        self.codepoints = np.array([ord(c) for c in chars[: len(chars) - unk]], dtype=np.uint32)
        self.unk_id = len(chars) - 1 if unk else None
        self.vocab_size = len(chars)

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        counts = np.zeros(0x110000, dtype=np.int64)
        for i in range(0, len(text), CHUNK):
            counts += np.bincount(_codepoints(text[i:i + CHUNK]), minlength=0x110000)
        return cls([chr(c) for c in np.flatnonzero(counts)])

    def with_unk(self) -> "CharTokenizer":
        return self if self.unk_id is not None else CharTokenizer(self.chars + [self.UNK], unk=True)

    def unknown(self, text: str) -> int:
        """How many characters of text are not in the vocabulary."""
        cps = _codepoints(text)
        idx = np.clip(np.searchsorted(self.codepoints, cps), 0, len(self.codepoints) - 1)
        return int((self.codepoints[idx] != cps).sum())

    def encode(self, text: str) -> np.ndarray:
        cps = _codepoints(text)
        idx = np.clip(np.searchsorted(self.codepoints, cps), 0, len(self.codepoints) - 1)
        known = self.codepoints[idx] == cps
        if not known.all():
            if self.unk_id is None:
                raise ValueError("text has characters outside the vocabulary and the tokenizer has no <unk>")
            idx = np.where(known, idx, self.unk_id)
        return idx.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def tokenizer_from_meta(meta: dict):
    if meta["tokenizer"] == TextTokenizer.char:
        return CharTokenizer(meta["vocab"], unk=meta.get("unk", False))
    return ByteTokenizer()


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _encode(tok, text: str, name: str) -> np.ndarray:
    chunks = range(0, len(text), CHUNK)
    parts = [tok.encode(text[i:i + CHUNK]) for i in tqdm(chunks, desc=f"tokenize {name}", disable=len(chunks) < 4)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _split_by_fractions(text: str, val_frac: float, test_frac: float) -> dict[str, str]:
    n = len(text)
    n_val, n_test = int(n * val_frac), int(n * test_frac)
    n_train = n - n_val - n_test
    return {"train": text[:n_train], "val": text[n_train:n_train + n_val], "test": text[n_train + n_val:]}


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it or leave it out "
                        f"of domain.files") from None


# --- sources: each returns (inputs to hash, a loader of the three split texts) ---

def _files_source(cfg: TextDomain, root: Path):
    paths = find_files(cfg.files, "books/*.txt")

    def load():
        text = "\n".join(read_utf8(p) for p in tqdm(paths, desc="read files", disable=len(paths) < 50))
        if len(text) < 100:
            raise UserError(f"domain.files={cfg.files!r} holds only {len(text)} characters; give more text")
        return _split_by_fractions(text, cfg.val_frac, cfg.test_frac)

    return paths, f"files:{cfg.val_frac}:{cfg.test_frac}", load


def _text8_source(cfg: TextDomain, root: Path):
    alternative = ("Give a local copy with domain.path=/path/to/text8.zip (or the unzipped text8), or use "
                   "domain.source=files domain.files='your/*.txt'.")
    path = local_or_download(cfg.path, TEXT8_URL, root / "downloads" / "text8.zip", "text8", "text8.zip or text8",
                             alternative)

    def load():
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                if not names:
                    raise UserError(f"{path} is an empty zip archive")
                text = z.read("text8" if "text8" in names else names[0]).decode("utf-8")
        else:
            text = read_utf8(path)
        # The standard split: first 90M characters train, next 5M validation, last 5M test (90/5/5 in general).
        return _split_by_fractions(text, 0.05, 0.05)

    return [path], "text8", load


def _wikitext_source(cfg: TextDomain, root: Path):
    if cfg.path:
        folder = Path(os.path.expanduser(cfg.path))
        for candidate in (folder, folder / "wikitext-103-raw"):
            if all((candidate / f).is_file() for f in WIKITEXT_FILES.values()):
                files = {s: candidate / f for s, f in WIKITEXT_FILES.items()}
                return list(files.values()), "wikitext103", lambda: {s: read_utf8(p) for s, p in files.items()}
        raise UserError(f"domain.path={cfg.path!r} must be a folder holding {', '.join(WIKITEXT_FILES.values())}")

    def load():
        require_network("https://huggingface.co", "WikiText-103",
                        "Give a local copy of the raw files with domain.path=/path/to/wikitext-103-raw, or use "
                        "domain.source=files domain.files='your/*.txt'.")
        import datasets

        splits = {"train": "train", "val": "validation", "test": "test"}
        ds = datasets.load_dataset(*WIKITEXT_HF, cache_dir=str(root / "downloads" / "hf"))
        return {s: "".join(ds[hf]["text"]) for s, hf in splits.items()}

    return [], f"hf:{':'.join(WIKITEXT_HF)}", load


SOURCES = {TextSource.files: _files_source, TextSource.text8: _text8_source, TextSource.wikitext103: _wikitext_source}


def prepare_text(cfg: TextDomain, root: Path) -> Path:
    out = corpus.corpus_dir(root, cfg)
    inputs, identity, load = SOURCES[cfg.source](cfg, root)
    input_hash, done = check_inputs(out, inputs, f"{identity}|{json.dumps(corpus.settings_of(cfg), sort_keys=True)}")
    if done:
        return out
    texts = load()
    if cfg.tokenizer == TextTokenizer.char:
        tok = CharTokenizer.fit(texts["train"])
        unknown = {s: tok.unknown(texts[s]) for s in ("val", "test")}
        if any(unknown.values()):
            tok = tok.with_unk()
    else:
        tok, unknown = ByteTokenizer(), {}
    splits = {s: _encode(tok, t, s) for s, t in texts.items()}
    meta = {
        "domain": cfg.name, "source": str(cfg.source), "tokenizer": str(cfg.tokenizer), "vocab_size": tok.vocab_size,
        "chars": {s: len(t) for s, t in texts.items()},
        "bytes": {s: len(t.encode("utf-8")) for s, t in texts.items()},
        "units": {"char": {s: len(t) for s, t in texts.items()}},  # eval reports bits per character
        "unknown_chars": unknown, "inputs": [str(p) for p in inputs[:100]], "n_inputs": len(inputs),
        "input_hash": input_hash, "settings": corpus.settings_of(cfg),
    }
    if cfg.tokenizer == TextTokenizer.char:
        meta["vocab"], meta["unk"] = tok.chars, tok.unk_id is not None
    meta = corpus.write_corpus(out, splits, meta)
    log.info("wrote %s: vocab %d, tokens train/val/test %s", out, tok.vocab_size,
             "/".join(f"{meta['tokens'][s]:,}" for s in corpus.SPLITS))
    if any(unknown.values()):
        log.warning("characters unseen in train mapped to <unk>: %s", unknown)
    return out
