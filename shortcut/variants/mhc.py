"""mHC, manifold-constrained Hyper-Connections (Xie et al., DeepSeek, arXiv 2512.24880): Hyper-Connections whose
stream mix is projected onto the doubly stochastic matrices, so that its product over depth stays bounded.

HC's form (Sections 1 and 3): x_{l+1} = H_res·x_l + H_postᵀ·F(H_pre·x_l), x_l (n x C) the n streams, H_pre,
H_post (1 x n), H_res (n x n), which Section 4.1 makes doubly stochastic. Section 4.2, per position, from the
flattened state x⃗ = vec(x_l) (1 x nC):
  x̃ = RMSNorm(x⃗),   H̃_pre = α_pre·(x̃ φ_pre) + b_pre,   H̃_post = α_post·(x̃ φ_post) + b_post,
  H̃_res = α_res·mat(x̃ φ_res) + b_res,   H_pre = σ(H̃_pre),   H_post = 2σ(H̃_post),   H_res = SK(H̃_res),
SK: Sinkhorn-Knopp from M = exp(H̃_res), alternately scaling columns and rows to sum 1, t_max = 20 iterations
(model.mhc_sinkhorn_iters). After them H_res is non-negative, its rows sum to 1 to float precision (the last
scaling) and its columns within 1e-4 while the logits are moderate (tested); logits of spread ~2 need more iterations
(measured in docs/models.md). model.hc_dynamic=false keeps the biases b alone.

Chosen here (the paper says the gating factors α start small and leaves the rest to its code): α = 0.01 and φ = 0,
HC's start, so at initialisation every H is its bias's image, the same at every position:
  H_res = SK(b_res = I) = ((e-1)·I + J) / (e+n-1): NOT the identity (0.475 on the diagonal, 0.175 off it for n = 4;
          J the all-ones matrix; a constant-diagonal matrix is doubly stochastic after one scaling);
  H_pre = 3/4 on stream k mod n and 1/(4(n-1)) on the others (sublayer k; they sum to 1, and reading mostly one
          stream breaks the streams' symmetry as HC's one-hot A_m does: with equal weights they never diverge);
  H_post = 2σ(0) = 1 on every stream.
With n copies of the embedding and rows of H_res summing to 1, equal streams stay equal and each is the pre-norm
residual stream: mHC starts as the baseline's function (tested to 1e-5), although H_res is not the identity. The
RMSNorm has no gain (it would scale φ's rows, which learn it; the paper's kernel divides x⃗φ by the rms); its eps is
1e-6; SK runs in float32; φ is one matrix (nC x (2n + n²)), decayed towards 0 like any matrix, the biases are flat.
Counted FLOPs per token and sublayer: the width mix [H_pre; H_res] 2·(n+1)·n·C (shortcut/variants/streams.py) and,
dynamic, x̃φ 2·nC·(2n + n²); σ, SK and the depth write are elementwise (SK: about 4n²·t_max per sublayer and token).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shortcut.blocks import Linear
from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant
from shortcut.variants.streams import StreamVariant

ALPHA_INIT = 0.01  # α_pre, α_post, α_res at initialisation
READ = 0.75  # H_pre's weight on stream k mod n at initialisation (the others share the rest)
EPS = 1e-6


def sinkhorn(logits, iters: int):
    """Sinkhorn-Knopp: exp(logits) (..., n, n) scaled, column sums then row sums to 1, iters times (float32)."""
    m = (logits.float() - logits.float().amax(dim=(-2, -1), keepdim=True).detach()).exp()  # the max: no overflow
    for _ in range(iters):  # a multiply by reciprocals: ~30% faster than dividing on a CPU, forward and backward
        m = m * m.sum(dim=-2, keepdim=True).reciprocal()  # columns
        m = m * m.sum(dim=-1, keepdim=True).reciprocal()  # rows
    return m


class MHCConnection(nn.Module):
    """Sublayer k's connection: H (B, T, n, C) -> (mix (…, n+1, n) = [H_pre; H_res], post (…, n) = H_post)."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        n = self.n = cfg.hc_streams
        self.iters = cfg.mhc_sinkhorn_iters
        pre = torch.full((n,), (1 - READ) / (n - 1))
        pre[k % n] = READ
        self.b_pre = nn.Parameter(torch.logit(pre))  # σ(b_pre) = pre
        self.b_post = nn.Parameter(torch.zeros(n))  # 2σ(0) = 1
        self.b_res = nn.Parameter(torch.eye(n).flatten())  # identity logits, flat
        self.dynamic = cfg.hc_dynamic
        if self.dynamic:
            self.phi = Linear(n * cfg.n_embd, 2 * n + n * n, bias=False, init="zero")  # [φ_pre | φ_post | φ_res]
            self.alpha = nn.Parameter(torch.full((3,), ALPHA_INIT))  # α_pre, α_post, α_res

    def coefficients(self, H):
        """H_pre (…, n), H_post (…, n), H_res (…, n, n): static (no leading dims) or per position (B, T, …)."""
        n = self.n
        b = torch.cat([self.b_pre, self.b_post, self.b_res])  # (2n + n²,)
        if self.dynamic:
            x = F.rms_norm(H.flatten(-2), (n * H.size(-1),), eps=EPS)  # x̃ (B, T, nC)
            alpha = self.alpha.repeat_interleave(torch.tensor([n, n, n * n], device=b.device))  # (2n + n²,)
            b = alpha * self.phi(x) + b  # (B, T, 2n + n²)
        pre, post, res = b.split([n, n, n * n], dim=-1)
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res.unflatten(-1, (n, n)), self.iters)

    def forward(self, H):
        pre, post, res = self.coefficients(H)
        return torch.cat([pre.unsqueeze(-2).to(res.dtype), res], dim=-2), post  # (…, n+1, n), (…, n)


@register_variant(Arch.mhc)
class ManifoldHyperConnections(StreamVariant):
    connection = MHCConnection

    @staticmethod
    def dynamic_width(n: int) -> int:
        return 2 * n + n * n  # x̃ φ
