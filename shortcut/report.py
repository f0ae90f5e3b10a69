"""report.html (issue 23): the depth audit as one page a person can browse, self-contained (inline data, script and
styles; no network, no server), each audited token in the domain's own symbols, coloured by the depth it drew on.

The page holds one JSON document (read() returns it): the run's identity, then a list of *conditions* (in-domain
first; a shifted or noisy evaluation adds its own with set_conditions), each with its headline numbers and its
windows. Per predicted token: its NLL, its profile over the layers it can read (the shortcut's attention mass per
tap, or a layer-weighing variant's normalised last mix), the (tap, position) pairs it attends to most, and what the
measured early exits do to it. Chosen: a window's first token is shown as context only (nothing predicts it); every
later one is the *target* of the prediction made just before it, as depth.json's by_class counts targets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from shortcut import diskio
from shortcut.config import EvalConfig, ModelConfig
from shortcut.data import TokenData
from shortcut.model import GPT

FILE = "report.html"
FORMAT = 1  # of the embedded document; read() refuses another
DATA_OPEN, DATA_CLOSE = '<script type="application/json" id="report-data">', "</script>"
STRIP_ROWS = 32  # mel bands of the k-means audio strip (the codebook's n_mels, averaged down)
UNKNOWN = "\ufffd"  # a shifted source's symbol that the run's vocabulary lacks


def shown(m: dict, cfg: EvalConfig) -> tuple[int, int]:
    """How many audit windows the page shows and how many tokens of each (eval.audit_plots, eval.audit_plot_tokens:
    the same caps as depth_profile.png, which keep the page small)."""
    n_seq, T = m["loss"].shape
    return min(cfg.audit_plots, n_seq), min(cfg.audit_plot_tokens, T)


def _r(t, digits: int = 3):
    """Rounded nested lists: the page carries three decimals, not float32 noise."""
    a = np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
    return np.round(a, digits).tolist()


def _settings(cfg: ModelConfig) -> list[str]:
    """model.KEY=VALUE for the size and every field that differs from the default (what makes this run this run)."""
    default = ModelConfig()
    always = {"arch", "n_layer", "n_head", "n_embd", "block_size"}
    return [f"model.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if f.name in always or getattr(cfg, f.name) != getattr(default, f.name)]


def identity(model: GPT, data: TokenData, cfg: EvalConfig, checkpoint_hash: str, run: dict | None, out: Path) -> dict:
    """The header: which run, checkpoint, corpus and settings the page shows, and the evaluation's NLL (run: the
    eval record so far, shortcut.rundir.EvalRecord.to_dict(); None for an audit outside `shortcut eval`)."""
    run = run or {}
    meta = data.meta
    out = Path(out).resolve()
    ident = {"run": out.parent.name if out.name == "audit" else str(out), "arch": str(model.cfg.arch),
             "checkpoint_step": run.get("checkpoint_step"), "finished": run.get("finished"),
             "checkpoint_hash": checkpoint_hash or run.get("checkpoint_hash"),
             "corpus": {"domain": meta["domain"], "source": meta["source"], "tokenizer": meta["tokenizer"],
                        "vocab_size": data.vocab_size, "data_hash": data.content_hash},
             "settings": _settings(model.cfg),
             "audit": {"split": "val", "sequences": cfg.audit_sequences,
                       "seq_len": min(cfg.audit_seq_len or data.block_size, data.block_size), "exit": str(cfg.exit)},
             "eval": _eval_header(run)}
    return ident


def _eval_header(run: dict) -> dict | None:
    if "nll" not in run:
        return None
    return {"split": run["split"], "nll": run["nll"], "bits_per_token": run["nll"] / math.log(2),
            "n_tokens": run["n_tokens"], "units": run.get("units") or {}}


def _profiles(m: dict, summary: dict) -> tuple[torch.Tensor | None, list[int], str | None]:
    """Per token, the distribution over source layers it drew on (N, T, S), the sources, and what it is."""
    if m.get("profile") is not None:
        return m["profile"], list(summary["taps"]), "shortcut attention mass over taps (final block)"
    lw, info = m.get("layer_weights"), m.get("layer_weights_info")
    if lw is not None and info and info.get("normalised"):
        return lw[:, :, -1, :].float(), list(info["sources"]), f"{info['kind']} ({info['consumers'][-1]})"
    return None, [], None


def condition(name: str, kind: str, m: dict, summary: dict, labels: list[str], data: TokenData,
              exits: dict | None, n: int, W: int, note: str = "", headline: dict | None = None) -> dict:
    """One condition of the page (kind: in-domain, shift or noise) from an audit's measurement m (audit.measure)
    and its summary (audit.summarise): headline numbers over every audited window, and the first n windows' first
    W tokens in full. headline: extra named numbers to show (e.g. a shift's NLL difference)."""
    profile, sources, what = _profiles(m, summary)
    src = m.get("source")  # the window as its source has it: names and piano roll of the symbols shown
    shown_inputs = m["inputs"][:n, :W] if src is None else torch.from_numpy(np.maximum(src[:n, :W], 0))
    extras = domain_extras(data, shown_inputs, m["targets"][:n, :W])
    seqs = [_sequence(m, r, W, labels, profile, sources, exits, extras[r]) for r in range(n)]
    # the scored predictions (N, T): all, or those whose target the run's vocabulary holds; every number is over them
    scored = torch.ones_like(m["loss"], dtype=torch.bool) if src is None else torch.as_tensor(src[:, 1:] >= 0)
    cond = {"name": name, "kind": kind, "note": note, "headline": dict(headline or {}),
            "nll": float(m["loss"][scored].double().sum() / max(int(scored.sum()), 1)), "n_sequences": int(m["loss"].shape[0]),
            "n_tokens": int(scored.sum()), "sources": sources, "profile_kind": what, "sequences": seqs}
    if profile is not None:
        flat = profile[scored].double()  # (scored tokens, S)
        cond["mean_profile"] = flat.mean(dim=0).tolist()
        cond["mean_depth"] = float((flat @ torch.tensor(sources, dtype=torch.float64)).mean())
    for key in ("share_shallow", "spearman_depth_vs_loss"):
        if key in summary:
            cond[key] = summary[key]
    if exits is not None and "confidence" in exits:
        cond["exit_summary"] = exit_summary(exits, m["loss"][:n, :W], scored[:n, :W])
    return cond


def _sequence(m: dict, r: int, W: int, labels: list[str], profile, sources: list[int], exits: dict | None,
              extra: dict) -> dict:
    """Window r's first W predictions. Element 0 is its first input (context); element k >= 1 is target k - 1.
    A condition whose source differs from what the model read (noise, a shift's unknown symbols) carries
    m["source"] (N, T + 1): the window's tokens as the source has them (-1: a symbol the run's vocabulary lacks,
    shown as UNKNOWN and not scored); "read" then lists the elements the model read as something else."""
    source = m.get("source")
    ids = [int(m["inputs"][r, 0])] + m["targets"][r, :W].tolist() if source is None else source[r, :W + 1].tolist()
    nll = _r(m["loss"][r, :W])
    if source is not None:
        nll = [None if ids[k + 1] < 0 else v for k, v in enumerate(nll)]
    seq = {"start": int(m["starts"][r]), "ids": ids, "sym": [labels[i] if i >= 0 else UNKNOWN for i in ids],
           "nll": nll, **extra}
    if source is not None:
        read = m["inputs"][r, :W].tolist()
        seq["read"] = [[k, labels[v]] for k, v in enumerate(read) if v != ids[k]]
    if profile is not None:
        p = profile[r, :W].double()  # (W, S)
        seq["profile"] = _r(p)
        seq["depth"] = _r(p @ torch.tensor(sources, dtype=torch.float64))
    if m.get("top_pairs") is not None:
        T = m["loss"].shape[1]
        pairs, weights = m["top_pairs"][r, :W], m["top_weights"][r, :W]  # (W, k): tap * T + key position
        # key position j is element j (input j); kept where it holds some mass
        seq["top"] = [[[int(i % T), int(i // T), round(float(w), 3)] for i, w in zip(pairs[q], weights[q]) if w >= 1e-3]
                      for q in range(W)]
    if exits is not None:
        seq.update(_token_exits(exits, r))
        for k, v in enumerate(nll):  # an unscored target has no exit NLL either
            for kind in ("exit", "fixed"):
                if v is None and kind in seq:
                    seq[kind]["nll"][k] = [None] * len(seq[kind]["nll"][k])
    return seq


def _token_exits(exits: dict, r: int) -> dict:
    out = {}
    if "fixed" in exits:
        out["fixed"] = {"depths": exits["depths"], "nll": _r(exits["fixed"]["nll"][r]),
                        "confidence": _r(exits["fixed"]["confidence"][r])}
    if "confidence" in exits:
        c = exits["confidence"]
        out["exit"] = {"thresholds": c["thresholds"], "full_depth": exits["depths"][-1],
                       "depth": c["depth"][r].tolist(), "confidence": _r(c["confidence"][r]), "nll": _r(c["nll"][r]),
                       "differs": c["differs"][r].int().tolist()}
    return out


def exit_summary(exits: dict, full_nll: torch.Tensor, scored: torch.Tensor | None = None) -> list[dict]:
    """Per confidence threshold over the shown (scored) tokens: the share that exits before the full depth, the
    share of those whose top-1 differs from the full model's (unsafe exits), and their mean NLL increase over the
    full model. (A token that runs the full depth can differ too: it reads the copied states of earlier exits.)"""
    c, full = exits["confidence"], exits["depths"][-1]
    scored = torch.ones_like(full_nll, dtype=torch.bool) if scored is None else scored
    rows = []
    for j, t in enumerate(c["thresholds"]):
        early = (c["depth"][..., j] < full) & scored
        n = int(early.sum())
        rows.append({"threshold": t, "early_share": n / max(int(scored.sum()), 1), "n_early": n,
                     "unsafe_share": float(c["differs"][..., j][early].double().mean()) if n else None,
                     "nll_increase": float((c["nll"][..., j] - full_nll)[early].double().mean()) if n else None})
    return rows


# --- the domain's own symbols: a piano roll for music, a spectrogram-like strip for audio ---

def domain_extras(data: TokenData, inputs: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """Per shown window (inputs, targets (n, W)), what the page draws beside the tokens: music's full token names
    and piano roll; audio's strip (the k-means centroid's log-mel frame per token, mu-law's decoded amplitude, or
    the code ids themselves where neither is at hand, e.g. EnCodec)."""
    ids = [[int(x[0])] + y.tolist() for x, y in zip(inputs, targets)]  # element 0 the first input, then targets
    domain = data.meta["domain"]
    if domain == "music" and not data.meta.get("bpe_vocab"):
        from shortcut.prepare.music import load_tokenizer

        tok = load_tokenizer(data.path)
        per_beat = int(getattr(tok.config, "max_num_pos_per_beat", 0) or max(tok.config.beat_res.values()))
        return [{"name": [tok[i] for i in seq], "roll": piano_roll([tok[i] for i in seq], per_beat)} for seq in ids]
    if domain == "audio":
        return [{"strip": audio_strip(data, seq)} for seq in ids]
    return [{} for _ in ids]


def _beats(value: str) -> float:
    """miditok's duration 'beats.ticks.resolution' (Duration_1.4.8: 1.5 beats) as beats."""
    parts = [int(p) for p in value.split(".")]
    return parts[0] + (parts[1] / parts[2] if len(parts) == 3 and parts[2] else 0.0)


def piano_roll(names: list[str], per_beat: int) -> list[list]:
    """Notes [start, duration (beats, from the window's first bar), pitch, element] read from miditok token names
    (REMI's Bar/Position/Pitch/Duration, TSD's and Structured's TimeShift, MIDILike's NoteOn/NoteOff). Element:
    the token that sounds the note. A window starts mid-piece, so times are relative to its first token."""
    t, bar, bar_len, pending, sounding, notes = 0.0, 0.0, 4.0, None, {}, []
    for k, name in enumerate(names):
        kind, _, value = name.partition("_")
        if kind == "Bar":  # the bar before ends (a window's first, partial bar counts as a whole one)
            bar = t = bar + bar_len
        elif kind == "Position":
            t = bar + int(value) / per_beat
        elif kind in ("TimeShift", "Rest"):
            t += _beats(value)
        elif kind == "TimeSig" and "/" in value:  # REMI: right after the Bar it applies to
            num, den = value.split("/")
            bar_len = int(num) * 4 / int(den)
        elif kind in ("Pitch", "PitchDrum", "PitchIntervalTime", "PitchIntervalChord") and value.lstrip("-").isdigit():
            pending = (int(value), k, t)
        elif kind == "Duration" and pending is not None:
            notes.append([round(pending[2], 4), _beats(value), pending[0], pending[1]])
            pending = None
        elif kind == "NoteOn":
            sounding[int(value)] = (k, t)
        elif kind == "NoteOff" and int(value) in sounding:
            k0, t0 = sounding.pop(int(value))
            notes.append([round(t0, 4), max(t - t0, 1 / per_beat), int(value), k0])
    return notes


def audio_strip(data: TokenData, ids: list[int]) -> dict:
    meta = data.meta
    if meta["tokenizer"] == "kmeans" and (data.path / "codebook.npy").is_file():
        book = np.load(data.path / "codebook.npy")  # (codes, n_mels) log-mel centroids
        bands = np.array_split(np.arange(book.shape[1]), min(STRIP_ROWS, book.shape[1]))
        frames = np.stack([book[ids][:, b].mean(axis=1) for b in bands], axis=1)  # (W + 1, rows), low band first
        lo, hi = float(frames.min()), float(frames.max())
        scaled = np.round(255 * (frames - lo) / max(hi - lo, 1e-6)).astype(int)
        return {"kind": "log-mel frame of each token's k-means centroid (low bands at the bottom)", "rows": len(bands),
                "values": scaled.tolist()}
    if meta["tokenizer"] == "mulaw":
        from shortcut.prepare.audio import MuLaw

        return {"kind": "amplitude (mu-law decoded)", "rows": 1,
                "values": [[round(float(v), 3)] for v in MuLaw(meta.get("sample_rate") or 8000).decode(ids)]}
    return {"kind": "code ids (no waveform or centroids at hand)", "rows": 1, "values": [[i] for i in ids]}


# --- the document and the page ---

def document(ident: dict, conditions: list[dict]) -> dict:
    """The page's data: identity, then conditions (in-domain first). Each condition carries its own windows, so a
    shifted corpus shows its own tokens and a noisy one its corrupted context."""
    first = conditions[0]
    return {"format": FORMAT, "generator": "shortcut.report", "identity": ident,
            "domain": ident["corpus"]["domain"], "depth_attention": first.get("profile_kind"),
            "caps": {"sequences": len(first["sequences"]),
                     "tokens": len(first["sequences"][0]["nll"]) if first["sequences"] else 0},
            "conditions": conditions, "size_bytes": None}


def render(doc: dict) -> str:
    """The page: the template with the document inlined ('</' escaped, so no string in it can close the script)."""
    blob = json.dumps(doc, separators=(",", ":"), allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    title = f"depth audit: {doc['identity']['run']}".replace("&", "&amp;").replace("<", "&lt;")
    return TEMPLATE.replace("__TITLE__", title).replace("__DATA__", blob)


def write(path: Path, doc: dict) -> tuple[Path, int]:
    """Render and write atomically; the page states its own size (measured on a first rendering: the digits of
    the number itself change it by a few bytes). Returns the path and the size in bytes."""
    doc = {**doc, "size_bytes": len(render(doc).encode())}
    html = render(doc)
    diskio.atomic_write(Path(path), html, "the audit report")
    return Path(path), len(html.encode())


def read(path: Path) -> dict:
    """The document a report.html holds; refuses a page that is not one, or of another format."""
    from shortcut.config import UserError

    text = Path(path).read_text(encoding="utf-8")
    found = re.search(re.escape(DATA_OPEN) + r"(.*?)" + re.escape(DATA_CLOSE), text, re.S)
    if found is None:
        raise UserError(f"{path} holds no report data (not written by shortcut.report)")
    doc = json.loads(found.group(1))
    if doc.get("format") != FORMAT:
        raise UserError(f"{path} is report format {doc.get('format')}; this shortcut reads {FORMAT} (re-run eval)")
    return doc


def set_conditions(path: Path, conditions: list[dict], run: dict | None = None) -> tuple[Path, int]:
    """Keep the report's in-domain condition and replace every other with these (none: in-domain alone), so the
    page never shows a shifted or noisy view that the evaluation beside it did not measure; run (the evaluation's
    record, as for identity): the header's evaluation numbers become its."""
    doc = read(path)
    doc["conditions"] = [c for c in doc["conditions"] if c.get("kind") == "in-domain"][:1] + list(conditions)
    if run is not None:
        doc["identity"]["eval"] = _eval_header(run)
    return write(path, doc)


# The page. Plain DOM and SVG, no library; everything it draws comes from the JSON above. A URL fragment
# #c=CONDITION&s=WINDOW&k=TOKEN pins a token on load (links to one token's choice; the screenshot in docs uses it).
TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --fg:#1d1d1f; --mut:#6b6b70; --line:#d8d8dc; --bg:#fafafa; --hi:#e0115f; }
* { box-sizing:border-box; }
body { margin:0; font:13px/1.4 system-ui, "DejaVu Sans", sans-serif; color:var(--fg); background:var(--bg); }
header { padding:10px 18px 8px; border-bottom:1px solid var(--line); background:#fff; }
h1 { font-size:17px; margin:0 0 4px; }
h2 { font-size:13px; margin:10px 0 4px; }
.ident { display:flex; flex-wrap:wrap; gap:2px 16px; color:var(--mut); font-size:12px; }
.ident b { color:var(--fg); font-weight:600; }
.settings { font:11px ui-monospace, "DejaVu Sans Mono", monospace; color:var(--mut); margin-top:3px; }
.top { display:flex; gap:22px; flex-wrap:wrap; align-items:flex-start; margin-top:6px; }
table { border-collapse:collapse; font-size:12px; }
td, th { padding:1px 10px 1px 0; text-align:left; vertical-align:top; }
th { color:var(--mut); font-weight:500; }
td.n { text-align:right; font-variant-numeric:tabular-nums; }
.conds { margin-top:6px; }
.conds button { border:1px solid var(--line); background:#fff; padding:2px 10px; border-radius:12px; cursor:pointer; margin-right:4px; font:inherit; }
.conds button.on { background:var(--fg); color:#fff; border-color:var(--fg); }
.wrap { display:flex; align-items:flex-start; }
main { flex:1; padding:10px 18px; min-width:0; }
aside { width:330px; flex:none; position:sticky; top:0; max-height:100vh; overflow:auto; padding:8px 14px; border-left:1px solid var(--line); background:#fff; font-size:12px; }
.window { margin-bottom:18px; }
.window h3 { font-size:12px; color:var(--mut); font-weight:500; margin:0 0 2px; }
.scroll { overflow-x:auto; padding-top:14px; }
.seq { font:14px/2 ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap:anywhere; }
.tok { padding:1px 0; border-radius:2px; cursor:pointer; position:relative; white-space:pre; }
.music .tok { font-size:11px; padding:1px 3px; margin:0 1px; }
.cells { white-space:nowrap; line-height:1.5; }
.cells .tok { display:inline-block; width:26px; text-align:center; font-size:9px; margin:0; }
.tok.ctx { color:var(--mut); background:#e8e8e8; }
.tok.sel { outline:2px solid var(--hi); outline-offset:1px; z-index:2; }
.tok.hit { box-shadow:inset 0 -3px 0 var(--hi); }
.tok.noisy { text-decoration:line-through 2px #e0115f; }
.tok.hit::after { content:attr(data-badge); position:absolute; left:0; top:-1.3em; font:9px/1.1 system-ui, sans-serif; color:#fff; background:var(--hi); padding:0 2px; border-radius:2px; white-space:nowrap; pointer-events:none; z-index:3; }
.legend { font-size:11px; color:var(--mut); }
.ramp { width:160px; height:10px; border:1px solid var(--line); margin:2px 0; }
svg text { font:10px system-ui, "DejaVu Sans", sans-serif; fill:var(--mut); }
svg .note { stroke:#0004; cursor:pointer; }
svg .on { stroke:var(--hi); stroke-width:2; }
.unsafe { color:#c00; font-weight:600; }
.note { color:var(--mut); font-size:11px; margin:2px 0; }
#errors { white-space:pre-wrap; color:#b00; background:#fee; padding:6px 18px; font:12px monospace; }
#errors:empty { display:none; }
footer { padding:6px 18px 16px; color:var(--mut); font-size:11px; }
</style></head>
<body>
<div id="errors"></div>
<header id="head"></header>
<div class="wrap"><main id="windows"></main><aside id="panel"></aside></div>
<footer id="foot"></footer>
<script type="application/json" id="report-data">__DATA__</script>
<script>
"use strict";
window.onerror = function (msg, src, line) {
  document.getElementById("errors").textContent += "script error: " + msg + " (line " + line + ")\n";
  document.body.dataset.rendered = "error";
};
(function () {
const D = JSON.parse(document.getElementById("report-data").textContent);
const NS = "http://www.w3.org/2000/svg";
const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[110,206,88],[181,222,43],[253,231,37]];
const HEAT = [[255,247,236],[253,212,158],[252,141,89],[215,48,31],[127,0,0]];
const MAGMA = [[0,0,4],[59,15,112],[140,41,129],[222,73,104],[254,159,109],[252,253,191]];
const CELL = 26;
let C = 0, pinned = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v, d) { return v === null || v === undefined || !isFinite(v) ? "n/a" : Number(v).toFixed(d === undefined ? 3 : d); }
function pct(v) { return v === null || v === undefined ? "n/a" : (100 * v).toFixed(1) + "%"; }
function signed(v, d) { return v === null || v === undefined ? "n/a" : (v >= 0 ? "+" : "") + fmt(v, d); }
function ramp(stops, t) {
  t = Math.min(1, Math.max(0, isFinite(t) ? t : 0));
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  return "rgb(" + stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v))).join(",") + ")";
}
function ink(rgb) {
  const c = rgb.match(/\d+/g).map(Number);
  return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 ? "#111" : "#fff";
}
function src(l) { return "h" + l; }
function shown(sym) {
  if (D.domain !== "text") return sym;
  return sym === "\u2423" ? "\u00a0" : sym === "\\n" ? "\u23ce" : sym === "\\t" ? "\u21e5" : sym;
}
function cond() { return D.conditions[C]; }
function inDomain() { return D.conditions.find(c => c.kind === "in-domain") || null; }

// one colour scale for every condition, so that switching compares like with like
const SCALE = (function () {
  const c0 = D.conditions[0];
  if (c0.mean_profile) {  // taps span the bars; the tokens' colours span the depths they drew on (chosen: the
    // observed range, since mean depths crowd the middle of the taps and would all look alike)
    const lo = Math.min(...c0.sources), hi = Math.max(...c0.sources), seen = [];
    D.conditions.forEach(c => c.sequences.forEach(q => (q.depth || []).forEach(v => seen.push(v))));
    const a = Math.min(...seen), b = Math.max(...seen), wide = seen.length && b - a > 0.05;
    return {kind: "depth", lo: lo, hi: hi > lo ? hi : lo + 1, tlo: wide ? a : lo, thi: wide ? b : (hi > lo ? hi : lo + 1),
            seen: wide};
  }
  let mx = 0;
  D.conditions.forEach(c => c.sequences.forEach(q => q.nll.forEach(v => { if (v > mx) mx = v; })));
  return {kind: "nll", lo: 0, hi: mx || 1};
})();
function colour(q, k) {
  if (k < 1) return "#e8e8e8";
  if (SCALE.kind === "depth") return ramp(VIRIDIS, (q.depth[k - 1] - SCALE.tlo) / (SCALE.thi - SCALE.tlo));
  return q.nll[k - 1] === null ? "#e8e8e8" : ramp(HEAT, q.nll[k - 1] / SCALE.hi);
}

function bars(values, sources, ghost, width, height) {
  const K = values.length, pad = 18, bw = Math.max(6, (width - pad) / K);
  const g = sv("svg", {width: pad + bw * K, height: height + 26, role: "img"});
  const top = Math.max(...values, ...(ghost || [0]), 1e-9);
  values.forEach((v, j) => {
    const h = height * v / top, x = pad + j * bw;
    g.append(sv("rect", {x: x + 1, y: 12 + height - h, width: bw - 2, height: Math.max(h, 0.5),
                         fill: ramp(VIRIDIS, (sources[j] - SCALE.lo) / (SCALE.hi - SCALE.lo))}));
    if (ghost) {
      const gh = height * ghost[j] / top;
      g.append(sv("rect", {x: x + 1, y: 12 + height - gh, width: bw - 2, height: gh, fill: "none", stroke: "#000", "stroke-dasharray": "3 2"}));
    }
    g.append(sv("text", {x: x + bw / 2, y: 10 + height - h, "text-anchor": "middle"}, bw > 22 ? (100 * v).toFixed(0) + "%" : ""));
    g.append(sv("text", {x: x + bw / 2, y: height + 24, "text-anchor": "middle"}, src(sources[j])));
  });
  g.append(sv("line", {x1: pad, x2: pad + bw * K, y1: 12 + height, y2: 12 + height, stroke: "#999"}));
  return g;
}

function row(table, key, value, cls) {
  const tr = el("tr");
  tr.append(el("th", null, key));
  const td = el("td", cls || null, value);
  tr.append(td);
  table.append(tr);
  return td;
}

function headline() {
  const c = cond(), I = D.identity, base = inDomain(), t = el("table");
  if (I.eval && c.kind === "in-domain") {
    const units = Object.entries(I.eval.units || {}).map(([u, v]) => fmt(v.bits, 4) + " bits/" + u).join(", ");
    row(t, I.eval.split + " NLL (eval)", fmt(I.eval.nll, 4) + " nats/token, " + fmt(I.eval.bits_per_token, 4) +
        " bits/token" + (units ? ", " + units : "") + " over " + I.eval.n_tokens.toLocaleString("en") + " tokens");
  }
  const delta = base && base !== c ? " (" + signed(c.nll - base.nll, 4) + " vs in-domain)" : "";
  row(t, "NLL, audited windows", fmt(c.nll, 4) + " nats/token over " + c.n_tokens.toLocaleString("en") + " tokens" + delta);
  if (c.mean_depth !== undefined) {
    const dd = base && base !== c && base.mean_depth !== undefined ? " (" + signed(c.mean_depth - base.mean_depth, 3) + ")" : "";
    row(t, "mean depth", fmt(c.mean_depth, 3) + " (expected layer)" + dd);
  }
  if (c.share_shallow !== undefined) row(t, "shallow tokens", pct(c.share_shallow) + " put > half their mass below L/2");
  const sp = c.spearman_depth_vs_loss;
  if (sp) row(t, "Spearman(depth, loss)", fmt(sp.rho) + " [" + fmt(sp.ci_low) + ", " + fmt(sp.ci_high) + "], within position " +
              fmt(sp.within_position_rho));
  Object.entries(c.headline || {}).forEach(([k, v]) => row(t, k, typeof v === "number" ? fmt(v, 4) : String(v)));
  if (!c.mean_profile) row(t, "depth", "no depth attention in this model: tokens are coloured by their NLL");
  return t;
}

function profileBox() {
  const c = cond(), box = el("div"), base = inDomain();
  if (!c.mean_profile) return box;
  box.append(el("div", "legend", "depth profile: mean mass per tap" + (base && base !== c ? " (dashed: in-domain)" : "")));
  box.append(bars(c.mean_profile, c.sources, base && base !== c ? base.mean_profile : null, 260, 60));
  return box;
}

function legend() {
  const box = el("div", "legend"), r = el("div", "ramp");
  const stops = SCALE.kind === "depth" ? VIRIDIS : HEAT;
  r.style.background = "linear-gradient(to right," + stops.map((_, i) => ramp(stops, i / (stops.length - 1))).join(",") + ")";
  box.append(el("div", null, SCALE.kind === "depth" ? "colour: mean depth a token drew on" : "colour: the token's NLL"));
  box.append(r);
  box.append(el("div", null, SCALE.kind === "depth" ? fmt(SCALE.tlo, 2) + (SCALE.seen ? " (shallowest shown) \u2026 " : " \u2026 ") +
                                                      fmt(SCALE.thi, 2) + (SCALE.seen ? " (deepest shown)" : "") + "; taps " + src(SCALE.lo) + " (embeddings) \u2026 " + src(SCALE.hi)
                                                    : "0 \u2026 " + fmt(SCALE.hi, 2) + " nats"));
  box.append(el("div", null, "grey: context (first token of a window)"));
  return box;
}

function exitTable() {
  const c = cond(), box = el("div");
  if (!c.exit_summary) return box;
  const shown = c.sequences.reduce((a, q) => a + q.nll.filter(v => v !== null).length, 0);
  box.append(el("div", "legend", "confidence exits over the " + shown + " shown scored tokens"));
  const t = el("table"), h = el("tr");
  ["threshold", "exit early", "unsafe of those", "\u0394NLL of those"].forEach(s => h.append(el("th", null, s)));
  t.append(h);
  c.exit_summary.forEach(e => {
    const tr = el("tr");
    [fmt(e.threshold, 2), pct(e.early_share), pct(e.unsafe_share), signed(e.nll_increase, 3)].forEach(v => tr.append(el("td", "n", v)));
    t.append(tr);
  });
  box.append(t);
  return box;
}

function header() {
  const h = document.getElementById("head"), I = D.identity;
  h.textContent = "";
  h.append(el("h1", null, "Depth audit \u00b7 " + I.run));
  const id = el("div", "ident");
  const item = (k, v) => { const s = el("span", null, k + " "); s.append(el("b", null, v)); id.append(s); };
  item("model", I.arch);
  item("checkpoint", "step " + (I.checkpoint_step === null || I.checkpoint_step === undefined ? "?" : I.checkpoint_step) +
       " \u00b7 " + (I.checkpoint_hash || "?") + (I.finished === false ? " (unfinished run)" : ""));
  item("corpus", I.corpus.domain + " \u00b7 " + I.corpus.source + " \u00b7 " + I.corpus.tokenizer + " (vocab " +
       I.corpus.vocab_size + ") \u00b7 " + I.corpus.data_hash);
  item("audit", I.audit.sequences + " " + I.audit.split + " windows of " + I.audit.seq_len + " tokens" +
       (I.audit.exit !== "none" ? " \u00b7 exits: " + I.audit.exit : ""));
  h.append(id, el("div", "settings", I.settings.join("  ")));
  const sw = el("div", "conds");
  if (D.conditions.length > 1) {
    sw.append(el("span", "note", "condition: "));
    D.conditions.forEach((c, i) => {
      const b = el("button", i === C ? "on" : null, c.name);
      b.title = c.note || c.kind;
      b.addEventListener("click", () => { C = i; pinned = null; draw(); });
      sw.append(b);
    });
  } else {
    sw.append(el("span", "note", "condition: " + D.conditions[0].name + " only (no shifted or noisy evaluation in this report)"));
  }
  if (cond().note) sw.append(el("span", "note", " \u2014 " + cond().note));
  const top = el("div", "top");
  top.append(headline(), profileBox(), exitTable(), legend());
  h.append(sw, top);
}

function roll(q, s) {
  const box = el("div"), notes = q.roll;
  if (!notes.length) { box.append(el("div", "note", "no note starts in these tokens")); return box; }
  const t0 = Math.min(...notes.map(n => n[0])), t1 = Math.max(...notes.map(n => n[0] + n[1]));
  const p0 = Math.min(...notes.map(n => n[2])) - 1, p1 = Math.max(...notes.map(n => n[2])) + 1;
  const pxb = Math.max(10, Math.min(90, 760 / Math.max(t1 - t0, 1))), ph = Math.max(3, Math.min(7, 120 / (p1 - p0)));
  const W = 34 + (t1 - t0) * pxb, H = (p1 - p0) * ph + 4;
  const g = sv("svg", {width: W, height: H, role: "img"});
  for (let b = Math.ceil(t0); b <= t1; b++) g.append(sv("line", {x1: 34 + (b - t0) * pxb, x2: 34 + (b - t0) * pxb, y1: 0, y2: H, stroke: "#eee"}));
  g.append(sv("text", {x: 0, y: 9}, "P" + (p1 - 1)), sv("text", {x: 0, y: H - 2}, "P" + (p0 + 1)));
  notes.forEach(n => {
    const r = sv("rect", {class: "note", x: 34 + (n[0] - t0) * pxb, y: (p1 - n[2] - 0.5) * ph, width: Math.max(2, n[1] * pxb - 1),
                          height: Math.max(2, ph - 0.5), rx: 1, fill: colour(q, n[3]), "data-s": s, "data-e": n[3]});
    r.append(sv("title", {}, "pitch " + n[2] + ", " + fmt(n[1], 2) + " beats (token " + n[3] + ")"));
    hook(r, s, n[3]);
    g.append(r);
  });
  box.append(g, el("div", "note", "piano roll of these tokens (x: beats, y: pitch); a note is coloured like the Pitch token that sounds it"));
  return box;
}

function strip(q, s) {
  const st = q.strip, n = st.values.length, rows = st.rows, rh = rows > 1 ? 2 : 18, H = rows * rh;
  const g = sv("svg", {width: n * CELL, height: H, role: "img", style: "display:block"});
  st.values.forEach((col, e) => {
    if (rows > 1) {
      col.forEach((v, r) => g.append(sv("rect", {x: e * CELL, y: (rows - 1 - r) * rh, width: CELL, height: rh, fill: ramp(MAGMA, v / 255)})));
    } else if (st.kind.startsWith("amplitude")) {
      const a = col[0] * H / 2;
      g.append(sv("rect", {x: e * CELL + CELL / 2 - 2, y: H / 2 - Math.max(a, 0), width: 4, height: Math.max(Math.abs(a), 1), fill: "#555"}));
    } else {
      g.append(sv("rect", {x: e * CELL, y: 0, width: CELL, height: H, fill: "hsl(" + (col[0] * 47) % 360 + ",55%,62%)"}));
    }
    const hit = sv("rect", {x: e * CELL, y: 0, width: CELL, height: H, fill: "transparent", "data-s": s, "data-e": e});
    hook(hit, s, e);
    g.append(hit);
  });
  return g;
}

function hook(node, s, k) {
  node.addEventListener("mouseenter", () => { if (!pinned) show(s, k); });
  node.addEventListener("click", () => {
    pinned = pinned && pinned.s === s && pinned.k === k ? null : {s: s, k: k};
    show(s, k);
    try { history.replaceState(null, "", "#c=" + C + "&s=" + s + "&k=" + k); } catch (err) { /* file:// may refuse */ }
  });
}

function windows() {
  const main = document.getElementById("windows"), c = cond();
  main.textContent = "";
  c.sequences.forEach((q, s) => {
    const box = el("div", "window"), scroll = el("div", "scroll");
    box.append(el("h3", null, "window " + s + " \u00b7 starts at token " + q.start + " \u00b7 " + q.nll.length + " predictions" +
                              (q.strip ? " \u00b7 strip: " + q.strip.kind : "")));
    if (q.strip) scroll.append(strip(q, s));
    const line = el("div", "seq" + (q.strip ? " cells" : "") + (D.domain === "music" ? " music" : ""));
    line.dataset.s = s;
    const read = new Map(q.read || []);
    q.sym.forEach((sym, k) => {
      const t = el("span", "tok" + (k === 0 ? " ctx" : ""), shown(sym));
      t.dataset.k = k;
      if (q.name) t.title = q.name[k];
      if (k > 0) { const bg = colour(q, k); t.style.background = bg; t.style.color = ink(bg); }
      if (read.has(k)) { t.classList.add("noisy"); t.title = "read as \u201c" + shown(read.get(k)) + "\u201d"; }
      hook(t, s, k);
      line.append(t);
      if (D.domain === "text" && sym === "\\n") line.append(el("br"));
    });
    scroll.append(line);
    box.append(scroll);
    if (q.roll) box.append(roll(q, s));
    main.append(box);
  });
}

function clear() {
  document.querySelectorAll(".tok.sel, .tok.hit").forEach(e => { e.classList.remove("sel", "hit"); e.removeAttribute("data-badge"); });
  document.querySelectorAll("svg .on").forEach(e => e.classList.remove("on"));
}

function exitRows(P, q, i) {
  if (q.exit) {
    P.append(el("h2", null, "confidence exits (full depth " + q.exit.full_depth + ")"));
    const t = el("table"), h = el("tr");
    ["threshold", "exits at", "confidence", "NLL", "top-1 vs full"].forEach(s => h.append(el("th", null, s)));
    t.append(h);
    q.exit.thresholds.forEach((th, j) => {
      const tr = el("tr"), early = q.exit.depth[i][j] < q.exit.full_depth, differs = q.exit.differs[i][j] === 1;
      [fmt(th, 2), (early ? "depth " : "full ") + q.exit.depth[i][j], fmt(q.exit.confidence[i][j], 3), fmt(q.exit.nll[i][j], 3)]
        .forEach(v => tr.append(el("td", "n", v)));
      tr.append(el("td", differs && early ? "unsafe" : null,
                   !differs ? "same" : early ? "differs: unsafe exit" : "differs (reads earlier exits' copied states)"));
      t.append(tr);
    });
    P.append(t);
  }
  if (q.fixed) {
    P.append(el("h2", null, "fixed exits: this token at every depth"));
    const t = el("table"), h = el("tr");
    ["depth", "NLL", "top probability"].forEach(s => h.append(el("th", null, s)));
    t.append(h);
    q.fixed.depths.forEach((d, j) => {
      const tr = el("tr");
      [String(d), fmt(q.fixed.nll[i][j], 3), fmt(q.fixed.confidence[i][j], 3)].forEach(v => tr.append(el("td", "n", v)));
      t.append(tr);
    });
    P.append(t);
  }
}

function show(s, k) {
  const c = cond(), q = c.sequences[s], P = document.getElementById("panel");
  const spans = document.querySelector('.seq[data-s="' + s + '"]').querySelectorAll(".tok");
  clear();
  spans[k].classList.add("sel");
  document.querySelectorAll('svg [data-s="' + s + '"][data-e="' + k + '"]').forEach(e => e.classList.add("on"));
  P.textContent = "";
  P.append(el("h2", null, "\u201c" + shown(q.sym[k]) + "\u201d" + (q.name ? "  " + q.name[k] : "") + (pinned ? "  (pinned)" : "")));
  const as = (q.read || []).find(p => p[0] === k), t = el("table");
  if (as) row(t, "read as", "\u201c" + shown(as[1]) + "\u201d: the model read this here, not the symbol shown");
  if (k === 0) {
    P.append(el("p", "note", "The window's first token: context only, nothing predicts it here."), t);
    return;
  }
  const i = k - 1;
  P.append(el("p", "note", "window " + s + ", token " + k + ": predicted from the " + k + " token(s) before it"));
  if (q.nll[i] === null) row(t, "NLL", "not scored: the run's vocabulary lacks this symbol (the shift's policy)");
  else row(t, "NLL", fmt(q.nll[i]) + " nats (p = " + fmt(Math.exp(-q.nll[i])) + ")");
  if (q.depth) row(t, "mean depth", fmt(q.depth[i], 2) + " (expected layer)");
  P.append(t);
  if (q.profile) {
    P.append(el("h2", null, "its attention over taps"));
    P.append(bars(q.profile[i], c.sources, null, 290, 70));
  } else {
    P.append(el("p", "note", "This model has no depth attention: nothing to show per tap."));
  }
  if (q.top && q.top[i].length) {
    P.append(el("h2", null, "most attended (tap, position) pairs, marked in the window"));
    const t2 = el("table");
    q.top[i].forEach((p, rank) => {
      const e = p[0], sp = spans[e], label = src(c.sources[p[1]]) + " " + (100 * p[2]).toFixed(0) + "%";
      sp.classList.add("hit");  // every pair underlined; the strongest also labelled (labels of neighbours would overlap)
      if (rank === 0) sp.dataset.badge = label;
      row(t2, label, "token " + e + " \u201c" + shown(q.sym[e]) + "\u201d" + (e === k - 1 ? " (just before)" : ""), null);
    });
    P.append(t2);
  }
  exitRows(P, q, i);
}

function footer() {
  const c = cond(), f = document.getElementById("foot");
  f.textContent = "This page: " + (D.size_bytes ? Math.round(D.size_bytes / 1024) + " kB" : "?") +
    ", self-contained (no network, no server). It shows " + c.sequences.length + " of the " + c.n_sequences +
    " audited windows, " + D.caps.tokens + " tokens each (eval.audit_plots, eval.audit_plot_tokens); the audited windows' numbers cover all " +
    c.n_tokens.toLocaleString("en") + " scored tokens of the " + c.n_sequences + " windows" +
    (c.kind === "in-domain" ? "" : "; the " + (D.identity.eval ? D.identity.eval.split : "eval") + " split's numbers cover that split") + ". Each token after a window's first is the target of the prediction made " +
    "from the tokens before it; its colour, bars and NLL are that prediction's. " + (c.profile_kind ? "Depth: " + c.profile_kind + "." : "");
}

function draw() {
  header();
  windows();
  footer();
  const P = document.getElementById("panel");
  P.textContent = "";
  P.append(el("p", "note", "Hover a token to see which depth it drew on; click to pin it."));
}

draw();
const want = {};
location.hash.replace(/^#/, "").split("&").forEach(kv => { const [a, b] = kv.split("="); if (a) want[a] = parseInt(b, 10); });
if (want.c >= 0 && want.c < D.conditions.length && want.c !== C) { C = want.c; draw(); }
const q = cond().sequences[want.s];
if (q && want.k >= 0 && want.k < q.sym.length) { pinned = {s: want.s, k: want.k}; show(want.s, want.k); }
document.body.dataset.tokens = document.querySelectorAll(".tok").length;
if (document.body.dataset.rendered !== "error") document.body.dataset.rendered = "ok";
})();
</script>
</body></html>
"""
