"""Incremental decoding with a KV cache, for the baseline and the shortcut model (every mode, tap bias and number of
shortcut blocks; the variants in shortcut/variants/ decode with a full forward instead).

Each new token costs one pass through the blocks at its own position. A block with self-attention (every block but
a replace-mode shortcut block) caches its keys and values (B, nh, T, hs). A shortcut block i caches, with its own
projections, the keys and values of its taps' f_l(h_l) + e_l (B, nh, K_i, T, hs), so its depth-and-context
attention reads K_i·t cached entries (plus the tap bias on every key of tap l, as in the reference).

The window: a model sees at most block_size tokens (learned positions end there). When the window is full, the cache
is rebuilt from the last block_size // 2 tokens (positions start again at 0), so every token is predicted from at
least block_size // 2 tokens of context, and the cached logits always equal a full forward pass over the tokens
since the last rebuild (tested at every step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shortcut.attention import tap_bias_mask
from shortcut.config import Arch, PosEmb
from shortcut.model import GPT, DepthContextAttention


def supports_cache(model: GPT) -> bool:
    """The baseline and the shortcut (the variants in shortcut/variants/ decode with a full forward instead)."""
    return model.cfg.arch in (Arch.baseline, Arch.shortcut)


def _visible(p: int, n: int, device) -> torch.Tensor:
    """(n, p + n) bool: query p + j sees key position s iff s <= p + j."""
    return torch.arange(p + n, device=device)[None, :] <= (p + torch.arange(n, device=device))[:, None]


def _attend(q, k, v, offset: int):
    """q (B, nh, n, hs) at positions offset.., k, v (B, nh, offset + n, hs): causal attention."""
    n = q.size(2)
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one query sees every cached key
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(offset, n, q.device))


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
        self.seq = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seq = prompt[:, -self.T:]
        return self._prefill()

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> torch.Tensor:
        self.seq, rebuilt = slide(self.seq, ids, self.T)
        if rebuilt:
            return self._prefill()
        return self._forward(ids[:, None], self.seq.size(1) - 1)

    def _prefill(self) -> torch.Tensor:
        m = self.model
        nh = m.cfg.n_head

        def empty(*taps):  # (B, nh, [K,] T, hs)
            return torch.zeros(self.seq.size(0), nh, *taps, self.T, m.cfg.n_embd // nh, device=self.seq.device,
                               dtype=m.wte.weight.dtype)

        # block i -> (k, v) (B, nh, T, hs) of its self-attention; shortcut block i -> (k, v) (B, nh, K_i, T, hs)
        self.kv = {i: (empty(), empty()) for i, block in enumerate(m.blocks)
                   if not isinstance(block.attn, DepthContextAttention)}
        self.kv_taps = {i: (empty(len(taps)), empty(len(taps))) for i, taps in m.block_taps.items()}
        return self._forward(self.seq, 0)

    def _forward(self, ids: torch.Tensor, p: int) -> torch.Tensor:
        """Tokens ids (B, n) at positions p..p+n-1 through the model, filling the caches; the last token's logits.
        The same sums in the same order as ShortcutBlock.forward / Block.forward."""
        m, n = self.model, ids.size(1)
        x = m.wte(ids)  # (B, n, C)
        rope = None
        if m.cfg.pos == PosEmb.learned:
            x = x + m.wpe(torch.arange(p, p + n, device=ids.device))
        else:
            rope = (m.rotary.cos[p:p + n], m.rotary.sin[p:p + n])
        states, feats = [x], {}  # h_0 .. and f_l(h_l), at the new positions only
        for i, block in enumerate(m.blocks):
            h = block.ln_1(x)
            if i in self.kv:  # self-attention: every block but a replace-mode shortcut block
                x = x + self._self_attention(i, block.attn, h, p, rope)
            if i in self.kv_taps:
                z = m.tap_stack(states, feats, m.block_taps[i])  # (B, K_i, n, C)
                attn = block.shortcut_attn if block.add else block.attn
                x = x + self._depth_context(i, attn, h, block.ln_1(z), p, rope)
            x = x + block.mlp(block.ln_2(x))
            states.append(x)
        return m.lm_head(m.ln_f(x[:, -1]))  # (B, V)

    def _self_attention(self, i: int, attn, h, p: int, rope):
        """h (B, n, C) normalised at positions p..: causal self-attention over block i's cache. Returns (B, n, C)."""
        q, k, v = attn.project(h, rope=rope)  # 3 x (B, nh, n, hs)
        t = p + q.size(2)
        ks, vs = self.kv[i]
        ks[:, :, p:t], vs[:, :, p:t] = k, v
        y = _attend(q, ks[:, :, :t], vs[:, :, :t], p)  # (B, nh, n, hs)
        return attn.c_proj(y.transpose(1, 2).reshape(h.shape))

    def _depth_context(self, i: int, attn: DepthContextAttention, h, z, p: int, rope):
        """h (B, n, C) and z (B, K_i, n, C) normalised at positions p..: shortcut block i's attention over its
        cached (tap, position) keys, laid out tap-major as in attention.masked_depth_context_attention."""
        q, k, v = attn.project_taps(h, z, rope)  # (B, nh, n, hs), 2 x (B, nh, K_i, n, hs)
        n, K = q.size(2), k.size(2)
        t = p + n
        ks, vs = self.kv_taps[i]
        ks[:, :, :, p:t], vs[:, :, :, p:t] = k, v
        mask = _visible(p, n, q.device).repeat(1, K)  # (n, K*t): every tap, causal in position
        bias = attn.bias(K)  # (nh, K_i) or None
        if bias is not None:
            mask = tap_bias_mask(mask, bias, t).to(q.dtype)  # (nh, n, K*t): b[h, l] or -inf
        y = F.scaled_dot_product_attention(q, ks[:, :, :, :t].flatten(2, 3), vs[:, :, :, :t].flatten(2, 3),
                                           attn_mask=mask)  # (B, nh, n, hs)
        return attn.c_proj(y.transpose(1, 2).reshape(h.shape))
