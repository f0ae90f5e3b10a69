"""The baseline GPT and the layerwise-attention-shortcut GPT, side by side, with parameter and FLOP counts.

Baseline: GPT-2 (pre-LayerNorm, learned positions, GELU MLP, tied head); model.pos/norm/mlp turn it into a modern
one (RoPE, RMSNorm, SwiGLU) for every arch. Shortcut (Verma & Pilanci 2024, arXiv 2409.10870): the final block's
self-attention is replaced by attention over (layer, position) pairs, so each token chooses how deep a
representation it reads. That attention's kernels (a readable masked reference and faster exact implementations of
the same function, model.attn_impl) are in shortcut/attention.py. The other ways of reading earlier layers
(DenseFormer, Attention Residuals, MUDD, value residual) run these same blocks in their own loop: shortcut/variants/.

Issue 13's switches, each a field of ModelConfig (the defaults are the paper's model, with today's state-dict names):
  shortcut_mode=add   block i: x + Attn(LN(x)) + P·DCA(LN(x), LN(z)), P (the added branch's c_proj) zero at init,
                      so the model is the baseline at step 0 (zero-initialised new paths: modded-nanogpt, DenseFormer,
                      MUDDFormer all start as the baseline; the paper does not say how it initialises).
  tap_bias=last       scores q_t·k_ls/√hs + b_l, one learned b per head and tap, b = 0 on the deepest tap the block
                      reads and -ln(199·(K-1)) on the others: ~99.5% of the mass on the deepest tap at init.
  shortcut_layers=N   the last N blocks attend over (layer, position); block i (input h_i) reads the taps l <= i.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from shortcut.attention import (ATTENTION, depth_context_attention_probs, lse_kernel_available,
                                resolve_attn_impl)
from shortcut.config import (Arch, AttnImpl, FeatureMap, MatchBy, MLPKind, ModelConfig, Norm, PosEmb, ShortcutMode,
                             TapBias)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """model.norm: LayerNorm (GPT-2; bias per model.bias) or RMSNorm (a gain only). Both start as a plain norm."""
    dim = dim or cfg.n_embd
    return nn.LayerNorm(dim, bias=cfg.bias) if cfg.norm == Norm.layernorm else nn.RMSNorm(dim, eps=1e-5)


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

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:T], self.sin[:T]  # 2 x (T, hs/2)


def apply_rope(x, rope):
    """x: (..., T, hs), rope: the (T, hs/2) cos and sin tables. Elementwise (no matmul: no FLOPs in the counts)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class MLP(nn.Module):
    """gelu: W2·gelu(W1·x) (GPT-2). swiglu: W2·(silu(W1·x) * W3·x) (Shazeer 2020), W1 and W3 stacked in c_fc."""

    def __init__(self, d_in: int, d_hidden: int, bias: bool, dropout: float = 0.0, kind: MLPKind = MLPKind.gelu):
        super().__init__()
        self.gated = kind == MLPKind.swiglu
        self.c_fc = nn.Linear(d_in, 2 * d_hidden if self.gated else d_hidden, bias=bias)
        self.c_proj = nn.Linear(d_hidden, d_in, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.gated:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (baseline)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v stacked
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
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

    def attend(self, q, k, v):
        """Causal attention of (B, nh, T, hs) heads, merged and projected back: (B, T, C)."""
        B, nh, T, hs = q.shape
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x, rope=None):
        return self.attend(*self.project(x, rope=rope))


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
    """The paper's final-layer attention: queries from positions, keys/values from (tap, position) pairs.

    Same parameters as the baseline's attention (c_attn holds W_q, W_k, W_v; K/V projections are shared across
    taps), so a shortcut model with a single tap l = L-1 and identity feature maps *is* the baseline. Optional:
    a learned bias per head and tap (tap_bias, n_taps of them), and a zero-initialised output projection
    (zero_proj: the added branch of shortcut_mode=add).
    """

    def __init__(self, cfg: ModelConfig, n_taps: int | None = None, zero_proj: bool = False):
        super().__init__(cfg)
        self.attn_impl = cfg.attn_impl
        self.tap_bias = None
        if cfg.tap_bias == TapBias.last:
            self.tap_bias = nn.Parameter(last_tap_bias(cfg.n_head, n_taps))  # (nh * K,)
        if zero_proj:
            nn.init.zeros_(self.c_proj.weight)
            self.c_proj.is_zero_init = True

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

    def forward(self, x, z, need_weights: bool = False, rope=None):
        # x: (B, T, C) normalised h_{L-1};  z: (B, K, T, C) normalised f_l(h_l) + e_l for the K taps
        B, K, T, C = z.shape
        q, k, v = self.project_taps(x, z, rope)
        dropout_p = self.dropout if self.training else 0.0
        bias = self.bias(K)  # (nh, K) or None
        probs = None
        if need_weights:  # explicit softmax so the probabilities can be audited
            y, probs = depth_context_attention_probs(q, k, v, dropout_p, bias=bias)  # (B,nh,T,hs), (B,nh,T,K,T)
        else:
            impl = resolve_attn_impl(self.attn_impl, q.device.type)
            if dropout_p > 0 or (impl == AttnImpl.lse and not lse_kernel_available(q)):
                impl = AttnImpl.masked  # only the reference applies attention dropout / fits every dtype
            # a named range, so a profile shows the kernels this attention ran (benchmarks/gpu_check.py)
            name = f"depth_context_attention.{impl}"
            with nullcontext() if torch.compiler.is_compiling() else record_function(name):
                y = ATTENTION[impl](q, k, v, dropout_p, bias=bias)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), probs


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn=CausalSelfAttention):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = attn(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg.n_embd, cfg.d_mlp, cfg.bias, cfg.dropout, cfg.mlp)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class ShortcutBlock(Block):
    """A block of the shortcut model that reads (tap, position) pairs: the final one (the paper), or each of the
    last model.shortcut_layers. replace: depth-and-context attention instead of self-attention (attn). add:
    self-attention kept (attn, the baseline's names) and depth-and-context attention beside it (shortcut_attn),
    whose output projection starts at zero. Then the usual MLP sub-layer."""

    def __init__(self, cfg: ModelConfig, n_taps: int):
        add = cfg.shortcut_mode == ShortcutMode.add
        super().__init__(cfg, attn=CausalSelfAttention if add else lambda c: DepthContextAttention(c, n_taps))
        self.add = add
        if add:
            self.shortcut_attn = DepthContextAttention(cfg, n_taps, zero_proj=True)

    def forward(self, x, z, need_weights: bool = False, rope=None):
        # x: (B, T, C) = h_i;  z: (B, K_i, T, C) = f_l(h_l) + e_l.  One LayerNorm for queries and keys, as in
        # the baseline block, which keeps the degenerate single-tap model identical to the baseline.
        h = self.ln_1(x)
        if self.add:
            d, probs = self.shortcut_attn(h, self.ln_1(z), need_weights, rope)
            x = x + self.attn(h, rope) + d  # d == 0 at init: the baseline block
        else:
            a, probs = self.attn(h, self.ln_1(z), need_weights, rope)
            x = x + a
        return x + self.mlp(self.ln_2(x)), probs


class FeatureMapMLP(nn.Module):
    """f_l(h) = h + W2·gelu(W1·LN(h)); W2 starts at zero, so f_l starts as the identity."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln = make_norm(cfg)
        self.mlp = MLP(cfg.n_embd, cfg.d_feature, cfg.bias)  # gelu whatever model.mlp: the feature map is the paper's
        nn.init.zeros_(self.mlp.c_proj.weight)
        self.mlp.c_proj.is_zero_init = True

    def forward(self, h):
        return h + self.mlp(self.ln(h))


class FeatureMapLinear(nn.Module):
    """f_l(h) = h + W·h, W zero-initialised (identity at the start; weight decay pulls back towards identity)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        nn.init.zeros_(self.proj.weight)
        self.proj.is_zero_init = True

    def forward(self, h):
        return h + self.proj(h)


FEATURE_MAPS = {FeatureMap.mlp: FeatureMapMLP, FeatureMap.linear: FeatureMapLinear, FeatureMap.none: None}


def _variants() -> dict:
    from shortcut.variants import VARIANTS  # imported here: the variants build on this module's blocks

    return VARIANTS


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (it is read from the corpus)")
        self.cfg = cfg
        self.shortcut = cfg.arch == Arch.shortcut
        L = cfg.n_layer
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == PosEmb.learned:
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size)
        self.drop = nn.Dropout(cfg.dropout)
        # block i -> the taps it reads (the last shortcut_layers blocks), l <= i; {} for other archs
        self.block_taps = cfg.shortcut_taps() if self.shortcut else {}
        self.blocks = nn.ModuleList([ShortcutBlock(cfg, len(self.block_taps[i])) if i in self.block_taps
                                     else Block(cfg) for i in range(L)])
        if self.shortcut:
            self.taps = cfg.tap_layers()  # layers l in 0..L-1
            fmap = FEATURE_MAPS[cfg.feature_map]
            self.feature_maps = nn.ModuleList([fmap(cfg) for _ in self.taps]) if fmap else None
            self.depth_emb = nn.Parameter(torch.zeros(len(self.taps), cfg.n_embd)) if cfg.depth_embedding else None
        elif cfg.arch != Arch.baseline:  # its own parameters under its own name (denseformer.alphas.0, mudd....)
            self.add_module(str(cfg.arch), _variants()[cfg.arch](cfg))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        for name, m in self.named_modules():  # GPT-2: scale residual projections by depth (zero ones stay zero)
            if name.endswith("c_proj") and not getattr(m, "is_zero_init", False):
                nn.init.normal_(m.weight, mean=0.0, std=0.02 / math.sqrt(2 * L))

    @property
    def variant(self) -> nn.Module | None:
        """The module that runs the blocks its own way (shortcut/variants/), or None (baseline, shortcut)."""
        return None if self.cfg.arch in (Arch.baseline, Arch.shortcut) else getattr(self, str(self.cfg.arch))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            if not getattr(m, "is_zero_init", False):
                nn.init.normal_(m.weight, mean=0.0, std=getattr(m, "init_std", 0.02))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def embed(self, idx):
        """h_0 (B, T, C) before dropout, and the RoPE tables (None with learned positions)."""
        T = idx.size(1)
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
        if self.cfg.pos == PosEmb.learned:
            return self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)), None
        return self.wte(idx), self.rotary(T)

    def forward(self, idx, targets=None, return_attn: bool = False, per_head: bool = False, exits=()):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None, attention probabilities or None).

        With return_attn (shortcut only) the probabilities of the final layer over (tap, key position) come back
        head-averaged, (B, T queries, K taps, T keys), or per head with per_head, (B, nh, T, K, T).
        exits (training with model.exit_train): depths d whose early-exit losses join the full model's; the loss
        is then the mean over the full depth and those exits (the logits stay the full model's)."""
        x, rope = self.embed(idx)
        x = self.drop(x)  # h_0: (B, T, C)
        probs, states, feats = None, [x], {}
        if self.variant is not None:
            x = self.variant(x, self.blocks, rope)
        elif not self.shortcut:
            for block in self.blocks:
                x = block(x, rope)
                states.append(x)  # h_1 .. h_L (references only: no copies)
        else:
            x, states, all_probs = self._run_shortcut(x, rope, weights="final" if return_attn or per_head else "none",
                                                      feats=feats)
            probs = all_probs[-1]
            if probs is not None and not per_head:
                probs = probs.mean(dim=1)  # (B, T, K, T)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            ce = lambda z: F.cross_entropy(z.float().view(-1, z.size(-1)), targets.reshape(-1))  # noqa: E731
            loss = ce(logits)
            if exits:  # LayerSkip / CALM-style training: one set of weights serves every exit depth
                loss = (loss + sum(ce(self.exit_logits(states, d, rope, feats)) for d in exits)) / (1 + len(exits))
        return logits, loss, probs

    def exit_logits(self, states, d: int, rope=None, feats: dict | None = None):
        """The early exit at depth d from the states h_0 .. h_d (each (B, T, C)): logits (B, T, V).
        Baseline: the final norm and head on h_d. Shortcut: the final block with its query from h_d and its keys
        and values from the taps l <= d (their share of its tap bias), then the norm and head. At the full depth
        (d = L, or L-1 for the shortcut) this is the model's own output."""
        if self.shortcut:
            z = self.tap_stack(states, {} if feats is None else feats, [l for l in self.taps if l <= d])
            x, _ = self.blocks[-1](states[d], z, rope=rope)  # (B, T, C)
        else:
            x = states[d]
        return self.lm_head(self.ln_f(x))

    def _run_shortcut(self, x, rope, weights: str = "none", last: int | None = None, feats: dict | None = None):
        """The shortcut model's blocks 0..last-1 (default: all) on h_0 = x. Returns the output, the states h_0 ..
        h_{min(last, L-1)} and, per shortcut block run, its attention probabilities (B, nh, T, K_i, T), or None
        unless weights asks for them ("final": the final block's, "all": every shortcut block's).

        Tap l's keys and values come from z_l = f_l(h_l) + e_l, computed once and read by every shortcut block
        i >= l (block i reads the taps l <= i: a prefix of the sorted taps, so e_l and f_l are indexed alike)."""
        L = len(self.blocks)
        last = L if last is None else last
        states, probs = [x], []
        feats = {} if feats is None else feats  # tap l -> f_l(h_l), filled as the taps are first read
        for i in range(last):
            need = weights == "all" or (weights == "final" and i == L - 1)
            x, p = self.run_block(i, x, states, feats, rope, need)
            if i in self.block_taps:
                probs.append(p)
            states.append(x)
        return x, states[:L], probs  # h_0 .. h_{L-1} at most: the final block's output is no tap

    def run_block(self, i: int, x, states, feats: dict, rope=None, need_weights: bool = False):
        """Block i on its input x = h_i (B, T, C); a shortcut block reads its taps from states h_0 .. h_i (f_l
        cached in feats). Returns (h_{i+1}, its depth-and-context probabilities or None)."""
        block = self.blocks[i]
        if i not in self.block_taps:
            return block(x, rope), None
        return block(x, self.tap_stack(states, feats, self.block_taps[i]), need_weights=need_weights, rope=rope)

    def tap_stack(self, states, feats: dict, taps: list[int]):
        """z = f_l(h_l) + e_l (B, K_i, T, C) for the taps l of a shortcut block, from the states h_0.. (each
        (B, T, C)); feats caches f_l(h_l) across the blocks of one pass (taps are a prefix of the sorted taps, so
        f_l and e_l are indexed alike)."""
        for j, l in enumerate(taps):
            if l not in feats:
                feats[l] = self.feature_maps[j](states[l]) if self.feature_maps is not None else states[l]
        z = torch.stack([feats[l] for l in taps], dim=1)  # (B, K_i, T, C)
        if self.depth_emb is not None:
            z = z + self.depth_emb[None, :len(taps), None, :].to(z.dtype)
        return z

    def hidden_states(self, idx) -> list[torch.Tensor]:
        """h_0 .. h_{L-1}, each (B, T, C): the residual stream after the embeddings and after every block but the
        last (the inputs the final block reads, in both architectures). For a variant, the residual stream each
        block reads (DenseFormer: the averages; AttnRes: the attention sublayers' inputs; MUDD: the R stream)."""
        if self.variant is not None:
            x, rope = self.embed(idx)
            record = {}
            self.variant(x, self.blocks, rope, record)
            return record["states"]
        return self.run_to(idx, len(self.blocks) - 1)[0]

    def run_to(self, idx, depth: int):
        """Blocks 0..depth-1 on idx (baseline or shortcut): the states h_0 .. h_depth (each (B, T, C)), the RoPE
        tables and the tap features they used (what GPT.exit_logits reads for an exit at that depth)."""
        x, rope = self.embed(idx)
        states, feats = [x], {}
        for i in range(depth):
            x, _ = self.run_block(i, x, states, feats, rope)
            states.append(x)
        return states, rope, feats

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
            x, rope = self.embed(idx)
            _, _, probs = self._run_shortcut(x, rope, weights="all")  # per block: (B, nh, T, K_i, T)
            K = len(self.taps)
            mass = [F.pad(p.mean(dim=1).sum(dim=-1).float(), (0, K - p.size(3))) for p in probs]  # (B, T, K)
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


# ---------------------------------------------------------------------------------------------------------------
# Counting: parameters, FLOPs (matmul FLOPs, 2 per multiply-add, as torch.utils.flop_counter counts them).

def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters (tied head counted once) and non-embedding parameters (without token/position tables)."""
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    tables = model.wte.weight.numel() + (model.wpe.weight.numel() if cfg.pos == PosEmb.learned else 0)
    return {"params": total, "non_embedding_params": total - tables}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Analytic forward and training (3x forward) FLOPs per token at context length seq_len (default block_size).

    Attention is counted over the full T x T score matrix (what a dense kernel computes), like torchtitan's
    6N + 12·L·H·d_head·T. Each shortcut block i attends over |taps <= i|·T keys and runs its K/V projections on
    each of those taps (add mode: plus its self-attention); the feature maps run once per tap. A variant adds its
    own matmuls (variants' `extra_flops`); its weighted sums over depth, like norms, softmax, RoPE and the tap
    bias, are elementwise work the counter does not count. With model.exit_train, training adds the expected cost
    of the sampled early exit (probability exit_train, its depth uniform; forward and backward).
    """
    part = flop_parts(cfg, seq_len)
    fwd = sum(part["blocks"]) + len(part["fmap"]) * part["fmap_each"] + part["head"] + part["extra"]
    shallow = cfg.exit_depths()[:-1]
    exit_cost = sum(exit_flops(cfg, d, seq_len, fmaps=False) for d in shallow) / len(shallow) if shallow else 0
    return {"forward": fwd, "train": 3 * fwd + round(3 * cfg.exit_train * exit_cost)}


def flop_parts(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Forward FLOPs per token, part by part: "blocks" (block i's, in order), "fmap" (the taps, one feature map
    each) with "fmap_each", "head" (the tied output matmul), "extra" (a variant's own), "kv" (one position's keys
    and values through one attention: what a state copied upward costs a later reader)."""
    C, T, V, L = cfg.n_embd, seq_len or cfg.block_size, cfg.vocab_size, cfg.n_layer
    blocks = [_self_attention_flops(C, T) + _mlp_flops(cfg)] * L
    fmap_each, taps = 0, []
    if cfg.arch == Arch.shortcut:
        taps = cfg.tap_layers()
        fmap_each = {FeatureMap.mlp: 2 * 2 * C * cfg.d_feature, FeatureMap.linear: 2 * C * C,
                     FeatureMap.none: 0}[cfg.feature_map]
        for i, block_taps in cfg.shortcut_taps().items():
            blocks[i] = shortcut_block_flops(cfg, len(block_taps), T)
    extra = _variants()[cfg.arch].extra_flops(cfg) if cfg.arch not in (Arch.baseline, Arch.shortcut) else 0
    return {"blocks": blocks, "fmap": taps, "fmap_each": fmap_each, "head": 2 * C * V, "extra": extra,
            "kv": 2 * 2 * C * C}


def shortcut_block_flops(cfg: ModelConfig, n_taps: int, seq_len: int | None = None) -> int:
    """A shortcut block reading n_taps taps: q, k/v per tap, out; attention over n_taps·T keys; the MLP (add
    mode: plus the kept self-attention)."""
    C, T = cfg.n_embd, seq_len or cfg.block_size
    flops = 2 * (C * C + 2 * C * C * n_taps + C * C) + 2 * 2 * n_taps * T * C + _mlp_flops(cfg)
    if cfg.shortcut_mode == ShortcutMode.add:
        flops += _self_attention_flops(C, T)
    return flops


def _self_attention_flops(C: int, T: int) -> int:
    return 2 * (3 * C * C + C * C) + 2 * 2 * T * C  # qkv, out proj; q·k and p·v over T keys


def _mlp_flops(cfg: ModelConfig) -> int:
    return 2 * (3 if cfg.mlp == MLPKind.swiglu else 2) * cfg.n_embd * cfg.d_mlp  # gelu: C->H->C; swiglu: C->2H, H->C


def exit_flops(cfg: ModelConfig, d: int, seq_len: int | None = None, fmaps: bool = True) -> int:
    """Forward FLOPs per token of the early exit at depth d, on top of the blocks before it: baseline the head;
    shortcut the final block over the taps <= d, their feature maps (fmaps=False: already computed, as in
    training, where the full pass made them) and the head. At the full depth, blocks 0..d-1 plus this equal
    flops_per_token's forward."""
    part = flop_parts(cfg, seq_len)
    if cfg.arch != Arch.shortcut:
        return part["head"]
    n = sum(1 for l in part["fmap"] if l <= d)
    return shortcut_block_flops(cfg, n, seq_len) + fmaps * n * part["fmap_each"] + part["head"]


def match_params(cfg: ModelConfig) -> ModelConfig:
    """Grow cfg (a baseline, say) until its parameter count matches cfg.match_params' arch with the same sizes.

    width: the largest n_embd (a multiple of n_head) that stays under the target; depth: the largest n_layer that
    does. Then the MLP hidden width takes up the rest, which is fine-grained enough to land within 0.1%.
    """
    if cfg.match_params is None:
        return cfg
    target = param_counts(replace(cfg, arch=cfg.match_params, match_params=None))["params"]
    base = replace(cfg, match_params=None)
    count = lambda c: param_counts(c)["params"]  # noqa: E731
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
