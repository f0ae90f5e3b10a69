"""Value residual learning: ResFormer (Zhou et al., ACL 2025, arXiv 2410.17897).

Section 3: attention in layer n >= 2 uses U_n = A_n (lambda_{n,1} V_n + lambda_{n,2} V_1), where A_n is layer n's
own attention pattern, V_n its values and V_1 the first layer's values (before attention); layer 1 is unchanged.
The hidden-state residuals stay. The paper's ResFormer fixes lambda = 1/2; its learnable variant learns both.
Chosen: learned per layer, initialised at (1 - model.value_residual_init, model.value_residual_init), default
(1/2, 1/2), the paper's ResFormer at the start (so not the baseline's function: the paper does not start there;
value_residual_init=0 does). Two scalars per layer, not decayed (vectors).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant


@register_variant(Arch.value_residual)
class ValueResidual(nn.Module):
    kind = None  # weighs values, not layers' outputs: the audit reports its lambdas instead

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        lam = cfg.value_residual_init
        self.lambdas = nn.ParameterList([nn.Parameter(torch.tensor([1.0 - lam, lam]))
                                         for _ in range(cfg.n_layer - 1)])  # (own V_n, first V_1) for n = 2..L

    @staticmethod
    def extra_flops(cfg: ModelConfig) -> int:
        return 0  # a scalar mix of two value tensors: elementwise

    def forward(self, x, blocks, rope, record: dict | None = None):
        states, v1 = [x], None
        for n, block in enumerate(blocks):
            q, k, v = block.attn.project(block.ln_1(x), rope=rope)  # 3 x (B, nh, T, hs)
            if v1 is None:
                v1 = v  # V_1
            else:
                lam = self.lambdas[n - 1]
                v = lam[0] * v + lam[1] * v1  # lambda_{n,1} V_n + lambda_{n,2} V_1
            x = x + block.attn.attend(q, k, v)
            x = x + block.mlp_branch(x)
            if n < len(blocks) - 1:
                states.append(x)
        if record is not None:
            record["states"] = states
        return x
