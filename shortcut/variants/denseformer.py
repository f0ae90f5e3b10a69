"""DenseFormer: a Depth-Weighted Average after every block (Pagliardini et al., ICML 2024, arXiv 2402.02622).

Eq. (DWA), Section 3: with X_0 the embedding output and X_i = B_i(Y_{i-1}) the output of block i, the input of
block i+1 is Y_i = sum_{j=0..i} alpha_{i,j} X_j: every earlier output, with one learned scalar each, initialised
to alpha_{i,i} = 1 and 0 elsewhere, so the model starts as the baseline. Section 4 (efficiency): dilation k keeps
only the sources with (i - j) % k == 0 (model.dwa_dilation); period p keeps a DWA after every p-th block only
(model.dwa_period); elsewhere Y_i = X_i. Chosen here: the alphas are vectors, so no weight decay (this project
decays matrices only; decay would pull the averages towards 0, away from the identity).

ConnectLast: the paper's "connect to last" ablation (Section 5): a single DWA, after the last block, over X_0..X_L
(dilation and period do not apply), initialised to the identity (chosen: exactly 0 elsewhere, not a small epsilon).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant, weighted_sum, weights_record


@register_variant(Arch.denseformer)
class DenseFormer(nn.Module):
    kind = "dwa coefficients"

    def __init__(self, cfg: ModelConfig, last_only: bool = False):
        super().__init__()
        L, k, p = cfg.n_layer, cfg.dwa_dilation, cfg.dwa_period
        self.n_layer = L
        self.after = [L] if last_only else [i for i in range(1, L + 1) if i % p == 0]  # blocks followed by a DWA
        self.sources = {i: list(range(i + 1)) if last_only else [j for j in range(i + 1) if (i - j) % k == 0]
                        for i in self.after}  # the X_j each DWA reads
        self.alphas = nn.ParameterList([nn.Parameter(self._identity(len(self.sources[i]))) for i in self.after])
        self.index = {i: n for n, i in enumerate(self.after)}

    @staticmethod
    def _identity(n: int) -> torch.Tensor:
        a = torch.zeros(n)
        a[-1] = 1.0  # the newest output: Y_i = X_i
        return a

    @staticmethod
    def extra_flops(cfg: ModelConfig) -> int:
        return 0  # scalar-weighted sums: elementwise

    def forward(self, x, blocks, rope, record: dict | None = None):
        outs = [x]  # X_0 .. X_i
        states, mixes, consumers = [x], [], []
        for i, block in enumerate(blocks, start=1):
            x, _ = block(x, rope)
            outs.append(x)
            if i in self.index:
                alpha = self.alphas[self.index[i]]
                x = weighted_sum(alpha, [outs[j] for j in self.sources[i]])  # Y_i
                mixes.append((alpha, self.sources[i]))
                consumers.append("head" if i == self.n_layer else f"block {i + 1}")
            if i < self.n_layer:
                states.append(x)
        if record is not None:
            record["states"] = states
            if not mixes or consumers[-1] != "head":  # no DWA after the last block: the head reads X_L alone
                mixes.append((torch.ones(1, device=x.device), [self.n_layer]))
                consumers.append("head")
            record["weights"] = {**weights_record(mixes, consumers, self.n_layer, x), "normalised": False}
        return x


@register_variant(Arch.connect_last)
class ConnectLast(DenseFormer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, last_only=True)
