"""Shifted corpora (eval.shift, issue 23): another source of a run's domain, tokenized with the run's own tokenizer.

A shift is either the run's domain settings with some *source* keys changed ('collection=essenFolksong',
'files=other/*.txt'), prepared once and cached under <root>/<domain>/shifted/ keyed by those settings and the run's
tokenizer, or the folder of a corpus already prepared with that tokenizer. What decides the tokens (tokenizer,
pitch range, codebook, sample rate, ...) is always the run's: a shift that changes it, or names another domain,
is refused in one line, and so is a prepared corpus whose ids mean other symbols than the run's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from shortcut import corpus
from shortcut.config import AudioDomain, MusicDomain, PrepareConfig, TextDomain, UserError
from shortcut.prepare.common import RunTokenizer

SCHEMAS = {"text": TextDomain, "music": MusicDomain, "audio": AudioDomain}
# The keys a shift may change: where the data comes from and how it is split, never how it becomes tokens.
SOURCE_KEYS = {
    "text": ("source", "files", "path", "val_frac", "test_frac", "on_error"),
    "music": ("source", "collection", "max_pieces", "files", "path", "val_frac", "test_frac", "on_error"),
    "audio": ("source", "files", "path", "train_subsets", "val_subsets", "test_subsets", "by_speaker", "max_files",
              "val_frac", "test_frac", "text", "voices", "rates", "utterances", "seed", "on_error"),
}
# chosen: naming files (or a music21 collection) implies the source that reads them
IMPLIED_SOURCE = {"files": "files", "collection": "music21"}


@dataclass
class Shift:
    """A prepared shifted corpus and what the run's tokenizer could not represent in it."""
    spec: str  # as given to eval.shift
    path: Path
    meta: dict

    def unknown(self, split: str) -> dict:
        """How much of the split the run's tokenizer lacks: characters outside its vocabulary (text), notes
        outside its pitch range (music); none for bytes and audio (every frame has a nearest code)."""
        m = self.meta
        if m.get("reserved_id") is not None:
            n = int(m["unknown_chars"].get(split, 0))
            return {"what": "characters outside the run's vocabulary", "n": n, "rate": n / max(1, m["tokens"][split]),
                    "examples": m.get("unknown_examples", []), "examples_from": "every split, most frequent first",
                    "kinds": m.get("n_unknown_kinds", 0)}
        if "notes_outside_range" in m:
            n = int(m["notes_outside_range"].get(split, 0))
            total = n + int(m["notes"].get(split, 0))
            return {"what": "notes outside the run's pitch range (miditok leaves them out)", "n": n,
                    "rate": n / max(1, total), "examples": [], "kinds": None}
        return {"what": "nothing: every input has a token", "n": 0, "rate": 0.0, "examples": [], "kinds": None}


def run_tokenizer(meta: dict, path: Path) -> RunTokenizer:
    """The tokenizer a run's corpus was made with, and its identity."""
    path = Path(path)
    if meta["domain"] == "text" and meta["tokenizer"] == "char":
        vocab, unk = list(meta["vocab"]), bool(meta.get("unk", False))
        return RunTokenizer(_hash(json.dumps([vocab, unk]).encode()), vocab=vocab, unk=unk)
    if meta["domain"] == "music":
        blob = (path / "tokenizer.json").read_bytes()
        return RunTokenizer(_hash(blob), blob=blob)
    if meta["domain"] == "audio":  # the features (rate, mel frames, ...) and, for k-means, the codebook
        shaping = {k: v for k, v in (meta.get("settings") or {}).items() if k not in SOURCE_KEYS["audio"]}
        blob = json.dumps(shaping, sort_keys=True).encode()
        codebook = np.load(path / "codebook.npy") if (path / "codebook.npy").is_file() else None
        if codebook is not None:
            buf = io.BytesIO()
            np.save(buf, codebook)
            blob += buf.getvalue()
        return RunTokenizer(_hash(blob), codebook=codebook)
    return RunTokenizer(str(meta["tokenizer"]))  # bytes: the same for every text


def _hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:12]


def _value(schema, key: str, text: str):
    """A setting's value from its text: kept as written for a string field, else read as YAML (numbers, lists)."""
    import yaml

    kind = str(next(f.type for f in fields(schema) if f.name == key))
    if "str" in kind and "List" not in kind:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse(spec: str, domain: dict) -> dict:
    """The settings a shift changes, {key: value}, checked against what a shift may change in this domain."""
    name = domain["name"]
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise UserError(f"eval.shift={spec!r}: {exc}") from None
    changes = {}
    for word in words:
        key, eq, text = word.partition("=")
        key = key.removeprefix("domain.")
        if not eq or not key:
            raise UserError(f"eval.shift={spec!r}: {word!r} is not key=value (e.g. eval.shift='files=other/*.txt'), "
                            f"nor a prepared corpus folder")
        if key in ("name", "domain"):
            raise UserError(f"eval.shift={spec!r}: a shift stays in the run's domain ({name}); another domain's "
                            f"corpus cannot be read by this run's model")
        if key not in SOURCE_KEYS[name]:
            known = {f.name for f in fields(SCHEMAS[name])}
            why = (f"domain.{key} decides how the data becomes tokens, and a shifted corpus is tokenized with the "
                   f"run's own tokenizer (domain.{key}={domain.get(key)!r})" if key in known
                   else f"the {name} domain has no setting {key}")
            raise UserError(f"eval.shift={spec!r}: {why}; a shift may set {', '.join(SOURCE_KEYS[name])}")
        changes[key] = _value(SCHEMAS[name], key, text)
    if not changes:
        raise UserError(f"eval.shift={spec!r} changes nothing; give source settings (e.g. 'files=other/*.txt')")
    for key, source in IMPLIED_SOURCE.items():
        if key in changes and key in SOURCE_KEYS[name] and "source" not in changes:
            changes["source"] = source
    return changes


def shifted_config(spec: str, domain: dict):
    """The typed domain config of a shift: the run's settings with the shift's changes."""
    changes = parse(spec, domain)
    same = all(domain.get(k) == v for k, v in changes.items())
    if same:
        raise UserError(f"eval.shift={spec!r} describes the run's own corpus; name another source")
    try:
        return SCHEMAS[domain["name"]](**{**domain, **changes})
    except (TypeError, ValueError) as exc:
        raise UserError(f"eval.shift={spec!r}: {exc}") from None


def shifted_dir(root: Path, cfg, tok: RunTokenizer) -> Path:
    """<root>/<domain>/shifted/<source>-<hash>: keyed by every setting, where the inputs are, and the tokenizer (a
    shift of files must never share the folder of the run's own corpus, which files do not key)."""
    settings = {**corpus.settings_of(cfg), "files": cfg.files, "path": cfg.path, "run_tokenizer": tok.key}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path(root) / cfg.name / "shifted" / f"{cfg.source}-{key}"


def prepare_shift(spec: str, domain: dict, run_meta: dict, run_corpus: Path, root: Path,
                  opts: PrepareConfig | None = None) -> Shift:
    """The shifted corpus eval.shift names, prepared (once) with the run's tokenizer, or a prepared one checked."""
    tok = run_tokenizer(run_meta, run_corpus)
    folder = Path(os.path.expanduser(spec))
    if (folder / corpus.META).is_file():
        meta = corpus.read_meta(folder)
        check_compatible(spec, meta, folder, run_meta, tok)
        return Shift(spec, folder, meta)
    cfg = shifted_config(spec, domain)
    out = shifted_dir(root, cfg, tok)
    if domain["name"] == "text":
        from shortcut.prepare.text import prepare_text

        prepare_text(cfg, root, opts, given=tok, out=out)
    elif domain["name"] == "music":
        from shortcut.prepare.music import prepare_music

        prepare_music(cfg, root, opts, given=tok, out=out)
    else:
        from shortcut.prepare.audio import prepare_audio

        prepare_audio(cfg, root, opts, given=tok, out=out)
    return Shift(spec, out, corpus.read_meta(out))


def check_compatible(spec: str, meta: dict, folder: Path, run_meta: dict, tok: RunTokenizer) -> None:
    """A prepared corpus can be a shift only when its ids mean the run's symbols: one line saying why not."""
    head = f"eval.shift={spec!r}"
    if meta.get("domain") != run_meta["domain"]:
        raise UserError(f"{head} is a {meta.get('domain')} corpus; this run models {run_meta['domain']}")
    if meta.get("tokenizer") != run_meta["tokenizer"]:
        raise UserError(f"{head} holds {meta.get('tokenizer')} tokens; this run's model reads "
                        f"{run_meta['tokenizer']} tokens: give its source instead (eval.shift='files=...') to "
                        f"tokenize it with the run's own tokenizer")
    if meta.get("run_tokenizer") == tok.key or run_tokenizer(meta, folder).key == tok.key:
        return
    raise UserError(f"{head} was tokenized with another {meta['tokenizer']} tokenizer than this run's (another "
                    f"vocabulary, tokenizer.json or codebook): its ids mean other symbols; give its source instead "
                    f"(e.g. eval.shift='files=...') to tokenize it with the run's own tokenizer")
