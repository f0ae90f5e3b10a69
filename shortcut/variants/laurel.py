"""LAuReL, the learned augmented residual layer (Menghani, Kumar & Kumar, ICML 2025, arXiv 2411.07501): every
residual connection x_{i+1} = f(x_i) + x_i becomes x_{i+1} = alpha_i·f(x_i) + g_i(x_i, x_{i-1}, ..., x_0).

Section 2's versions (model.laurel), alpha_i, beta_i, gamma_ij learned scalars, A_i: C -> r and B_i: r -> C linear
maps of rank r = model.laurel_rank:
  rw, residual weights:     x_{i+1} = alpha_i·f(x_i) + beta_i·x_i
  lr, low rank (with RW):   x_{i+1} = alpha_i·f(x_i) + beta_i·(x_i + B_i·A_i·x_i)
  pa, previous activations: x_{i+1} = alpha_i·f(x_i) + beta_i·x_i + sum_{j<i} gamma_ij·h_i(x_j),  h_i = B_i·A_i
      computed as h_i(sum_j gamma_ij·x_j): h_i is linear, so it is the same sum through one low-rank map.
Each residual connection is a "layer" i: the attention sublayer f = Attn(LN_1(x)) and the MLP sublayer
f = MLP(LN_2(x)) of every block (2L of them; x_0 the embeddings, x_i the residual stream sublayer i reads).

Chosen here, where the paper leaves it open: LAuReL on every residual connection, attention's and MLP's alike;
alpha = beta = 1 and B_i = 0 at the start (LoRA's zero-initialised up-projection), so every mode starts as the
baseline exactly, with A_i ~ N(0, 0.02) like the project's other projections and no biases; gamma_ij = 1/i (the
mean of the earlier activations, so B_i's first gradients are of one activation's size); the scalars are raw
(unnormalised) and stored flat, so no weight decay pulls them off the residual; pa reads every earlier activation
(no window), its first sublayer none (so it has no h_0). FLOPs: the low-rank maps, 2·2·C·r per map per token; the
scalar-weighted sums are elementwise (0 in the counts, as the counter counts them).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from shortcut.blocks import Linear
from shortcut.config import Arch, LaurelMode, ModelConfig
from shortcut.variants.common import register_variant, weighted_sum


class LowRank(nn.Module):
    """h(x) = B·A·x, rank r, B zero-initialised (h = 0 at the start)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.a = Linear(cfg.n_embd, cfg.laurel_rank, bias=False)  # A: C -> r
        self.b = Linear(cfg.laurel_rank, cfg.n_embd, bias=False, init="zero")  # B: r -> C

    def forward(self, x):
        return self.b(self.a(x))


def _maps(cfg: ModelConfig) -> int:
    """Low-rank maps: one per residual connection (lr), one per connection with an earlier activation (pa)."""
    n = 2 * cfg.n_layer
    return {LaurelMode.rw: 0, LaurelMode.lr: n, LaurelMode.pa: n - 1}[cfg.laurel]


@register_variant(Arch.laurel)
class LAuReL(nn.Module):
    kind = None  # scales and maps residuals; no weights over layers for the audit
    caches = True  # every g is per position: decoding with the KV cache composes

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = 2 * cfg.n_layer  # residual connections
        self.mode = cfg.laurel
        self.alphas = nn.Parameter(torch.ones(n))  # alpha_i
        self.betas = nn.Parameter(torch.ones(n))  # beta_i
        self.maps = nn.ModuleList([LowRank(cfg) for _ in range(_maps(cfg))])
        if self.mode == LaurelMode.pa:  # gamma_ij for j < i, flat: i(i-1)/2 before connection i's
            self.gammas = nn.Parameter(torch.cat([torch.full((i,), 1.0 / i) for i in range(1, n)]))

    @staticmethod
    def extra_flops(cfg: ModelConfig) -> int:
        return _maps(cfg) * 2 * 2 * cfg.n_embd * cfg.laurel_rank  # A then B, per map

    def residual(self, i: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """g_i: connection i's residual from the activations xs = [x_0, ..., x_i] (B, n, C)."""
        x, beta = xs[-1], self.betas[i].to(xs[-1].dtype)
        if self.mode == LaurelMode.rw:
            return beta * x
        if self.mode == LaurelMode.lr:
            return beta * (x + self.maps[i](x))
        if i == 0:  # pa: no earlier activation
            return beta * x
        start = i * (i - 1) // 2
        earlier = weighted_sum(self.gammas[start:start + i], xs[:-1])  # sum_{j<i} gamma_ij x_j
        return beta * x + self.maps[i - 1](earlier)

    def forward(self, x, blocks, rope, record: dict | None = None, cache=None):
        """x: (B, n, C) embeddings at the cache's next positions (0.. without one); cache: the blocks' BlockCaches."""
        xs, states = [x], []  # x_0 .. x_i; the stream each block reads
        for b, block in enumerate(blocks):
            states.append(x)
            for s in range(2):
                i = 2 * b + s
                f = block.attn_branch(x, rope, None if cache is None else cache[b]) if s == 0 else block.mlp_branch(x)
                x = self.alphas[i].to(x.dtype) * f + self.residual(i, xs)  # x_{i+1}
                xs.append(x)
        if record is not None:
            record["states"] = states
        return x
