"""Incremental decoding with a KV cache, for the baseline and the shortcut model.

Each new token costs one pass through the blocks at its own position: every block's attention reads the keys and
values it cached for earlier positions. The shortcut's final block caches, per tap, the keys and values of
f_l(h_l) + e_l at every earlier position, so its depth-and-context attention reads K·t cached entries.

The window: a model sees at most block_size tokens (learned positions end there). When the window is full, the cache
is rebuilt from the last block_size // 2 tokens (positions start again at 0), so every token is predicted from at
least block_size // 2 tokens of context, and the cached logits always equal a full forward pass over the tokens
since the last rebuild (tested at every step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shortcut.config import Arch, PosEmb
from shortcut.model import GPT, apply_rope


def supports_cache(model: GPT) -> bool:
    """The baseline and the shortcut (the variants in shortcut/variants/ decode with a full forward instead)."""
    cfg = model.cfg
    return cfg.arch == Arch.baseline or (cfg.arch == Arch.shortcut and _plain_shortcut(model))


def _plain_shortcut(model: GPT) -> bool:
    cfg = model.cfg
    return (getattr(cfg, "shortcut_mode", "replace") == "replace" and getattr(cfg, "tap_bias", "none") == "none"
            and getattr(cfg, "shortcut_layers", 1) == 1)


def _attend(q, k, v, offset: int):
    """q (B, nh, n, hs) at positions offset.., k, v (B, nh, offset + n, hs): causal attention."""
    n, total = q.size(2), k.size(2)
    if n == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one query sees every cached key
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.arange(total, device=q.device)[None, :] <= (offset + torch.arange(n, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCacheDecoder:
    """start(prompt) -> logits of the next token; push(ids) -> the next logits, one token per row at a time."""

    def __init__(self, model: GPT):
        if not supports_cache(model):
            raise ValueError(f"no KV cache for {model.cfg.arch} with these settings")
        self.model, self.T = model, model.cfg.block_size
        self.seq = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seq = prompt[:, -self.T:]
        return self._prefill()

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> torch.Tensor:
        if self.seq.size(1) == self.T:  # the window is full: keep the last T // 2 tokens and rebuild
            self.seq = torch.cat([self.seq, ids[:, None]], dim=1)[:, -(self.T // 2):]
            return self._prefill()
        self.seq = torch.cat([self.seq, ids[:, None]], dim=1)
        return self._forward(ids[:, None], self.seq.size(1) - 1)

    def _prefill(self) -> torch.Tensor:
        B, C, m = self.seq.size(0), self.model.cfg.n_embd, self.model
        nh = m.cfg.n_head
        shape = (B, nh, self.T, C // nh)
        dtype = m.wte.weight.dtype
        n_std = len(m.blocks) - (1 if m.shortcut else 0)
        self.k = [torch.zeros(shape, device=self.seq.device, dtype=dtype) for _ in range(n_std)]
        self.v = [torch.zeros(shape, device=self.seq.device, dtype=dtype) for _ in range(n_std)]
        if m.shortcut:
            K = len(m.taps)
            self.kz = torch.zeros(B, nh, K, self.T, C // nh, device=self.seq.device, dtype=dtype)
            self.vz = torch.zeros_like(self.kz)
        return self._forward(self.seq, 0)

    def _forward(self, ids: torch.Tensor, p: int) -> torch.Tensor:
        """Tokens ids (B, n) at positions p..p+n-1 through the model, filling the caches; the last token's logits."""
        m, n = self.model, ids.size(1)
        x = m.wte(ids)
        rope = None
        if m.cfg.pos == PosEmb.learned:
            x = x + m.wpe(torch.arange(p, p + n, device=ids.device))
        else:
            rope = (m.rotary.cos[p:p + n], m.rotary.sin[p:p + n])
        hs = [x]  # h_0 .. at the new positions
        blocks = m.blocks[:-1] if m.shortcut else m.blocks
        for i, block in enumerate(blocks):
            q, k, v = block.attn.project(block.ln_1(x), rope=rope)  # 3 x (B, nh, n, hs)
            self.k[i][:, :, p:p + n], self.v[i][:, :, p:p + n] = k, v
            y = _attend(q, self.k[i][:, :, :p + n], self.v[i][:, :, :p + n], p)  # (B, nh, n, hs)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(x.shape))
            x = x + block.mlp(block.ln_2(x))
            hs.append(x)
        if m.shortcut:
            x = self._final_block(hs, x, p, n, rope)
        return m.lm_head(m.ln_f(x[:, -1]))  # (B, V)

    def _final_block(self, hs, x, p: int, n: int, rope):
        """The shortcut's final block at the new positions: depth-and-context attention over the cached taps."""
        m = self.model
        block, attn = m.blocks[-1], m.blocks[-1].attn
        feats = [hs[l] for l in m.taps]  # K x (B, n, C)
        if m.feature_maps is not None:
            feats = [f(h) for f, h in zip(m.feature_maps, feats)]
        z = torch.stack(feats, dim=1)  # (B, K, n, C)
        if m.depth_emb is not None:
            z = z + m.depth_emb[None, :, None, :].to(z.dtype)
        B, K, _, C = z.shape
        nh = attn.n_head
        w_q, w_kv = attn.c_attn.weight.split([C, 2 * C], dim=0)
        b_q, b_kv = attn.c_attn.bias.split([C, 2 * C]) if attn.c_attn.bias is not None else (None, None)
        q = attn.heads(F.linear(block.ln_1(x), w_q, b_q))  # (B, nh, n, hs)
        k, v = F.linear(block.ln_1(z), w_kv, b_kv).split(C, dim=3)  # 2 x (B, K, n, C)
        k, v = (t.view(B, K, n, nh, C // nh).permute(0, 3, 1, 2, 4) for t in (k, v))  # 2 x (B, nh, K, n, hs)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        self.kz[:, :, :, p:p + n], self.vz[:, :, :, p:p + n] = k, v
        keys = self.kz[:, :, :, :p + n].flatten(2, 3)  # (B, nh, K*(p+n), hs), tap-major
        values = self.vz[:, :, :, :p + n].flatten(2, 3)
        seen = torch.arange(p + n, device=x.device)[None, :] <= (p + torch.arange(n, device=x.device))[:, None]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=seen.repeat(1, K))  # (B, nh, n, hs)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, n, C))
        return x + block.mlp(block.ln_2(x))
