"""The modules a GPT is built from: norms, RoPE, MLPs, the two attentions, the blocks and the taps' feature maps.

Every block has one forward, which training, evaluation, the depth audit, early exits and cached decoding all call:
``block(x, rope, taps=None, cache=None, need_weights=False) -> (x, info)``. x (B, n, C) is the block's input at n
positions; a shortcut block also takes its taps z (B, K_i, n, C), the features of the layers it reads at those
positions (GPT.tap_stack makes them). With a BlockCache the n positions are the next ones after those cached
(decoding): the block appends their keys and values and attends over everything cached. info: a BlockInfo (the
shortcut block's attention probabilities when need_weights; a routed block's choices and router loss) or None.
``block.remember(x, rope, taps, cache)`` only writes the keys and values a position would leave in the cache: what
a state copied upward past the block costs (CALM early exits, shortcut.generate).

Block kinds register themselves (``register_block``), most specific first, and GPT builds block i as the first kind
that ``applies(cfg, i)``; a new kind of block is one module. Each kind states its forward FLOPs per token and the
key/value projections one position costs it (shortcut.costs adds them up; the counter tests keep them exact).
Initialisation is declared where a projection is built (``Linear(..., init=...)``) and applied by GPT in one pass.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from shortcut.attention import (ATTENTION, cached_attention, cached_depth_context_attention,
                                depth_context_attention_probs, lse_kernel_available, resolve_attn_impl)
from shortcut.config import AttnImpl, FeatureMap, MLPKind, ModelConfig, Norm, ShortcutMode, TapBias


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """model.norm: LayerNorm (GPT-2; bias per model.bias) or RMSNorm (a gain only). Both start as a plain norm."""
    dim = dim or cfg.n_embd
    return nn.LayerNorm(dim, bias=cfg.bias) if cfg.norm == Norm.layernorm else nn.RMSNorm(dim, eps=1e-5)


class Linear(nn.Linear):
    """nn.Linear whose initialisation is declared where it is built; GPT.init_weights applies it to every one:
    "normal" N(0, std) (GPT-2: 0.02), "residual" N(0, 0.02/√(2L)) (GPT-2's projections into the residual stream),
    "zero" (a new path that starts closed, so the model starts as the one without it). Biases start at zero."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, init: str = "normal", std: float = 0.02):
        super().__init__(d_in, d_out, bias=bias)
        if init not in ("normal", "residual", "zero"):
            raise ValueError(f"unknown init {init!r}")
        self.init, self.std = init, std
        if init == "zero":
            nn.init.zeros_(self.weight)


class Rotary(nn.Module):
    """RoPE (Su et al. 2021, arXiv 2104.09864): channel pairs (i, i + hs/2) of queries and keys rotated by angle
    t·theta^(-2i/hs) at position t, so q·k depends on positions only through their difference. Chosen: theta 10000,
    every layer, the whole head. Tables are buffers outside the state dict (a function of the config)."""

    def __init__(self, head_size: int, block_size: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
        angle = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, T: int, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[pos:pos + T], self.sin[pos:pos + T]  # 2 x (T, hs/2) for positions pos..pos+T-1


def apply_rope(x, rope):
    """x: (..., T, hs), rope: the (T, hs/2) cos and sin tables. Elementwise (no matmul: no FLOPs in the counts)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class MLP(nn.Module):
    """gelu: W2·gelu(W1·x) (GPT-2). swiglu: W2·(silu(W1·x) * W3·x) (Shazeer 2020), W1 and W3 stacked in c_fc.
    out_init: how W2 starts ("residual" in a block; "zero" in a feature map, which then starts as the identity)."""

    def __init__(self, d_in: int, d_hidden: int, bias: bool, dropout: float = 0.0, kind: MLPKind = MLPKind.gelu,
                 out_init: str = "residual"):
        super().__init__()
        self.gated = kind == MLPKind.swiglu
        self.c_fc = Linear(d_in, 2 * d_hidden if self.gated else d_hidden, bias=bias)
        self.c_proj = Linear(d_hidden, d_in, bias=bias, init=out_init)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.gated:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# --- the KV cache of incremental decoding -------------------------------------------------------------------

@dataclass
class KV:
    """One attention's cached keys and values, (B, nh, T, hs), or (B, nh, K, T, hs) for (tap, position) keys.

    valid (B, T) bool, for a routed block (shortcut.routing): which positions hold a key (the tokens it processed);
    None: every written position does. rows: this view reads and writes those rows only (the sequences of a batch
    that still run a block while the others have exited)."""
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, taps: tuple[int, ...] = (), device=None, dtype=None,
              routed: bool = False) -> KV:
        shape = (batch, cfg.n_head, *taps, cfg.block_size, cfg.n_embd // cfg.n_head)
        valid = torch.zeros(batch, cfg.block_size, dtype=torch.bool, device=device) if routed else None
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   valid)

    def select(self, rows: torch.Tensor) -> KV:
        """A view of these rows (B' indices) of the batch."""
        return KV(self.k, self.v, self.valid, rows if self.rows is None else self.rows[rows])

    def write(self, k, v, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, [K',] n, hs) at positions pos..pos+n-1 (the first K' taps); returns the cached keys
        and values of positions 0..pos+n-1 (of those taps)."""
        t, rows = pos + k.size(-2), slice(None) if self.rows is None else self.rows
        if k.dim() == 5:  # (tap, position) keys: a shallow exit writes and reads only its first K' taps
            K = k.size(2)
            self.k[rows, :, :K, pos:t], self.v[rows, :, :K, pos:t] = k, v
            return self.k[rows, :, :K, :t], self.v[rows, :, :K, :t]
        self.k[rows, :, pos:t], self.v[rows, :, pos:t] = k, v
        return self.k[rows, :, :t], self.v[rows, :, :t]

    def mark(self, pos: int, processed: torch.Tensor) -> None:
        """A routed block's positions pos..pos+n-1: processed (B, n) bool says which of them now hold a key."""
        rows = slice(None) if self.rows is None else self.rows
        self.valid[rows, pos:pos + processed.size(1)] = processed

    def visible(self, pos: int, n: int) -> torch.Tensor | None:
        """(B, 1, n, pos + n) bool for n queries at positions pos..: causal and, for a routed block, valid keys
        only (None when causality alone decides)."""
        if self.valid is None:
            return None
        rows = slice(None) if self.rows is None else self.rows
        keys = torch.arange(pos + n, device=self.valid.device)[None, :]
        queries = (pos + torch.arange(n, device=self.valid.device))[:, None]
        # a query whose own token is not processed sees its own key only: its output is discarded, and it must not
        # be an empty softmax (NaN)
        return ((keys <= queries) & self.valid[rows, None, :pos + n] | (keys == queries))[:, None]  # (B,1,n,pos+n)


@dataclass
class BlockCache:
    """One block's cache: its self-attention's keys and values, a shortcut block's (tap, position) ones, and pos,
    where the next call's positions start (GPT sets it from the model's cache)."""
    self_kv: KV | None = None
    tap_kv: KV | None = None
    pos: int = 0

    def select(self, rows: torch.Tensor) -> BlockCache:
        """The same cache for these rows of the batch only."""
        pick = lambda kv: None if kv is None else kv.select(rows)  # noqa: E731
        return BlockCache(pick(self.self_kv), pick(self.tap_kv), self.pos)


@dataclass
class BlockInfo:
    """What a block reports besides its output: a shortcut block's attention probabilities (B, nh, n, K, t)
    (need_weights), a routed block's processed tokens (B, n) bool and its router's auxiliary loss (training)."""
    probs: torch.Tensor | None = None
    processed: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


# --- attention ----------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (baseline)."""

    def __init__(self, cfg: ModelConfig, out_init: str = "residual"):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v stacked
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, init=out_init)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x):  # (B, T, C) -> (B, nh, T, hs)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def project(self, x, xk=None, xv=None, rope=None):
        """q, k, v: 3 x (B, nh, T, hs) from the normalised input x, or (MUDD) from three different inputs x, xk, xv
        through the same three matrices. RoPE, when on, rotates q and k."""
        C = self.n_embd
        if xk is None:
            q, k, v = (self.heads(t) for t in self.c_attn(x).split(C, dim=-1))  # 3 x (B, nh, T, hs)
        else:
            bias = self.c_attn.bias.split(C) if self.c_attn.bias is not None else (None,) * 3
            q, k, v = (self.heads(F.linear(t, w, b)) for t, w, b in zip((x, xk, xv), self.c_attn.weight.split(C), bias))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def merge(self, y):
        """(B, nh, T, hs) attention outputs -> (B, T, C), merged and projected back."""
        B, nh, T, hs = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, nh * hs)))

    def attend(self, q, k, v):
        """Causal attention of (B, nh, T, hs) heads, merged and projected back: (B, T, C)."""
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.merge(y)

    def forward(self, x, rope=None, cache: KV | None = None, pos: int = 0):
        q, k, v = self.project(x, rope=rope)
        if cache is None:
            return self.attend(q, k, v)
        k, v = cache.write(k, v, pos)  # (B, nh, pos + n, hs)
        return self.merge(cached_attention(q, k, v, pos, cache.visible(pos, q.size(2))))

    def remember(self, x, rope, cache: KV, pos: int) -> None:
        """Only the keys and values of x (B, n, C, normalised) at positions pos.. into the cache."""
        C = self.n_embd
        w, b = self.c_attn.weight[C:], None if self.c_attn.bias is None else self.c_attn.bias[C:]
        k, v = (self.heads(t) for t in F.linear(x, w, b).split(C, dim=-1))  # 2 x (B, nh, n, hs)
        cache.write(apply_rope(k, rope) if rope is not None else k, v, pos)


LAST_TAP_MASS = 0.995  # tap_bias=last: the deepest tap's share of the attention at init, were all scores equal


def last_tap_bias(n_head: int, n_taps: int) -> torch.Tensor:
    """(n_head * n_taps,) flat: 0 on the deepest tap, -β on the others, β = ln(m/(1-m)·(K-1)), so that with equal
    scores the deepest tap holds m = LAST_TAP_MASS of the softmax (random init: scores ~ ±0.03, nearly equal).
    Flat (one dimension), so it is a bias to the optimizer too: no weight decay pulls it back to uniform."""
    b = torch.zeros(n_head, n_taps)
    if n_taps > 1:
        b[:, :-1] = -math.log(LAST_TAP_MASS / (1 - LAST_TAP_MASS) * (n_taps - 1))
    return b.flatten()


class DepthContextAttention(CausalSelfAttention):
    """The paper's attention over (layer, position) pairs: queries from positions, keys/values from (tap, position).

    Same parameters as the baseline's attention (c_attn holds W_q, W_k, W_v; K/V projections are shared across
    taps), so a shortcut model with a single tap l = L-1 and identity feature maps *is* the baseline. Optional:
    a learned bias per head and tap (tap_bias, n_taps of them); out_init="zero" for the added branch of
    shortcut_mode=add, so that it starts closed. The kernels (model.attn_impl) are in shortcut/attention.py.
    """

    def __init__(self, cfg: ModelConfig, n_taps: int, out_init: str = "residual"):
        super().__init__(cfg, out_init=out_init)
        self.attn_impl = cfg.attn_impl
        self.tap_bias = None
        if cfg.tap_bias == TapBias.last:
            self.tap_bias = nn.Parameter(last_tap_bias(cfg.n_head, n_taps))  # (nh * K,)

    def project_taps(self, x, z, rope=None):
        """x: (B, T, C) normalised queries' input;  z: (B, K, T, C) normalised f_l(h_l) + e_l for the K taps.
        Returns q (B, nh, T, hs) and k, v (B, nh, K, T, hs), with RoPE at each key's position s."""
        B, K, T, C = z.shape
        nh = self.n_head
        w_q, w_kv = self.c_attn.weight.split([C, 2 * C], dim=0)
        b_q, b_kv = self.c_attn.bias.split([C, 2 * C]) if self.c_attn.bias is not None else (None, None)
        q = self.heads(F.linear(x, w_q, b_q))  # (B, nh, T, hs)
        k, v = F.linear(z, w_kv, b_kv).split(C, dim=3)  # 2 x (B, K, T, C)
        k, v = (t.view(B, K, T, nh, C // nh).permute(0, 3, 1, 2, 4) for t in (k, v))  # 2 x (B, nh, K, T, hs)
        if rope is not None:  # key (l, s) sits at position s, whatever its tap
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def bias(self, n_taps: int):
        """The tap bias (nh, n_taps) for a block reading the first n_taps taps, or None."""
        return None if self.tap_bias is None else self.tap_bias.view(self.n_head, -1)[:, :n_taps]

    def forward(self, x, z, rope=None, cache: KV | None = None, pos: int = 0, need_weights: bool = False):
        # x: (B, n, C) normalised h_i;  z: (B, K, n, C) normalised f_l(h_l) + e_l for the K taps it reads
        q, k, v = self.project_taps(x, z, rope)
        bias = self.bias(z.size(1))  # (nh, K) or None
        if cache is not None:
            k, v = cache.write(k, v, pos)  # (B, nh, K, pos + n, hs)
            return self.merge(cached_depth_context_attention(q, k, v, pos, bias)), None
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:  # explicit softmax so the probabilities can be audited
            y, probs = depth_context_attention_probs(q, k, v, dropout_p, bias=bias)  # (B,nh,T,hs), (B,nh,T,K,T)
            return self.merge(y), probs
        impl = resolve_attn_impl(self.attn_impl, q.device.type)
        if dropout_p > 0 or (impl == AttnImpl.lse and not lse_kernel_available(q)):
            impl = AttnImpl.masked  # only the reference applies attention dropout / fits every dtype
        # a named range, so a profile shows the kernels this attention ran (benchmarks/gpu_check.py)
        with nullcontext() if torch.compiler.is_compiling() else record_function(f"depth_context_attention.{impl}"):
            y = ATTENTION[impl](q, k, v, dropout_p, bias=bias)  # (B, nh, T, hs)
        return self.merge(y), None

    def remember(self, z, rope, cache: KV, pos: int) -> None:
        """Only the keys and values of the taps z (B, K, n, C, normalised) at positions pos.. into the cache."""
        B, K, n, C = z.shape
        w, b = self.c_attn.weight[C:], None if self.c_attn.bias is None else self.c_attn.bias[C:]
        k, v = F.linear(z, w, b).split(C, dim=3)  # 2 x (B, K, n, C)
        k, v = (t.view(B, K, n, self.n_head, C // self.n_head).permute(0, 3, 1, 2, 4) for t in (k, v))
        cache.write(apply_rope(k, rope) if rope is not None else k, v, pos)


# --- blocks -------------------------------------------------------------------------------------------------

BLOCK_KINDS: list[type] = []  # most specific first: GPT builds block i as the first kind that applies


def register_block(kind: type) -> type:
    """Class decorator: a block kind GPT may build (checked before the kinds registered earlier)."""
    BLOCK_KINDS.insert(0, kind)
    return kind


def block_kind(cfg: ModelConfig, i: int) -> type:
    return next(kind for kind in BLOCK_KINDS if kind.applies(cfg, i))


def _self_attention_flops(C: int, T: int) -> int:
    return 2 * (3 * C * C + C * C) + 2 * 2 * T * C  # qkv, out proj; q·k and p·v over T keys


def mlp_flops(cfg: ModelConfig) -> int:
    return 2 * (3 if cfg.mlp == MLPKind.swiglu else 2) * cfg.n_embd * cfg.d_mlp  # gelu: C->H->C; swiglu: C->2H, H->C


@register_block
class Block(nn.Module):
    """Pre-norm block (GPT-2): x + Attn(LN(x)), then + MLP(LN(x)). The two branches are methods of their own, so
    that the variants which re-wire the residual stream (shortcut/variants/) call the same sub-layers."""

    def __init__(self, cfg: ModelConfig, i: int | None = None):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = self.make_attention(cfg, i)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg.n_embd, cfg.d_mlp, cfg.bias, cfg.dropout, cfg.mlp)

    @staticmethod
    def applies(cfg: ModelConfig, i: int) -> bool:
        return True  # the fallback: every block no other kind claims

    def make_attention(self, cfg: ModelConfig, i: int | None) -> nn.Module:
        return CausalSelfAttention(cfg)

    @staticmethod
    def flops(cfg: ModelConfig, i: int, seq_len: int) -> int:
        """Forward matmul FLOPs per token at context length seq_len (2 per multiply-add, as the counter counts)."""
        return _self_attention_flops(cfg.n_embd, seq_len) + mlp_flops(cfg)

    @staticmethod
    def kv_projections(cfg: ModelConfig, i: int) -> int:
        """Key/value projections one position costs this block (what a state copied upward costs a later reader)."""
        return 1

    def new_cache(self, cfg: ModelConfig, batch: int, device, dtype) -> BlockCache:
        return BlockCache(self_kv=KV.empty(cfg, batch, device=device, dtype=dtype))

    def attn_branch(self, x, rope=None, cache: BlockCache | None = None):
        """Attn(LN(x)) (B, n, C), over the cached positions too when decoding."""
        if cache is None:
            return self.attn(self.ln_1(x), rope)
        return self.attn(self.ln_1(x), rope, cache.self_kv, cache.pos)

    def mlp_branch(self, x):
        return self.mlp(self.ln_2(x))

    def forward(self, x, rope=None, taps=None, cache: BlockCache | None = None, need_weights: bool = False):
        x = x + self.attn_branch(x, rope, cache)
        return x + self.mlp_branch(x), None

    def remember(self, x, rope, taps, cache: BlockCache) -> None:
        self.attn.remember(self.ln_1(x), rope, cache.self_kv, cache.pos)


@register_block
class ShortcutBlock(Block):
    """A block of the shortcut model that reads (tap, position) pairs: the final one (the paper), or each of the
    last model.shortcut_layers. replace: depth-and-context attention instead of self-attention (attn). add:
    self-attention kept (attn, the baseline's names) and depth-and-context attention beside it (shortcut_attn),
    whose output projection starts at zero, so the block starts as the baseline's. Then the usual MLP sub-layer.

    Issue 13's switches: shortcut_mode=add gives x + Attn(LN(x)) + P·DCA(LN(x), LN(z)), P zero at init (new
    paths start closed: modded-nanogpt, DenseFormer, MUDDFormer; the paper does not say how it initialises);
    tap_bias=last adds b_l to tap l's scores, ~99.5% of the mass on the deepest tap at init."""

    def __init__(self, cfg: ModelConfig, i: int):
        self.n_taps = len(cfg.shortcut_taps()[i])
        self.add = cfg.shortcut_mode == ShortcutMode.add
        super().__init__(cfg, i)
        if self.add:
            self.shortcut_attn = DepthContextAttention(cfg, self.n_taps, out_init="zero")

    @staticmethod
    def applies(cfg: ModelConfig, i: int) -> bool:
        return cfg.arch == "shortcut" and i in cfg.shortcut_taps()

    def make_attention(self, cfg: ModelConfig, i: int | None) -> nn.Module:
        return CausalSelfAttention(cfg) if self.add else DepthContextAttention(cfg, self.n_taps)

    @property
    def depth_attn(self) -> DepthContextAttention:
        return self.shortcut_attn if self.add else self.attn

    @staticmethod
    def flops(cfg: ModelConfig, i: int, seq_len: int, n_taps: int | None = None) -> int:
        """q, k/v per tap, out; attention over n_taps·T keys; the MLP (add mode: plus the kept self-attention).
        n_taps: fewer than the block's own when it runs as a shallow exit."""
        C, T = cfg.n_embd, seq_len
        K = len(cfg.shortcut_taps()[i]) if n_taps is None else n_taps
        flops = 2 * (C * C + 2 * C * C * K + C * C) + 2 * 2 * K * T * C + mlp_flops(cfg)
        if cfg.shortcut_mode == ShortcutMode.add:
            flops += _self_attention_flops(C, T)
        return flops

    @staticmethod
    def kv_projections(cfg: ModelConfig, i: int) -> int:
        return len(cfg.shortcut_taps()[i]) + (cfg.shortcut_mode == ShortcutMode.add)

    def new_cache(self, cfg: ModelConfig, batch: int, device, dtype) -> BlockCache:
        taps = KV.empty(cfg, batch, (self.n_taps,), device=device, dtype=dtype)
        return BlockCache(self_kv=KV.empty(cfg, batch, device=device, dtype=dtype) if self.add else None, tap_kv=taps)

    def forward(self, x, rope=None, taps=None, cache: BlockCache | None = None, need_weights: bool = False):
        # x: (B, n, C) = h_i;  taps: (B, K, n, C) = f_l(h_l) + e_l, K <= K_i (fewer: a shallow exit's).  One
        # LayerNorm for queries and keys, as in the baseline block, which keeps the degenerate single-tap model
        # identical to the baseline.
        h = self.ln_1(x)
        kv, pos = (cache.tap_kv, cache.pos) if cache is not None else (None, 0)
        d, probs = self.depth_attn(h, self.ln_1(taps), rope, kv, pos, need_weights)
        if self.add:  # d == 0 at init: the baseline block
            kv = cache.self_kv if cache is not None else None
            x = x + self.attn(h, rope, kv, pos) + d
        else:
            x = x + d
        return x + self.mlp_branch(x), None if probs is None else BlockInfo(probs=probs)

    def remember(self, x, rope, taps, cache: BlockCache) -> None:
        self.depth_attn.remember(self.ln_1(taps), rope, cache.tap_kv, cache.pos)
        if self.add:
            self.attn.remember(self.ln_1(x), rope, cache.self_kv, cache.pos)


# --- the shortcut's feature maps f_l ------------------------------------------------------------------------

class FeatureMapMLP(nn.Module):
    """f_l(h) = h + W2·gelu(W1·LN(h)); W2 starts at zero, so f_l starts as the identity."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln = make_norm(cfg)
        # gelu whatever model.mlp: the feature map is the paper's
        self.mlp = MLP(cfg.n_embd, cfg.d_feature, cfg.bias, out_init="zero")

    def forward(self, h):
        return h + self.mlp(self.ln(h))


class FeatureMapLinear(nn.Module):
    """f_l(h) = h + W·h, W zero-initialised (identity at the start; weight decay pulls back towards identity)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, init="zero")

    def forward(self, h):
        return h + self.proj(h)


FEATURE_MAPS = {FeatureMap.mlp: FeatureMapMLP, FeatureMap.linear: FeatureMapLinear, FeatureMap.none: None}


def feature_map_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one tap's feature map."""
    C = cfg.n_embd
    return {FeatureMap.mlp: 2 * 2 * C * cfg.d_feature, FeatureMap.linear: 2 * C * C, FeatureMap.none: 0}[cfg.feature_map]
