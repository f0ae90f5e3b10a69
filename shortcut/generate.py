"""Decoding: the KV cache's window, early-exit decoding that skips, self-speculative decoding, and the loop that
picks each next token (temperature, top-k, top-p), for `shortcut sample` and the evaluation's decoding speeds.

Each new token costs one pass through the blocks at its own position: GPT.forward with a Cache, in which every block
keeps the keys and values it made (shortcut.blocks: a self-attention's (B, nh, T, hs), a shortcut block's (tap,
position) ones (B, nh, K_i, T, hs)). This module holds policies only (what to cache, when to rebuild it, at which
depth a token stops, what to draft and accept); the blocks' arithmetic is the blocks'. Most variants in
shortcut/variants/ decode with a full forward per token instead; those that compose with the cache (hyper, mhc,
moda, laurel: GPT.caches) use it too, without exits.

The window: a model sees at most block_size tokens (learned positions end there). When the window is full, the cache
is rebuilt from the last block_size // 2 tokens (positions start again at 0), so every token is predicted from at
least block_size // 2 tokens of context, and the cached logits always equal a full forward pass over the tokens
since the last rebuild (tested at every step). Every decoder here slides the same way, so their greedy outputs
agree token for token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from shortcut.config import Arch, DecodeExit, SampleConfig, UserError
from shortcut.costs import costs, flops_per_token
from shortcut.model import GPT, Trace

log = logging.getLogger(__name__)


def supports_cache(model: GPT) -> bool:
    """The baseline, the shortcut and the variants that compose with the cache (the others decode with a full
    forward instead)."""
    return model.caches


def has_exits(model: GPT) -> bool:
    """Early exits and drafts at a shallower depth: the baseline and the shortcut (a variant runs its blocks its
    own way), dense ones only."""
    return model.cfg.arch in (Arch.baseline, Arch.shortcut) and model.cfg.mod_capacity is None


def slide(seq: torch.Tensor, ids: torch.Tensor, T: int) -> tuple[torch.Tensor, bool]:
    """The window rule of every decoder: append ids (B,) to seq (B, t); a full window (t = T) keeps the last T // 2
    tokens instead, and says so (a cache must then be rebuilt)."""
    longer = torch.cat([seq, ids[:, None]], dim=1)
    return (longer[:, -(T // 2):], True) if seq.size(1) == T else (longer, False)


class KVCacheDecoder:
    """start(prompt) -> logits of the next token; push(ids) -> the next logits, one token per row at a time."""

    def __init__(self, model: GPT):
        if not supports_cache(model):
            raise ValueError(f"no KV cache for {model.cfg.arch}")
        self.model, self.T = model, model.cfg.block_size
        self.seq = self.cache = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seq = prompt[:, -self.T:]
        return self._prefill()

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> torch.Tensor:
        self.seq, rebuilt = slide(self.seq, ids, self.T)
        if rebuilt:
            return self._prefill()
        return self.model(ids[:, None], cache=self.cache)[0][:, -1]  # (B, V)

    def _prefill(self) -> torch.Tensor:
        self.cache = self.model.new_cache(self.seq.size(0))
        return self.model(self.seq, cache=self.cache)[0][:, -1]  # (B, V)


class ExitDecoder:
    """Early-exit decoding that really skips (issue 21; CALM, Schuster et al. 2022, arXiv 2207.07061): each new token
    runs the blocks only up to the first exit depth whose prediction's top probability reaches the threshold; the
    blocks above it receive only its state's keys and values (its state copied upward, as shortcut.early_exit's
    confidence policy models it), so later tokens attend to it as the evaluation does. A batch's rows exit on their
    own: a block runs on the rows still going (the others only pay its keys and values).

    The same decisions, states and logits as early_exit.confidence_pass over the window (tested): the prefill runs
    that layer-synchronous pass over the window, and each new token the same rule at its own position."""

    def __init__(self, model: GPT, threshold: float):
        if not has_exits(model) or len(model.cfg.exit_depths()) < 2:
            raise ValueError(f"no early exits for this {model.cfg.arch} model")
        self.model, self.T, self.threshold = model, model.cfg.block_size, threshold
        self.depths = model.cfg.exit_depths()
        self.seq = self.cache = None
        self.exit_depth: list[torch.Tensor] = []  # per new token (B,): the depth it exited at

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seq = prompt[:, -self.T:]
        return self._prefill()

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> torch.Tensor:
        self.seq, rebuilt = slide(self.seq, ids, self.T)
        if rebuilt:
            return self._prefill()
        logits, depth = self._pass(ids[:, None])
        self.exit_depth.append(depth[:, 0])
        return logits[:, -1]

    def _prefill(self) -> torch.Tensor:
        self.cache = self.model.new_cache(self.seq.size(0), exits=self.depths[:-1])
        return self._pass(self.seq)[0][:, -1]

    def _pass(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ids (B, n) after those cached: per token its exit logits (B, n, V) and depth (B, n)."""
        m = self.model
        trace = m.start(ids, self.cache)
        B, n = ids.shape
        exited = torch.zeros(B, n, dtype=torch.bool, device=ids.device)
        logits = depth = None
        for d in range(1, self.depths[-1] + 1):
            rows = self._rows(exited)
            h = trace.states[-1]
            trace.states.append(torch.where(exited[..., None], h, self._block(d - 1, trace, rows)))
            if d not in self.depths:
                continue
            out = self._exit(trace, d, rows, exited.shape)  # (B, n, V); the rows that have all exited: zeros
            take = ~exited & ((out.softmax(-1).max(-1).values >= self.threshold) | (d == self.depths[-1]))
            logits = out if logits is None else torch.where(take[..., None], out, logits)
            depth = torch.where(take, d, 0) if depth is None else torch.where(take, d, depth)
            exited |= take
        self.cache.length += n
        return logits, depth

    @staticmethod
    def _rows(exited: torch.Tensor):
        """(rows with a token still going, rows that have all exited), or None for "all of them"."""
        done = exited.all(dim=1)
        if not done.any():
            return None, torch.zeros(0, dtype=torch.long)
        if done.all():
            return torch.zeros(0, dtype=torch.long), None
        return (~done).nonzero().squeeze(1), done.nonzero().squeeze(1)

    @staticmethod
    def _part(trace, rows):
        return trace if rows is None else trace.select(rows)

    def _block(self, i: int, trace, rows) -> torch.Tensor:
        """Block i for the rows with a token still going; the others only leave its keys and values."""
        run, done = rows
        if done is not None and done.numel() == 0:  # every row runs
            return self.model.run_block(i, trace)
        new = trace.states[i].clone()
        if run is not None and run.numel():
            new[run] = self.model.run_block(i, self._part(trace, run))
        self.model.remember(i, self._part(trace, done))
        return new

    def _exit(self, trace, d: int, rows, shape) -> torch.Tensor:
        """The exit at depth d for the rows still going (their logits); the others leave its keys and values."""
        run, done = rows
        if done is not None and done.numel() == 0:
            return self.model.exit_logits(trace, d).float()
        out = torch.zeros(*shape, self.model.cfg.vocab_size, device=trace.states[0].device)
        if run is not None and run.numel():
            out[run] = self.model.exit_logits(self._part(trace, run), d).float()
        self.model.remember_exit(self._part(trace, done), d)
        return out


# --- self-speculative decoding ----------------------------------------------------------------------------------

def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> the sampling distribution (B, V) float32 after temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is full (the first stays)
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return logits.softmax(dim=-1)


class SpeculativeDecoder:
    """Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710, section 4), one sequence at a time.

    A round drafts k tokens with the model's own early exit at depth d (the shortcut's: the final block over the taps
    <= d), feeding each through blocks 0..d-1 only, then verifies them with one pass of blocks d..L-1 over the k + 1
    fed positions at once, which reuses the draft's keys and values of blocks 0..d-1 and its states h_0..h_d. It keeps
    the accepted prefix plus one token of the full model's, so each round emits 1..k+1 tokens. Greedy (temperature 0):
    a draft is accepted when it is the full model's argmax, so the output is full-depth greedy decoding, token for
    token. Sampling: the speculative sampling rule (Leviathan et al. 2023, arXiv 2211.17192): accept a draft x with
    probability min(1, q(x)/p(x)), else sample from norm(max(0, q - p)); after k acceptances a bonus token from q: the
    output is distributed as the full model's (q, p: the full and draft distributions after temperature/top-k/top-p).
    The window slides exactly as the other decoders' (slide), so greedy outputs match theirs."""

    def __init__(self, model: GPT, depth: int, draft_tokens: int):
        depths = model.cfg.exit_depths()
        if not has_exits(model) or depth not in depths[:-1]:
            raise ValueError(f"speculative decoding drafts with an exit at depth {depth}: this model's are "
                             f"{depths[:-1]}")
        self.model, self.d, self.k, self.T = model, depth, draft_tokens, model.cfg.block_size
        self.drafted = self.accepted = self.rounds = self.fed = self.steps = 0  # counts, for the figures

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, temperature: float = 0.0, top_k=None, top_p=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt (1, t) -> the n_new tokens after it (1, n_new)."""
        self.rule = (temperature, top_k, top_p)
        self.generator = generator
        seq = prompt[:, -self.T:]
        self._rebuild(seq)
        out: list[torch.Tensor] = []
        while len(out) < n_new:
            P = self.cache.length  # the position of seq's last token, not yet fed
            k = min(self.k, self.T - 1 - P, n_new - len(out) - 1)
            if k > 0:
                emitted = self._round(seq[:, -1], k)
            else:  # the window's last position (or the last token): one full-depth step
                emitted, self.steps = [self._pick(self._full(seq[:, -1:]))], self.steps + 1
            out += emitted
            seq = torch.cat([seq, torch.stack(emitted, dim=1)], dim=1)
            if seq.size(1) > self.T:  # the last token was pushed onto a full window: slide, as slide() does
                seq = seq[:, -(self.T // 2):]
                self._rebuild(seq)
        return torch.stack(out[:n_new], dim=1)

    def _rebuild(self, seq: torch.Tensor) -> None:
        """The cache of seq but its last token (positions 0..t-2, full depth, and the draft exit's own keys)."""
        m = self.model
        self.cache = m.new_cache(seq.size(0), exits=[self.d])
        if seq.size(1) > 1:
            trace = m.run(m.start(seq[:, :-1], self.cache))
            m.remember_exit(trace, self.d)
            self.cache.length = seq.size(1) - 1

    def _full(self, ids: torch.Tensor) -> torch.Tensor:
        """A plain full-depth step: ids (1, 1) -> the next token's logits (1, V)."""
        logits = self.model(ids, cache=self.cache)[0][:, -1]
        return logits

    def _round(self, pending: torch.Tensor, k: int) -> list[torch.Tensor]:
        m, d, P = self.model, self.d, self.cache.length
        traces, drafts, tok = [], [], pending
        for j in range(k + 1):  # draft k tokens; the last fed one (the k-th draft) only for its states and keys
            self.cache.length = P + j
            trace = m.run(m.start(tok[:, None], self.cache), d)
            logits = m.exit_logits(trace, d)[:, -1]  # (1, V)
            traces.append(trace)
            if j < k:
                tok = self._pick(logits)
                drafts.append((tok, logits))
        self.cache.length = P
        fed = torch.cat([pending[:, None]] + [t[:, None] for t, _ in drafts], dim=1)  # (1, k+1)
        trace = Trace([torch.cat([t.states[l] for t in traces], dim=1) for l in range(d + 1)], m.embed(fed, P)[1],
                      {l: torch.cat([t.feats[l] for t in traces], dim=1) for l in traces[0].feats}, cache=self.cache)
        full = m.head(m.run(trace).states[-1])[0]  # (k+1, V): the full model at positions P..P+k
        emitted = self._accept(drafts, full)
        self.cache.length = P + len(emitted)  # pending and the accepted drafts are now cached
        self.rounds, self.drafted, self.fed = self.rounds + 1, self.drafted + k, self.fed + k + 1
        self.accepted += len(emitted) - 1
        return emitted

    def _accept(self, drafts, full: torch.Tensor) -> list[torch.Tensor]:
        """The accepted drafts and one token of the full model's (a correction, or the bonus after all k)."""
        emitted = []
        for i, (tok, draft_logits) in enumerate(drafts):
            if self.rule[0] == 0:
                if int(tok) != int(full[i].argmax()):
                    return emitted + [full[i].argmax()[None]]
            else:
                p, q = (next_token_probs(x[None], *self.rule)[0] for x in (draft_logits[0], full[i]))
                x = int(tok)
                u = torch.rand((), generator=self.generator)
                if u * p[x] > q[x]:  # rejected (accepted with probability min(1, q(x)/p(x)))
                    residual = (q - p).clamp_min(0)
                    residual = residual / residual.sum() if residual.sum() > 0 else q
                    return emitted + [torch.multinomial(residual.cpu(), 1, generator=self.generator).to(q.device)]
            emitted.append(tok)
        return emitted + [self._pick(full[-1][None])]

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) -> (1,): greedy, or a sample from the filtered distribution."""
        if self.rule[0] == 0:
            return logits.argmax(dim=-1)
        probs = next_token_probs(logits, *self.rule)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1).to(logits.device)


# --- the decoding loop ---

def pick_next(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else sampled after top-k and top-p filtering."""
    if cfg.temperature == 0:
        return logits.float().argmax(dim=-1)
    probs = next_token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


class FullForward:
    """Decoding without a cache: each new token runs the model over its window, which slides as the cache's does
    (shortcut.generate.slide), so both decoders compute the same logits. Works for every architecture; the speed
    reference for the KV cache."""

    def __init__(self, model):
        self.model, self.seq = model, None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seq = prompt[:, -self.model.cfg.block_size:]
        return self._last()

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> torch.Tensor:
        self.seq, _ = slide(self.seq, ids, self.model.cfg.block_size)
        return self._last()

    def _last(self) -> torch.Tensor:
        return self.model(self.seq)[0][:, -1]  # (B, V)


@dataclass
class Generation:
    """What generate made and what it cost: tokens (B, T0 + new), new tokens per second (all rows together), the
    decoder, and its adaptive-compute figures (analytic forward FLOPs per new token, shortcut.costs)."""
    tokens: torch.Tensor
    tokens_per_s: float
    decoder: str  # "cache", "full forward", "exit", "speculative"
    flops_per_token: float
    mean_exit_depth: float | None = None  # exit decoding
    acceptance: float | None = None  # speculative: accepted drafts / drafts
    draft_depth: int | None = None

    @property
    def cached(self) -> bool:
        return self.decoder != "full forward"


def stepper_for(model, cfg: SampleConfig):
    if cfg.exit == DecodeExit.confidence:
        try:
            return ExitDecoder(model, cfg.exit_threshold)
        except ValueError as exc:
            raise UserError(f"sample.exit=confidence: {exc} (baseline and shortcut runs, not routed ones)") from None
    if cfg.cache:
        if supports_cache(model):
            return KVCacheDecoder(model)
        log.info("%s has no KV cache here: decoding with a full forward per token", model.cfg.arch)
    return FullForward(model)


def generate(model, prompt: torch.Tensor, cfg: SampleConfig, progress: bool = False) -> Generation:
    """prompt (B, T0) -> a Generation of max_new_tokens new tokens per row. progress: a bar over the generated
    tokens (all rows)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.speculative is not None:
        return _speculative(model, prompt, cfg, generator)
    stepper = stepper_for(model, cfg)
    B, T0 = prompt.shape
    out = torch.empty(B, T0 + cfg.max_new_tokens, dtype=prompt.dtype, device=prompt.device)  # one buffer, no list
    out[:, :T0] = prompt
    bar = _bar(B * cfg.max_new_tokens, progress)
    t0 = time.perf_counter()
    logits = stepper.start(prompt)
    for i in range(cfg.max_new_tokens):
        nxt = pick_next(logits, cfg, generator)
        out[:, T0 + i] = nxt
        if i + 1 < cfg.max_new_tokens:
            logits = stepper.push(nxt)
        bar.update(B)
    tok_s = B * cfg.max_new_tokens / (time.perf_counter() - t0)
    bar.close()
    full = flops_per_token(model.cfg).forward
    if isinstance(stepper, ExitDecoder):
        # the first new token came from the prefill (the eval's pass over the prompt), the others from push
        depths = torch.stack(stepper.exit_depth, dim=1).float() if stepper.exit_depth else None
        per_depth = costs(model.cfg).exits().confidence
        flops = float(np.mean([per_depth[int(d)] for d in depths.flatten()])) if depths is not None else full
        mean_depth = float(depths.mean()) if depths is not None else None
        return Generation(out, tok_s, "exit", flops, mean_exit_depth=mean_depth)
    decoder = "full forward" if isinstance(stepper, FullForward) else "cache"
    return Generation(out, tok_s, decoder, full)


def _bar(total: int, progress: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="sample", unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
                mininterval=0.2 if sys.stderr.isatty() else 15)


def _speculative(model, prompt: torch.Tensor, cfg: SampleConfig, generator) -> Generation:
    """Self-speculative decoding, one row after the other (each round's acceptances differ by row)."""
    try:
        spec = SpeculativeDecoder(model, cfg.speculative, cfg.draft_tokens)
    except ValueError as exc:
        raise UserError(f"sample.speculative={cfg.speculative}: {exc}") from None
    t0 = time.perf_counter()
    rows = [spec.generate(row[None], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator)
            for row in prompt]
    tok_s = prompt.size(0) * cfg.max_new_tokens / (time.perf_counter() - t0)
    c = costs(model.cfg)
    # every fed position costs the full forward plus the draft's exit head (its blocks and taps are reused)
    per_fed = c.forward + c.exit(cfg.speculative, fmaps=False)
    flops = (spec.fed * per_fed + spec.steps * c.forward) / (prompt.size(0) * cfg.max_new_tokens)
    return Generation(torch.cat([prompt, torch.cat(rows, dim=0)], dim=1), tok_s, "speculative", flops,
                      acceptance=spec.accepted / spec.drafted if spec.drafted else None, draft_depth=cfg.speculative)
