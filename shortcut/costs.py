"""What a model costs, from its config: parameters, and matmul FLOPs per token (forward, training, per early exit,
per state copied upward), as torch.utils.flop_counter counts them (2 per multiply-add); and parameter matching.

Attention is counted over the full T x T score matrix (what a dense kernel computes), like torchtitan's
6N + 12·L·H·d_head·T. Each block kind states its own forward FLOPs and the key/value projections a position costs
it (shortcut.blocks); here they are added up with the feature maps (one per tap), the head and a variant's own
matmuls (variants' `extra_flops`). Weighted sums over depth, norms, softmax, RoPE and the tap bias are elementwise
work the counter does not count. train = 3 x forward, plus the expected cost of model.exit_train's sampled exit.
Train, eval, early exit, compare and the benchmarks read these numbers; the counter tests keep them exact.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from shortcut.blocks import ShortcutBlock, block_kind, feature_map_flops
from shortcut.config import Arch, MatchBy, ModelConfig, PosEmb
from shortcut.model import GPT
from shortcut.variants import VARIANTS


@dataclass(frozen=True)
class Params:
    params: int  # total, the tied head counted once
    non_embedding_params: int  # without the token and position tables


@dataclass(frozen=True)
class FlopsPerToken:
    forward: int
    train: int  # forward and backward (3 x forward) plus the expected early-exit training cost


@dataclass(frozen=True)
class Costs:
    """Forward FLOPs per token, part by part, at one context length."""
    cfg: ModelConfig
    seq_len: int
    blocks: tuple[float, ...]  # block i's forward (a routed block's is an expectation: a fraction)
    taps: tuple[int, ...]  # the shortcut's tap layers, one feature map each (() for other archs)
    feature_map: int  # one tap's feature map
    head: int  # the tied output matmul
    extra: int  # a variant's own matmuls
    kv: int  # one position's keys and values through one attention: what a state copied upward costs a reader

    @property
    def forward(self) -> int:
        return round(sum(self.blocks) + len(self.taps) * self.feature_map + self.head + self.extra)

    def taps_upto(self, d: int) -> int:
        return sum(1 for l in self.taps if l <= d)

    def exit(self, d: int, fmaps: bool = True) -> int:
        """The early exit at depth d on top of the blocks before it: baseline the head; shortcut the final block
        over the taps <= d, their feature maps (fmaps=False: already computed, as in training, where the full pass
        made them) and the head. At the full depth, blocks 0..d-1 plus this is the forward."""
        if self.cfg.arch != Arch.shortcut:
            return self.head
        n = self.taps_upto(d)
        final = ShortcutBlock.flops(self.cfg, self.cfg.n_layer - 1, self.seq_len, n_taps=n)
        return final + fmaps * n * self.feature_map + self.head

    def copy_up(self, d: int) -> int:
        """What a token exiting at d costs later readers, who attend to its state copied upward (CALM): its keys
        and values in every block it never ran (blocks d.. of the baseline; d..L-2 of the shortcut, whose final
        block ran at the exit), and for the shortcut the final block's keys and values of the taps above d and
        those taps' feature maps."""
        cfg, L = self.cfg, self.cfg.n_layer
        shortcut = cfg.arch == Arch.shortcut
        flops = sum(self.kv * block_kind(cfg, i).kv_projections(cfg, i) for i in range(d, L - 1 if shortcut else L))
        if shortcut:
            flops += (self.kv + self.feature_map) * (len(self.taps) - self.taps_upto(d))
        return flops

    def exits(self) -> ExitCosts:
        """Per exit depth: the fixed policy's cost and the confidence policy's (every depth <= d tried)."""
        depths = self.cfg.exit_depths()
        full = depths[-1]
        shortcut = self.cfg.arch == Arch.shortcut
        before = lambda d: sum(self.blocks[:d])  # noqa: E731
        fixed = {d: before(d) + self.exit(d) for d in depths}
        confidence, tried, projected = {}, 0, 0
        for d in depths:
            # the exit head at d; the shortcut's final block re-uses the keys and values of the taps it projected at
            # the shallower decisions (the same weights on the same states), as a cache would
            tried += self.exit(d, fmaps=False) - self.kv * projected
            projected = self.taps_upto(d) if shortcut else 0
            fmaps = self.feature_map * self.taps_upto(d)
            confidence[d] = before(d) + tried + fmaps + (self.copy_up(d) if d < full else 0)
        return ExitCosts(depths=depths, fixed=fixed, confidence=confidence, full=fixed[full])


@dataclass(frozen=True)
class ExitCosts:
    """Forward FLOPs per token of a token that exits at depth d: fixed[d] (every token at d) and confidence[d]
    (under the confidence policy: the decisions at every depth <= d and its state copied upward); full: the
    model's forward."""
    depths: list[int]
    fixed: dict[int, int]
    confidence: dict[int, int]
    full: int


def costs(cfg: ModelConfig, seq_len: int | None = None) -> Costs:
    """The parts of cfg's forward FLOPs per token at context length seq_len (default block_size)."""
    T, C = seq_len or cfg.block_size, cfg.n_embd
    blocks = tuple(block_kind(cfg, i).flops(cfg, i, T) for i in range(cfg.n_layer))
    shortcut = cfg.arch == Arch.shortcut
    extra = VARIANTS[cfg.arch].extra_flops(cfg) if cfg.arch in VARIANTS else 0
    return Costs(cfg=cfg, seq_len=T, blocks=blocks, taps=tuple(cfg.tap_layers()) if shortcut else (),
                 feature_map=feature_map_flops(cfg) if shortcut else 0, head=2 * C * cfg.vocab_size, extra=extra,
                 kv=2 * 2 * C * C)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> FlopsPerToken:
    """Analytic forward and training FLOPs per token at context length seq_len (default block_size). With
    model.exit_train, training adds the expected cost of the sampled early exit (probability exit_train, its depth
    uniform over the shallow ones; forward and backward)."""
    c = costs(cfg, seq_len)
    shallow = cfg.exit_depths()[:-1]
    exit_cost = sum(c.exit(d, fmaps=False) for d in shallow) / len(shallow) if shallow else 0
    return FlopsPerToken(forward=c.forward, train=3 * c.forward + round(3 * cfg.exit_train * exit_cost))


def param_counts(cfg: ModelConfig) -> Params:
    """Total parameters (tied head counted once) and non-embedding parameters (without token/position tables)."""
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    tables = model.wte.weight.numel() + (model.wpe.weight.numel() if cfg.pos == PosEmb.learned else 0)
    return Params(params=total, non_embedding_params=total - tables)


def match_params(cfg: ModelConfig) -> ModelConfig:
    """Grow cfg (a baseline, say) until its parameter count matches cfg.match_params' arch with the same sizes.

    width: the largest n_embd (a multiple of n_head) that stays under the target; depth: the largest n_layer that
    does. Then the MLP hidden width takes up the rest, which is fine-grained enough to land within 0.1%.
    """
    if cfg.match_params is None:
        return cfg
    count = lambda c: param_counts(c).params  # noqa: E731
    target = count(replace(cfg, arch=cfg.match_params, match_params=None))
    base = replace(cfg, match_params=None)
    if count(base) > target:
        raise ValueError(f"model.match_params: this {cfg.arch} model already has more parameters "
                         f"({count(base):,}) than the {cfg.match_params} target ({target:,})")
    grow = "n_embd" if cfg.match_by == MatchBy.width else "n_layer"
    step = (2 if cfg.pos == PosEmb.rope else 1) * cfg.n_head if grow == "n_embd" else 1  # rope: even head sizes
    while True:
        bigger = replace(base, **{grow: getattr(base, grow) + step})
        if grow == "n_embd":  # keep the MLP ratio while widening
            bigger = replace(bigger, mlp_hidden=None if cfg.mlp_hidden is None else
                             cfg.mlp_hidden * bigger.n_embd // cfg.n_embd)
        if count(bigger) > target:
            break
        base = bigger
    # Parameters are linear in the MLP hidden width: solve for it.
    per_unit = count(replace(base, mlp_hidden=base.d_mlp + 1)) - count(base)
    hidden = base.d_mlp + (target - count(base)) // per_unit
    return replace(base, mlp_hidden=hidden)
