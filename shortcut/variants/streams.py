"""n residual streams, what Hyper-Connections (hyper.py) and mHC (mhc.py) share: the embedding copied into n streams,
every sublayer read from and written back to them through its connection, the streams merged for the head.

Both papers treat each attention and each MLP sublayer as a layer with its own connection (2L of them, k = 2·block +
{0: attention, 1: MLP}); the sublayer itself is the baseline's, pre-norm inside: attn(norm(h)) or mlp(norm(h)).
A connection maps the state H (B, T, n, C) to
  mix (..., n+1, n): row 0 the weights of the n streams in the sublayer's input h = mix[0]·H, rows 1..n the weights
                     of the n old streams in each new one (the residual mix; static (n+1, n) or per position);
  post (..., n):     the weight of the sublayer's output F(h) in each new stream,
and the update is H <- mix[1:]·H + post ⊗ F(h): HC's Ĥ = Bᵀ·F(A_mᵀH) + A_rᵀH (its Section 2.1) and mHC's
x_{l+1} = H_res·x_l + H_postᵀ·F(H_pre·x_l) (its Sections 1 and 3).

Chosen here (neither paper fixes them for a decoder with a final norm; both papers start from n copies of the
embedding, as here): the head reads the *mean* of the streams, the HC paper's sum divided by n. The final norm makes
the two the same function up to its eps, and the mean is exactly the baseline's residual at initialisation (the sum,
through LayerNorm's eps, is ~1% off it at GPT-2's init scale). The audit's states (GPT.hidden_states) are the stream
means before each block. Counted FLOPs: the width mix, a (n+1) x n matmul per position, 2·(n+1)·n·C per token and
sublayer; the depth write post ⊗ F(h) is an outer product, elementwise (n·C per token and sublayer), like the norms.
Decoding composes with the KV cache: every connection acts per position, so each attention caches its input's keys
and values as the baseline's does (tested: cached logits equal a full forward).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from shortcut.config import ModelConfig


def mix_flops(cfg: ModelConfig) -> int:
    """The width mixes' matmul FLOPs per token, all 2L sublayers: (n+1) x n weights on (n, C) streams each."""
    n = cfg.hc_streams
    return 2 * cfg.n_layer * 2 * (n + 1) * n * cfg.n_embd


def run_streams(connections, x, blocks, rope, n: int, cache=None, record: dict | None = None):
    """The blocks over n streams started from x (B, T, C); returns the streams' mean (B, T, C), what the final norm
    and head read. connections: 2L modules, H (B, T, n, C) -> (mix, post); cache: the blocks' BlockCaches, each at the
    cache's next position (decoding; GPT._variant_pass hands them over)."""
    H = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.size(-1))  # (B, T, n, C): n copies of h_0
    states = []
    for k, connection in enumerate(connections):
        b, s = divmod(k, 2)
        mix, post = connection(H)  # (..., n+1, n), (..., n)
        mixed = torch.matmul(mix.to(H.dtype), H)  # (B, T, n+1, C)
        h, rest = mixed[..., 0, :], mixed[..., 1:, :]  # the sublayer's input (B, T, C); the mixed streams
        if s == 0:
            states.append(H.mean(dim=-2))
            out = blocks[b].attn_branch(h, rope, None if cache is None else cache[b])  # (B, T, C)
        else:
            out = blocks[b].mlp_branch(h)
        H = torch.addcmul(rest, post.to(H.dtype).unsqueeze(-1), out.unsqueeze(-2))  # (B, T, n, C)
    if record is not None:
        record["states"] = states
    return H.mean(dim=-2)


class StreamVariant(nn.Module):
    """What hyper and mhc share: 2L connections of the class `connection` around the blocks (run_streams), the
    stream mixes' FLOPs plus, when dynamic, n·C x `dynamic_width(n)` projection FLOPs per sublayer."""
    kind = None  # it weighs streams, not earlier layers' outputs: no layer weights for the audit
    caches = True  # every connection acts per position: decoding keeps the KV cache
    connection: type[nn.Module]

    @staticmethod
    def dynamic_width(n: int) -> int:
        raise NotImplementedError

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.hc_streams
        self.connections = nn.ModuleList([self.connection(cfg, k) for k in range(2 * cfg.n_layer)])

    @classmethod
    def extra_flops(cls, cfg: ModelConfig) -> int:
        n, C = cfg.hc_streams, cfg.n_embd
        dynamic = 2 * cfg.n_layer * 2 * n * C * cls.dynamic_width(n) if cfg.hc_dynamic else 0
        return mix_flops(cfg) + dynamic

    def forward(self, x, blocks, rope, record: dict | None = None, cache=None):
        return run_streams(self.connections, x, blocks, rope, self.n, cache, record)
