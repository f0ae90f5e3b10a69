"""Text corpora: text8, WikiText-103 (raw) and local UTF-8 files, tokenized by character or by byte.

Streaming (issue 14): files are read in byte ranges that never cut a character or a CR LF pair. A first pass checks
each range (UTF-8, not binary), counts its characters and, for the char tokenizer, its character histogram; the split
points and the training vocabulary follow from those counts. A second pass tokenizes the ranges in parallel and
appends them in order to the split files, so memory depends on the range size (prepare.max_memory_mb), never on the
corpus. Newlines are read as Python's text mode reads them (CR LF and CR become LF).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shortcut import corpus, diskio
from shortcut.config import PrepareConfig, TextDomain, TextSource, TextTokenizer, UserError
from shortcut.download import local_or_download, require_network
from shortcut.prepare.common import (Committer, Problems, RunTokenizer, already_done, find_files, kept, ordered_map, survey,
                                     worker_count)

log = logging.getLogger(__name__)

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
# Neither Matt Mahoney's page nor any other authority we found publishes a checksum of text8.zip: none is checked.
TEXT8_HASH = None
WIKITEXT_HF = ("Salesforce/wikitext", "wikitext-103-raw-v1")
WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
SMALL = 4 << 20  # inputs below this many bytes are tokenized in this process: workers would cost more than they save
NEWLINE = 10


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
        return cls([chr(c) for c in histogram(_codepoints(text))[0]])

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

    def table(self, dtype=np.uint32) -> np.ndarray:
        """Code point -> id for every code point (unseen ones -> the <unk> id, len(known chars)): one gather
        tokenizes a whole array of code points."""
        table = np.full(0x110000, len(self.codepoints), dtype=dtype)
        table[self.codepoints] = np.arange(len(self.codepoints), dtype=dtype)
        return table


def tokenizer_from_meta(meta: dict):
    if meta["tokenizer"] == TextTokenizer.char:
        return CharTokenizer(meta["vocab"], unk=meta.get("unk", False))
    return ByteTokenizer()


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def read_utf8(path: Path) -> str:
    """A whole (small) UTF-8 text file, or a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it or leave it out") \
            from None


# --- reading byte ranges (in worker processes) ---

def byte_ranges(path: Path, size: int, unit: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about `unit` bytes covering the file, cut just before a byte that starts a UTF-8
    character and does not follow a CR, so each range decodes (and translates newlines) on its own."""
    cuts = [0]
    with open(path, "rb") as f:
        pos = unit
        while pos < size:
            f.seek(pos - 1)
            window = f.read(4097)  # the byte before pos, then what follows
            cut = pos - 1 + len(window)
            for i in range(1, len(window)):
                if window[i] & 0xC0 != 0x80 and window[i - 1] != 0x0D:
                    cut = pos - 1 + i
                    break
            if cut >= size:
                break
            cuts.append(cut)
            pos = cut + unit
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def read_codes(path: str, start: int, end: int) -> tuple[np.ndarray, int]:
    """The code points of bytes [start, end) of a UTF-8 file (uint8 when all ASCII, else uint32), newlines as text
    mode reads them, and their size in UTF-8 bytes. ValueError names what makes the file unusable."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    if len(raw) != end - start:
        raise ValueError("changed (shorter) while being read")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(f"binary, not text (a NUL byte at offset {start + nul})")
    if raw.isascii():
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return np.frombuffer(raw, dtype=np.uint8), len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (bad byte at offset {start + exc.start})") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _codepoints(text), len(raw) - raw.count(b"\r\n")


def histogram(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code points present, their counts), in slices so the temporary int64 copies stay small."""
    counts = np.zeros(256 if codes.dtype == np.uint8 else 0x110000, dtype=np.int64)
    for i in range(0, len(codes), 1 << 20):
        part = np.bincount(codes[i:i + (1 << 20)])
        counts[: len(part)] += part
    present = np.flatnonzero(counts)
    return present, counts[present]


def utf8_size(codes: np.ndarray) -> int:
    if codes.dtype == np.uint8:
        return len(codes)
    return int(len(codes) + (codes >= 0x80).sum() + (codes >= 0x800).sum() + (codes >= 0x10000).sum())


def _scan(job: tuple[str, int, int, bool]) -> dict:
    path, start, end, want_histogram = job
    try:
        codes, _ = read_codes(path, start, end)
    except (OSError, ValueError) as exc:
        return {"error": str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"}
    out = {"chars": len(codes)}
    if want_histogram:
        out["histogram"] = histogram(codes)
    return out


_TABLE: np.ndarray | None = None  # in a worker: code point -> id (char tokenizer); None: bytes
_UNK_ID = -1
_COUNT_TRAIN = False  # count unknown characters in train too (a corpus tokenized with a run's vocabulary)
_BYTE_MAP: bytes | None = None  # the table's first 256 entries as a bytes.translate map, when every id fits a byte


def _set_table(table: np.ndarray | None, unk_id: int = -1, count_train: bool = False) -> None:
    global _TABLE, _UNK_ID, _BYTE_MAP, _COUNT_TRAIN
    _TABLE, _UNK_ID, _COUNT_TRAIN = table, unk_id, count_train
    _BYTE_MAP = bytes(table[:256].astype(np.uint8)) if table is not None and unk_id < 256 else None


def _ids(codes: np.ndarray, count_unknown: bool = True) -> tuple[np.ndarray, int]:
    """Token ids of code points, and how many of them are <unk> (counted where asked: never in train)."""
    if _TABLE is None:
        if codes.dtype == np.uint8:
            return codes, 0
        return np.frombuffer(codes.tobytes().decode("utf-32-le").encode("utf-8"), dtype=np.uint8), 0
    if codes.dtype == np.uint8 and _BYTE_MAP is not None:  # ASCII text, a small vocabulary: bytes.translate
        out = codes.tobytes().translate(_BYTE_MAP)
        return np.frombuffer(out, dtype=np.uint8), out.count(_UNK_ID) if count_unknown else 0
    ids = _TABLE[codes]
    return ids, int(np.count_nonzero(ids == _UNK_ID)) if count_unknown else 0


def _encode(job: tuple) -> list | str:
    """One range: [(split, ids, chars, utf-8 bytes, <unk> count)] for each split piece, then the newline that
    joins it to the next file when there is one; or the reason it cannot be read."""
    path, start, end, pieces, join = job
    try:
        codes, _ = read_codes(path, start, end)
    except (OSError, ValueError) as exc:
        return f"{path} changed since prepare began reading it ({exc}); run prepare again"
    out = []
    for split, lo, hi in pieces:
        part = codes[lo:hi]
        ids, unknown = _ids(part, count_unknown=split != "train" or _COUNT_TRAIN)
        out.append((split, ids, len(part), utf8_size(part), unknown))
    if join:
        ids, unknown = _ids(np.array([NEWLINE], dtype=np.uint8))
        out.append((join, ids, 1, 1, unknown))
    return out


# --- sources: the files, and the split of each (WikiText's own) or fractions of the whole ---

class Inputs:
    def __init__(self, files: list[Path], identity: str, splits: list[str] | None = None,
                 fractions: tuple[float, float] = (0.05, 0.05), join: bool = False, min_chars: int = 0):
        self.files, self.identity, self.splits = files, identity, splits
        self.fractions, self.join, self.min_chars = fractions, join, min_chars


def _files_source(cfg: TextDomain, root: Path) -> Inputs:
    # The files joined by newlines, then split by characters: train first, then validation, then test.
    return Inputs(find_files(cfg.files, "books/*.txt"), f"files:{cfg.val_frac}:{cfg.test_frac}", None,
                  (cfg.val_frac, cfg.test_frac), join=True, min_chars=100)


def unzipped(path: Path, root: Path) -> Path:
    """The one text file inside a zip (text8.zip holds `text8`), extracted once under <root>/downloads/; a file that
    is not a zip is itself."""
    if not zipfile.is_zipfile(path):
        return path
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            if not names:
                raise UserError(f"{path} is an empty zip archive")
            member = "text8" if "text8" in names else names[0]
            dest = root / "downloads" / f"{path.stem}-unzipped-{key}" / Path(member).name
            if not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".tmp")
                with diskio.guard(dest, f"the unzipped {member}", cleanup=(tmp,), need=z.getinfo(member).file_size):
                    with z.open(member) as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.replace(tmp, dest)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a full disk is a DiskError, reported as such
        raise UserError(f"{path} is a damaged zip archive ({exc}); download it again or give the unzipped file") \
            from None
    return dest


def _text8_source(cfg: TextDomain, root: Path) -> Inputs:
    alternative = ("Give a local copy with domain.path=/path/to/text8.zip (or the unzipped text8), or use "
                   "domain.source=files domain.files='your/*.txt'.")
    path = local_or_download(cfg.path, TEXT8_URL, root / "downloads" / "text8.zip", "text8", "text8.zip or text8",
                             alternative, known_hash=TEXT8_HASH)
    # The standard split: first 90M characters train, next 5M validation, last 5M test (90/5/5 in general).
    return Inputs([unzipped(path, root)], "text8", None, (0.05, 0.05))


def _wikitext_from_hub(root: Path) -> Path:
    """WikiText-103 raw from the Hugging Face hub, written once as the three raw files (streamed, batch by batch)."""
    folder = root / "downloads" / "wikitext-103-raw-hf"
    if (folder / ".complete").is_file():
        return folder
    require_network("https://huggingface.co", "WikiText-103",
                    "Give a local copy of the raw files with domain.path=/path/to/wikitext-103-raw, or use "
                    "domain.source=files domain.files='your/*.txt'.")
    import datasets

    ds = datasets.load_dataset(*WIKITEXT_HF, cache_dir=str(root / "downloads" / "hf"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with diskio.guard(folder, "WikiText-103's raw files", cleanup=(tmp,)):
        tmp.mkdir(parents=True)
        for split, hf in (("train", "train"), ("val", "validation"), ("test", "test")):
            with open(tmp / WIKITEXT_FILES[split], "w", encoding="utf-8", newline="") as f:
                for batch in ds[hf].iter(batch_size=10_000):
                    f.write("".join(batch["text"]))
        (tmp / ".complete").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _wikitext_source(cfg: TextDomain, root: Path) -> Inputs:
    if cfg.path:
        folder = Path(os.path.expanduser(cfg.path))
        for candidate in (folder, folder / "wikitext-103-raw"):
            if all((candidate / f).is_file() for f in WIKITEXT_FILES.values()):
                folder = candidate
                break
        else:
            raise UserError(f"domain.path={cfg.path!r} must be a folder holding "
                            f"{', '.join(WIKITEXT_FILES.values())}")
    else:
        folder = _wikitext_from_hub(root)
    return Inputs([folder / WIKITEXT_FILES[s] for s in corpus.SPLITS], "wikitext103", list(corpus.SPLITS))


SOURCES = {TextSource.files: _files_source, TextSource.text8: _text8_source, TextSource.wikitext103: _wikitext_source}


# --- the plan: ranges checked and counted, split points, the training vocabulary ---

BYTES_PER_INPUT_BYTE = 24  # a worker's peak per byte of its range (text, code points, ids) plus its queued results


def range_bytes(opts: PrepareConfig, workers: int) -> int:
    """Bytes per range so that `workers` workers stay within prepare.max_memory_mb (1 MiB .. 8 MiB: larger ranges
    save nothing measurable and only raise the peak)."""
    budget = (opts.max_memory_mb - 200) * 2**20  # ~200 MB for the interpreters themselves
    return int(np.clip(budget / (workers * BYTES_PER_INPUT_BYTE), 1 << 20, 8 << 20))


@dataclass
class _Scanned:
    """The first pass: every byte range (file index, start, end) with its characters and, for the char tokenizer,
    its histogram; which ranges and files are usable; the bytes read."""
    files: list[Path]
    ranges: list[tuple[int, int, int]]
    chars: list[int]
    histograms: list
    good: list[int]  # indices into ranges: the ranges of usable files
    good_files: list[int]  # indices into files
    size: int


def _plan(src: Inputs, cfg: TextDomain, opts: PrepareConfig, problems: Problems, every_char: bool = False) -> dict:
    """The second pass's work, from one parallel scan of the inputs: each range's pieces of the splits, the newline
    that joins a file to the next, the characters per split, and the training vocabulary. every_char: also count
    every character of every split (what a run's vocabulary may lack, eval.shift)."""
    char = cfg.tokenizer == TextTokenizer.char
    scan = _scan_ranges(src.files, char, opts, problems)
    bounds = _bounds(src, cfg, scan) if src.splits is None else []  # []: each file is its split
    jobs, split_chars, counts = _assign(src, scan, bounds, char)
    empty = [s for s in corpus.SPLITS if not split_chars[s]]
    if empty:
        raise UserError(f"no usable text left for the {'/'.join(empty)} split(s) ({problems.n_skipped} file(s) "
                        f"skipped: {', '.join(list(problems.skipped)[:3])})")
    every = None
    if every_char and char:  # {code point: count} over every split
        total = np.zeros(0x110000, dtype=np.int64)
        for k in scan.good:
            total[scan.histograms[k][0]] += scan.histograms[k][1]
        every = {int(c): int(total[c]) for c in np.flatnonzero(total)}
    return {"jobs": jobs, "chars": split_chars, "bytes_in": scan.size, "vocab": np.flatnonzero(counts).tolist(),
            "every_char": every, "problems": problems.state(), "files": [str(f) for f in src.files[:100]], "n_files": len(src.files)}


def _scan_ranges(files: list[Path], char: bool, opts: PrepareConfig, problems: Problems) -> _Scanned:
    """Cut every file into ranges, check and count each in parallel; a file with a bad range is skipped whole."""
    unit = range_bytes(opts, worker_count(opts, 1 << 30))
    ranges = [(i, a, b) for i, f in enumerate(files) for a, b in byte_ranges(f, os.path.getsize(f), unit)]
    size = sum(b - a for _, a, b in ranges)
    workers = 1 if size < SMALL else worker_count(opts, len(ranges))
    chars, histograms, bad = [], [], {}
    scans = ordered_map(_scan, [(str(files[i]), a, b, char) for i, a, b in ranges], workers)
    for (i, _, _), res in zip(ranges, scans):
        if "error" in res:
            bad.setdefault(i, res["error"])
        chars.append(res.get("chars", 0))
        histograms.append(res.get("histogram"))
    for i in sorted(bad):
        problems.skip(files[i], bad[i])
    good = [k for k, (i, _, _) in enumerate(ranges) if i not in bad]
    good_files = [i for i in range(len(files)) if i not in bad]
    if not good_files:
        first = next(iter(problems.skipped.items()), ("", ""))
        raise UserError(f"no usable text left: {problems.n_skipped} file(s) skipped, e.g. {first[0]}: {first[1]}")
    return _Scanned(files, ranges, chars, histograms, good, good_files, size)


def _bounds(src: Inputs, cfg: TextDomain, scan: _Scanned) -> list[tuple[str, int, int]]:
    """Where each split lies in the usable text taken as one (in characters, joining newlines included): train,
    then val, then test, by the source's fractions."""
    total = sum(scan.chars[k] for k in scan.good) + (len(scan.good_files) - 1 if src.join else 0)
    if total < src.min_chars:
        raise UserError(f"domain.files={cfg.files!r} holds only {total} characters; give more text")
    n_val, n_test = int(total * src.fractions[0]), int(total * src.fractions[1])
    n_train = total - n_val - n_test
    return [("train", 0, n_train), ("val", n_train, n_train + n_val), ("test", n_train + n_val, total)]


def _assign(src: Inputs, scan: _Scanned, bounds: list[tuple[str, int, int]], char: bool
            ) -> tuple[list, dict[str, int], np.ndarray]:
    """Each usable range as a job of the second pass: its pieces [split, first, end) in its own characters (by the
    split bounds, else its file's split) and the split of the newline after a file's last range, if it joins the
    next. Also the characters each split receives and, for the char tokenizer, the training characters' counts."""
    files, ranges = scan.files, scan.ranges
    last_range = {ranges[k][0]: k for k in scan.good}
    counts = np.zeros(0x110000 if char else 0, dtype=np.int64)
    split_chars = {s: 0 for s in corpus.SPLITS}
    jobs, pos = [], 0
    for k in scan.good:
        i, start, end = ranges[k]
        n = scan.chars[k]
        if bounds:
            pieces = [[s, max(pos, lo) - pos, min(pos + n, hi) - pos] for s, lo, hi in bounds
                      if max(pos, lo) < min(pos + n, hi)]
        else:
            pieces = [[src.splits[i], 0, n]] if n else []
        for s, lo, hi in pieces:
            split_chars[s] += hi - lo
            if char and s == "train":
                if lo == 0 and hi == n:
                    present, c = scan.histograms[k]
                else:  # the range the train/val boundary cuts: count its training part again
                    present, c = histogram(read_codes(str(files[i]), start, end)[0][lo:hi])
                counts[present] += c
        pos += n
        join = None
        if src.join and last_range[i] == k and i != scan.good_files[-1]:
            join = next(s for s, lo, hi in bounds if lo <= pos < hi)
            split_chars[join] += 1
            if char and join == "train":
                counts[NEWLINE] += 1
            pos += 1
        jobs.append([str(files[i]), start, end, pieces, join])
    return jobs, split_chars, counts


def prepare_text(cfg: TextDomain, root: Path, opts: PrepareConfig | None = None, given: RunTokenizer | None = None,
                 out: Path | None = None) -> Path:
    """The corpus of cfg under root (or at out). given: tokenize with a trained run's vocabulary instead of fitting
    one on the train split (eval.shift); a character it lacks becomes the reserved id len(vocab), counted."""
    opts = opts or PrepareConfig()
    out = out or corpus.corpus_dir(root, cfg)
    src = SOURCES[cfg.source](cfg, root)
    problems = Problems(cfg.on_error, "text")
    identity = f"{src.identity}|{json.dumps(corpus.settings_of(cfg), sort_keys=True)}|{given.key if given else ''}"
    src.files, input_hash = survey(src.files, identity, problems)
    if already_done(out, input_hash, problems):
        return out
    with corpus.CorpusWriter(out, input_hash) as w:
        plan = kept(w, "plan.json", lambda: _plan(src, cfg, opts, problems, every_char=given is not None))
        problems = Problems(cfg.on_error, "text", plan["problems"])
        tok, limit, initargs = _tokenizer(cfg, plan, given)
        w.begin(corpus.token_dtype(limit), limit)
        stats = _encode_ranges(w, plan, opts, initargs)
        unknown = {s: stats["unknown"][s] for s in (corpus.SPLITS if given else ("val", "test"))}
        if isinstance(tok, CharTokenizer) and given is None and any(unknown.values()):
            tok = tok.with_unk()
        meta = w.finish(_meta(cfg, plan, stats, tok, unknown, input_hash, problems, given))
    log.info("wrote %s: vocab %d, tokens train/val/test %s", out, tok.vocab_size,
             "/".join(f"{meta['tokens'][s]:,}" for s in corpus.SPLITS))
    if any(unknown.values()):
        log.warning("characters %s mapped to %s: %s", "the run's vocabulary lacks" if given else "unseen in train",
                    "the reserved id" if given else "<unk>", unknown)
    problems.report()
    return out


def _tokenizer(cfg: TextDomain, plan: dict, given: RunTokenizer | None) -> tuple:
    """(tokenizer, ids' upper limit, the workers' table arguments). With a run's vocabulary, every character it
    lacks maps to len(vocab): an id past the run's vocabulary that marks the place (shortcut.robustness)."""
    if cfg.tokenizer != TextTokenizer.char:
        return ByteTokenizer(), 256, (None,)
    if given is None:
        tok = CharTokenizer([chr(c) for c in plan["vocab"]])
        limit = tok.vocab_size + 1  # room for <unk>, kept only if val or test needs it
        return tok, limit, (tok.table(corpus.token_dtype(limit)), tok.vocab_size)
    tok = CharTokenizer(given.vocab, unk=given.unk)
    reserved = tok.vocab_size
    table = tok.table(corpus.token_dtype(reserved + 1))
    table[table == len(tok.codepoints)] = reserved  # the run's <unk> placeholder is no character either
    return tok, reserved + 1, (table, reserved, True)


def _meta(cfg: TextDomain, plan: dict, stats: dict, tok, unknown: dict, input_hash: str, problems: Problems,
          given: RunTokenizer | None) -> dict:
    chars = plan["chars"]
    meta = {
        "domain": cfg.name, "source": str(cfg.source), "tokenizer": str(cfg.tokenizer),
        "vocab_size": tok.vocab_size, "chars": chars, "bytes": stats["bytes"],
        "units": {"char": chars},  # eval reports bits per character
        "unknown_chars": unknown, "inputs": plan["files"], "n_inputs": plan["n_files"],
        "input_hash": input_hash, "settings": corpus.settings_of(cfg), **problems.state(),
    }
    if isinstance(tok, CharTokenizer):
        meta["vocab"], meta["unk"] = tok.chars, tok.unk_id is not None
    if given is not None:
        meta["run_tokenizer"] = given.key
        if isinstance(tok, CharTokenizer):  # the ids run to the reserved one; what it stood for, most frequent first
            known = set(tok.codepoints.tolist())
            lacking = sorted(((n, c) for c, n in (plan["every_char"] or {}).items() if int(c) not in known),
                             reverse=True)
            meta.update({"vocab_size": tok.vocab_size + 1, "reserved_id": tok.vocab_size,
                         "unknown_examples": [[chr(int(c)), n] for n, c in lacking[:20]],
                         "n_unknown_kinds": len(lacking)})
    return meta


def _encode_ranges(w: corpus.CorpusWriter, plan: dict, opts: PrepareConfig, initargs: tuple) -> dict:
    """The plan's ranges tokenized by parallel workers and appended in order, committed every few seconds (a resumed
    prepare goes on after its last commit); returns the UTF-8 bytes and <unk> ids per split."""
    jobs = plan["jobs"]
    workers = 1 if plan["bytes_in"] < SMALL else worker_count(opts, len(jobs) - w.done)
    stats = w.stats or {"bytes": {s: 0 for s in corpus.SPLITS}, "unknown": {s: 0 for s in corpus.SPLITS}}
    commit = Committer(w)
    for k, result in enumerate(ordered_map(_encode, jobs[w.done:], workers, _set_table, initargs), w.done):
        if isinstance(result, str):
            raise UserError(result)
        for split, ids, _, n_bytes, unknown in result:
            w.append(split, ids)
            stats["bytes"][split] += n_bytes
            stats["unknown"][split] += unknown
        commit(k + 1, lambda: stats)
    commit(len(jobs), lambda: stats, force=True)
    return stats
