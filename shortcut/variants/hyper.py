"""Hyper-Connections (Zhu et al., ICLR 2025, arXiv 2409.19606): n residual streams, each sublayer reading a learned
mix of them (width connection) and writing its output back to each with a learned weight (depth connection).

Section 2.1 (static, SHC): the state is H (n x C), one row per stream; layer k has the HC matrix
[[0, B], [A_m, A_r]] with A_m (n x 1), A_r (n x n), B (1 x n), and computes h = A_mᵀH (its input), then
Ĥ = Bᵀ·F(h) + A_rᵀH. Section 2.2 (dynamic, DHC): with H̄ = norm(H), per stream and per position,
  A_m(H) = s_α·tanh(H̄ W_m) + A_m,   A_r(H) = s_α·tanh(H̄ W_r) + A_r,   B(H) = s_β·tanh(H̄ W_β)ᵀ + B,
W_m (C x 1), W_r (C x n), W_β (C x 1). Section 2.3: W = 0, A_m = e_{k mod n}
(layer k reads stream k mod n), A_r = I, B = 1: with every stream a copy of the embedding, each stream stays the
pre-norm residual stream, so the model starts as the baseline (tested to 1e-5: static, dynamic, n = 1, 3, 4).
s_α = s_β = 0.01 at the start (chosen: small, as the paper asks; the value of lucidrains/hyper-connections).

Chosen here: the norm in H̄ is the model's own kind (model.norm; the paper's LayerNorm by default); one W
(C x (n+2)) holds W_m, W_r and W_β, one matmul, zero-initialised and decayed towards that start like any matrix;
the static A and B are stored flat, so no weight decay pulls them from the identity. model.hc_streams=1 is the
paper's HC x1 ablation: learned scalars on the one residual (exactly the baseline when static and at init). The
streams' start and merge are shortcut/variants/streams.py's. Counted FLOPs per token and sublayer: the width mix
2·(n+1)·n·C and, dynamic, the projection 2·n·C·(n+2); the tanh, the scales and the depth write are elementwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from shortcut.blocks import Linear, make_norm
from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant
from shortcut.variants.streams import StreamVariant

SCALE_INIT = 0.01  # s_α, s_β at initialisation


class HyperConnection(nn.Module):
    """Sublayer k's connection: H (B, T, n, C) -> (mix (…, n+1, n) = [A_m | A_r]ᵀ, post (…, n) = B)."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        n = self.n = cfg.hc_streams
        A = torch.zeros(n, n + 1)
        A[k % n, 0] = 1.0  # A_m = e_{k mod n}
        A[:, 1:] = torch.eye(n)  # A_r = I
        self.static_alpha = nn.Parameter(A.flatten())  # [A_m | A_r] (n x (n+1)), flat
        self.static_beta = nn.Parameter(torch.ones(n))  # B
        self.dynamic = cfg.hc_dynamic
        if self.dynamic:
            self.norm = make_norm(cfg)
            self.proj = Linear(cfg.n_embd, n + 2, bias=False, init="zero")  # [W_m | W_r | W_β]
            self.scale_alpha = nn.Parameter(torch.full((1,), SCALE_INIT))  # s_α
            self.scale_beta = nn.Parameter(torch.full((1,), SCALE_INIT))  # s_β

    def forward(self, H):
        n = self.n
        alpha, beta = self.static_alpha.view(n, n + 1), self.static_beta  # (n, n+1), (n,)
        if self.dynamic:
            t = torch.tanh(self.proj(self.norm(H)))  # (B, T, n, n+2)
            alpha = self.scale_alpha * t[..., :n + 1] + alpha  # (B, T, n, n+1): A_m(H) | A_r(H)
            beta = self.scale_beta * t[..., n + 1] + beta  # (B, T, n): B(H)
        return alpha.transpose(-1, -2), beta  # row 0: A_mᵀ; rows 1..n: A_rᵀ


@register_variant(Arch.hyper)
class HyperConnections(StreamVariant):
    connection = HyperConnection

    @staticmethod
    def dynamic_width(n: int) -> int:
        return n + 2  # H̄ [W_m | W_r | W_β]
