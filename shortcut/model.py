"""The GPT: the baseline and the layerwise-attention-shortcut model, one class, one pass through the blocks.

Baseline: GPT-2 (pre-LayerNorm, learned positions, GELU MLP, tied head); model.pos/norm/mlp make it a modern one
(RoPE, RMSNorm, SwiGLU) for every arch. Shortcut (Verma & Pilanci 2024, arXiv 2409.10870): the final block's
self-attention is replaced by attention over (layer, position) pairs, so each token chooses how deep a
representation it reads: block i (input h_i) of the last model.shortcut_layers attends to z_l = f_l(h_l) + e_l for
its taps l <= i (f_l a small feature map, e_l a learned depth embedding). The blocks, attentions and feature maps
are in shortcut/blocks.py, the attention kernels in shortcut/attention.py, the other ways of reading earlier layers
(DenseFormer, Attention Residuals, MUDD, value residual) in shortcut/variants/, their costs in shortcut/costs.py.

One pass (GPT.run) serves training, evaluation, the depth audit, early exits and cached decoding: a Trace holds the
states h_0 .. h_d it has made, the taps' features, the RoPE tables and, when decoding, the Cache the blocks fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from shortcut import routing  # noqa: F401 - registers the routed block kind
from shortcut.blocks import FEATURE_MAPS, BlockCache, Linear, Rotary, block_kind, make_norm
from shortcut.config import Arch, ModelConfig, PosEmb
from shortcut.variants import VARIANTS


@dataclass
class Cache:
    """The keys and values of every block for incremental decoding (shortcut.generate), and how many positions
    they hold: the next tokens sit at positions length, length + 1, ...

    exits: for decoding with early exits, the final block's cache when it runs as the exit at depth d < full (the
    shortcut; its tap keys are the final block's own, its self-attention's, in add mode, its own per depth: at an
    exit at d the block reads h_d of every earlier position)."""
    blocks: list[BlockCache]
    length: int = 0
    exits: dict[int, BlockCache] = field(default_factory=dict)

    def select(self, rows: torch.Tensor) -> Cache:
        """The same cache for these rows of the batch only (those still running a block)."""
        return Cache([b.select(rows) for b in self.blocks], self.length, {d: e.select(rows) for d, e in
                                                                         self.exits.items()})


@dataclass
class Trace:
    """One pass through the blocks so far: states h_0 .. h_d (B, n, C) at the pass's n positions, the RoPE tables
    (None with learned positions), f_l(h_l) of the taps read so far (tap l -> (B, n, C)), the attention
    probabilities asked for (block i -> (B, nh, n, K_i, n)), the tokens each routed block processed (block i ->
    (B, n) bool) and the routers' auxiliary losses, and the Cache when decoding."""
    states: list[torch.Tensor]
    rope: tuple | None = None
    feats: dict[int, torch.Tensor] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    processed: dict[int, torch.Tensor] = field(default_factory=dict)
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    cache: Cache | None = None

    @property
    def depth(self) -> int:
        return len(self.states) - 1  # blocks run

    def select(self, rows: torch.Tensor) -> Trace:
        """The trace of these rows of the batch only (shares nothing it could write back)."""
        return Trace([h[rows] for h in self.states], self.rope, {l: f[rows] for l, f in self.feats.items()},
                     cache=None if self.cache is None else self.cache.select(rows))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (it is read from the corpus)")
        self.cfg = cfg
        self.shortcut = cfg.arch == Arch.shortcut
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == PosEmb.learned:
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size)
        self.drop = nn.Dropout(cfg.dropout)
        # block i -> the taps it reads (the last shortcut_layers blocks), l <= i; {} for other archs
        self.block_taps = cfg.shortcut_taps() if self.shortcut else {}
        self.blocks = nn.ModuleList([block_kind(cfg, i)(cfg, i) for i in range(cfg.n_layer)])
        self._variant = None
        if self.shortcut:
            self.taps = cfg.tap_layers()  # layers l in 0..L-1
            fmap = FEATURE_MAPS[cfg.feature_map]
            self.feature_maps = nn.ModuleList([fmap(cfg) for _ in self.taps]) if fmap else None
            self.depth_emb = nn.Parameter(torch.zeros(len(self.taps), cfg.n_embd)) if cfg.depth_embedding else None
        elif cfg.arch != Arch.baseline:  # its own parameters under its own name (denseformer.alphas.0, mudd....)
            self._variant = str(cfg.arch)
            self.add_module(self._variant, VARIANTS[cfg.arch](cfg))
        self.ln_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.init_weights()

    @property
    def variant(self) -> nn.Module | None:
        """The module that runs the blocks its own way (shortcut/variants/), or None (baseline, shortcut)."""
        return None if self._variant is None else self._modules[self._variant]

    def init_weights(self) -> None:
        """GPT-2's initialisation, as each projection declared it (blocks.Linear): N(0, 0.02) for matrices and
        embeddings, zero biases, zero where a path starts closed; then the projections into the residual stream
        redrawn with std 0.02/√(2L) (two passes, in module order, so a seed gives the weights it always gave)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, Linear):
                raise TypeError(f"{type(m).__name__} holds a plain nn.Linear: use shortcut.blocks.Linear and "
                                f"declare its init")
        for m in _post_order(self):
            if isinstance(m, Linear):
                if m.init != "zero":
                    nn.init.normal_(m.weight, mean=0.0, std=m.std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for m in self.modules():
            if isinstance(m, Linear) and m.init == "residual":
                nn.init.normal_(m.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    # --- one pass through the blocks ---

    def embed(self, idx, pos: int = 0):
        """h_0 (B, n, C) of tokens idx (B, n) at positions pos..pos+n-1, before dropout, and their RoPE tables
        (None with learned positions)."""
        T = idx.size(1)
        if pos + T > self.cfg.block_size:
            raise ValueError(f"sequence length {pos + T} exceeds model.block_size={self.cfg.block_size}")
        if self.cfg.pos == PosEmb.learned:
            return self.wte(idx) + self.wpe(torch.arange(pos, pos + T, device=idx.device)), None
        return self.wte(idx), self.rotary(T, pos)

    def start(self, idx, cache: Cache | None = None) -> Trace:
        """A pass over tokens idx (B, n): h_0 after dropout; with a cache, at the positions after those cached."""
        x, rope = self.embed(idx, cache.length if cache is not None else 0)
        return Trace([self.drop(x)], rope, cache=cache)

    def run_block(self, i: int, trace: Trace, need_weights: bool = False) -> torch.Tensor:
        """Block i on h_i = trace.states[i] (a shortcut block reads its taps from trace.states[:i+1]); returns
        h_{i+1} (B, n, C) without appending it. Its attention probabilities go to trace.probs[i] when asked."""
        taps = self.tap_stack(trace, self.block_taps[i]) if i in self.block_taps else None
        cache = self._block_cache(trace, i)
        x, info = self.blocks[i](trace.states[i], trace.rope, taps=taps, cache=cache, need_weights=need_weights)
        if info is not None:
            if info.probs is not None:
                trace.probs[i] = info.probs
            if info.processed is not None:
                trace.processed[i] = info.processed
            if info.aux_loss is not None:
                trace.aux_losses.append(info.aux_loss)
        return x

    def remember(self, i: int, trace: Trace) -> None:
        """Only the keys and values block i would cache for h_i = trace.states[i] (a state copied upward past
        block i: CALM's early exit), into trace.cache."""
        taps = self.tap_stack(trace, self.block_taps[i]) if i in self.block_taps else None
        self.blocks[i].remember(trace.states[i], trace.rope, taps, self._block_cache(trace, i))

    @staticmethod
    def _block_cache(trace: Trace, i: int, exit_depth: int | None = None) -> BlockCache | None:
        if trace.cache is None:
            return None
        cache = trace.cache.blocks[i] if exit_depth is None else trace.cache.exits[exit_depth]
        cache.pos = trace.cache.length
        return cache

    def run(self, trace: Trace, depth: int | None = None, weights=()) -> Trace:
        """Run the blocks from trace.depth up to depth (default: all), appending each output to trace.states;
        weights: the blocks whose attention probabilities to keep."""
        for i in range(trace.depth, len(self.blocks) if depth is None else depth):
            trace.states.append(self.run_block(i, trace, i in weights))
        return trace

    def tap_stack(self, trace: Trace, taps: list[int]):
        """z = f_l(h_l) + e_l (B, K, n, C) for taps l (a prefix of the sorted taps, so f_l and e_l are indexed
        alike) from trace.states; f_l(h_l) is computed once per pass, the first time a block reads it."""
        for j, l in enumerate(taps):
            if l not in trace.feats:
                h = trace.states[l]
                trace.feats[l] = self.feature_maps[j](h) if self.feature_maps is not None else h
        z = torch.stack([trace.feats[l] for l in taps], dim=1)  # (B, K, n, C)
        if self.depth_emb is not None:
            z = z + self.depth_emb[None, :len(taps), None, :].to(z.dtype)
        return z

    def head(self, x):
        """The final norm and the tied output layer: (B, n, C) -> logits (B, n, V)."""
        return self.lm_head(self.ln_f(x))

    def exit_logits(self, trace: Trace, d: int):
        """The early exit at depth d from the states h_0 .. h_d of a trace: logits (B, n, V). Baseline: the head
        on h_d. Shortcut: the final block with its query from h_d and its keys and values from the taps l <= d
        (their share of its tap bias), then the head. At the full depth (d = L, or L-1 for the shortcut) this is
        the model's own output."""
        if not self.shortcut:
            return self.head(trace.states[d])
        x, _ = self.blocks[-1](trace.states[d], trace.rope, taps=self._exit_taps(trace, d),
                               cache=self._exit_cache(trace, d))  # (B, n, C)
        return self.head(x)

    def remember_exit(self, trace: Trace, d: int) -> None:
        """Only the keys and values the exit at depth d caches (the shortcut's final block on h_d and the taps
        <= d); nothing for the baseline, whose exit is its head."""
        if self.shortcut:
            self.blocks[-1].remember(trace.states[d], trace.rope, self._exit_taps(trace, d),
                                     self._exit_cache(trace, d))

    def _exit_taps(self, trace: Trace, d: int):
        return self.tap_stack(trace, [l for l in self.taps if l <= d])

    def _exit_cache(self, trace: Trace, d: int) -> BlockCache | None:
        full = d == self.cfg.exit_depths()[-1]
        return self._block_cache(trace, len(self.blocks) - 1, None if full or trace.cache is None else d)

    def forward(self, idx, targets=None, exits=(), cache: Cache | None = None):
        """idx: (B, n) token ids. Returns (logits (B, n, V), the mean next-token loss or None).

        exits (training with model.exit_train): depths d whose early-exit losses join the full model's; the loss
        is then the mean over the full depth and those exits (the logits stay the full model's). cache: decode n
        tokens after those the cache holds (baseline, shortcut and the variants that say `caches`), filling it."""
        trace = None
        if self.variant is not None:
            x = self._variant_pass(idx, cache)
        else:
            trace = self.run(self.start(idx, cache))
            x = trace.states[-1]
            if cache is not None:
                cache.length += idx.size(1)
        logits = self.head(x)  # (B, n, V)
        if targets is None:
            return logits, None
        ce = lambda z: F.cross_entropy(z.float().view(-1, z.size(-1)), targets.reshape(-1))  # noqa: E731
        loss = ce(logits)
        if exits:  # LayerSkip / CALM-style training: one set of weights serves every exit depth
            loss = (loss + sum(ce(self.exit_logits(trace, d)) for d in exits)) / (1 + len(exits))
        if trace is not None and trace.aux_losses:  # Mixture-of-Depths: the routers learn to predict their top-k
            loss = loss + self.cfg.mod_aux_weight * torch.stack(trace.aux_losses).mean()
        return logits, loss

    def _variant_pass(self, idx, cache: Cache | None) -> torch.Tensor:
        """The variant's own pass over tokens idx (B, n): the last residual stream (B, n, C). With a cache (the
        variants that say `caches`), at the positions after those cached, its blocks' caches handed over."""
        if cache is None:
            x, rope = self.embed(idx)
            return self.variant(self.drop(x), self.blocks, rope)
        if not self.caches:
            raise ValueError(f"no KV cache for {self.cfg.arch}")
        for block_cache in cache.blocks:
            block_cache.pos = cache.length
        x, rope = self.embed(idx, cache.length)
        x = self.variant(self.drop(x), self.blocks, rope, cache=cache.blocks)
        cache.length += idx.size(1)
        return x

    @property
    def caches(self) -> bool:
        """Whether this model decodes with the KV cache: the baseline, the shortcut and the variants that say so."""
        return self.variant is None or getattr(self.variant, "caches", False)

    def new_cache(self, batch: int, device=None, dtype=None, exits=()) -> Cache:
        """An empty Cache of block_size positions for `batch` sequences (baseline, shortcut, the variants that say
        `caches`); exits: the exit depths < full the decoding will use (their caches for the shortcut's final
        block)."""
        if not self.caches:
            raise ValueError(f"no KV cache for {self.cfg.arch}")
        device, dtype = device or self.wte.weight.device, dtype or self.wte.weight.dtype
        cache = Cache([block.new_cache(self.cfg, batch, device, dtype) for block in self.blocks])
        if self.shortcut:
            final = cache.blocks[-1]
            for d in exits:  # the tap keys are shared (a shallow exit reads the first of them); add mode's are not
                own = self.blocks[-1].new_cache(self.cfg, batch, device, dtype).self_kv
                cache.exits[d] = BlockCache(self_kv=own, tap_kv=final.tap_kv)
        return cache

    # --- what the audit reads ---

    def run_to(self, idx, depth: int) -> Trace:
        """Blocks 0..depth-1 on idx (baseline or shortcut): the trace of states h_0 .. h_depth (what
        exit_logits reads for an exit at that depth)."""
        return self.run(self.start(idx), depth)

    def depth_attention(self, idx, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (B, T, V) and the shortcut's final block's attention probabilities over (tap, key position),
        from its explicit softmax: head-averaged (B, T queries, K taps, T keys), or per head (B, nh, T, K, T)."""
        L = len(self.blocks)
        trace = self.run(self.start(idx), weights={L - 1})
        probs = trace.probs[L - 1]
        return self.head(trace.states[-1]), probs if per_head else probs.mean(dim=1)

    def hidden_states(self, idx) -> list[torch.Tensor]:
        """h_0 .. h_{L-1}, each (B, T, C): the residual stream after the embeddings and after every block but the
        last (the inputs the final block reads, in both architectures). For a variant, the residual stream each
        block reads (DenseFormer: the averages; AttnRes: the attention sublayers' inputs; MUDD: the R stream)."""
        if self.variant is not None:
            x, rope = self.embed(idx)
            record = {}
            self.variant(x, self.blocks, rope, record)
            return record["states"]
        return self.run_to(idx, len(self.blocks) - 1).states

    @property
    def weighs_layers(self) -> bool:
        """Whether this model weighs earlier layers' outputs (what the depth audit's layer_weights reports)."""
        return self.shortcut or getattr(self.variant, "kind", None) is not None

    def layer_weights(self, idx) -> dict | None:
        """How the model weighs the outputs of earlier layers, per token (None for a model that does not).

        Returns {"kind", "sources" (layer indices: 0 the embeddings, l the output of block l), "consumers" (who
        reads each mix; the last one feeds the head or, for the shortcut, the final block), "weights" (B, T, A
        consumers, S sources) float32, a source's weight summed over its parts, 0 where a mix does not read it),
        "normalised" (every row sums to one)}. The shortcut: one consumer per shortcut block ("block i", the
        last "final block"), its attention mass on each tap summed over key positions (0 on taps above it)."""
        if self.shortcut:
            probs = self.run(self.start(idx), weights=set(self.block_taps)).probs  # block i -> (B, nh, T, K_i, T)
            K = len(self.taps)
            mass = [F.pad(probs[i].mean(dim=1).sum(dim=-1).float(), (0, K - probs[i].size(3)))
                    for i in sorted(probs)]  # (B, T, K) each
            L = len(self.blocks)
            consumers = [f"block {i}" for i in self.block_taps if i < L - 1] + ["final block"]
            return {"kind": "shortcut attention mass", "sources": list(self.taps), "consumers": consumers,
                    "weights": torch.stack(mass, dim=2), "normalised": True}
        if not self.weighs_layers:
            return None
        x, rope = self.embed(idx)
        record = {}
        self.variant(x, self.blocks, rope, record)
        return {"kind": self.variant.kind, **record["weights"]}


def _post_order(module: nn.Module):
    """Every submodule, children before their parent, in registration order: nn.Module.apply's order (which the
    seeded initialisation has always followed)."""
    for child in module.children():
        yield from _post_order(child)
    yield module
