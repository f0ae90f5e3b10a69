"""MUDDFormer: multiway dynamic dense connections (Xiao et al., ICML 2025, arXiv 2502.12170).

Section 3: after block i (outputs X_0 = embedding, X_1..X_i), a depth-wise aggregate per stream s in {Q, K, V, R}:
X_i^s = sum_{j=0..i} A_i^s[j] X_j, with weights per position from the current output,
A_i = GELU(RMSNorm(X_i) W_1) W_2 + a_i (a small MLP, W_1: d -> 4(i+1), W_2: 4(i+1) -> 4(i+1)). Block i+1 reads its
query, key and value projections from X_i^Q, X_i^K, X_i^V (each through its own pre-norm) and adds its attention
output to X_i^R; the MLP sub-layer is as usual. After the last block only the R stream is made, for the head.
Initialisation (the authors' training code): W_2 = 0 and a_i one-hot on the newest output, so every stream is X_i
and the model starts as the baseline; W_1 normal with std d^-1/2.

Chosen here: the last block's generator is 4x wider (the released models' expand_last); hidden widths are not
rounded up to multiples of 64 (a TPU layout matter that would dominate at small d); the RMSNorm before W_1 has no
gain (as released); the static a_i are flat vectors, so not decayed (decay would pull away from the identity);
the query stream reuses the block's ln_1 and the key and value streams get new norms (released: sepln=True).
Counted FLOPs: the generators (matmuls); the mixes are elementwise (2·4·(i+1)·d per token after block i).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shortcut.blocks import Linear, make_norm
from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant, weighted_sum, weights_record

STREAMS = ("q", "k", "v", "r")


def _shape(cfg: ModelConfig, i: int) -> tuple[int, int, int]:
    """(streams, sources, hidden width) of the generator after block i (0-based)."""
    last = i == cfg.n_layer - 1
    streams, sources = (1 if last else len(STREAMS)), i + 2
    return streams, sources, streams * sources * (4 if last else 1)


class WeightGenerator(nn.Module):
    """A_i = GELU(RMSNorm(X_i) W_1) W_2 + a_i, per position: (B, T, C) -> (B, T, streams, sources)."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.streams, self.sources, hidden = _shape(cfg, i)
        self.w1 = Linear(cfg.n_embd, hidden, bias=False, std=cfg.n_embd ** -0.5)  # fan-in normal
        self.w2 = Linear(hidden, self.streams * self.sources, bias=False, init="zero")
        static = torch.zeros(self.streams, self.sources)
        static[:, -1] = 1.0  # every stream starts as the newest output X_i
        self.static = nn.Parameter(static.flatten())  # a_i

    def forward(self, x):
        x = F.rms_norm(x, (x.size(-1),), eps=1e-6)
        dw = self.w2(F.gelu(self.w1(x))) + self.static  # (B, T, streams * sources)
        return dw.unflatten(-1, (self.streams, self.sources))


@register_variant(Arch.mudd)
class MUDD(nn.Module):
    kind = "mudd dynamic weights"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L = cfg.n_layer
        self.gen = nn.ModuleList([WeightGenerator(cfg, i) for i in range(L)])
        self.ln_k = nn.ModuleList([make_norm(cfg) for _ in range(L - 1)])  # blocks 2..L: the key stream's norm
        self.ln_v = nn.ModuleList([make_norm(cfg) for _ in range(L - 1)])  # and the value stream's

    @staticmethod
    def extra_flops(cfg: ModelConfig) -> int:
        total = 0
        for i in range(cfg.n_layer):
            streams, sources, hidden = _shape(cfg, i)
            total += 2 * cfg.n_embd * hidden + 2 * hidden * streams * sources  # W_1, W_2
        return total

    def forward(self, x, blocks, rope, record: dict | None = None):
        L = len(blocks)
        outs = [x]  # X_0 .. X_i
        xq = xk = xv = xr = x
        states, mixes, consumers = [x], [], []
        for i, block in enumerate(blocks):
            if i == 0:  # all four streams are X_0: the plain block
                a = block.attn_branch(x, rope)
            else:
                q, k, v = block.attn.project(block.ln_1(xq), self.ln_k[i - 1](xk), self.ln_v[i - 1](xv), rope)
                a = block.attn.attend(q, k, v)
            h = xr + a
            x = h + block.mlp_branch(h)  # X_{i+1}
            outs.append(x)
            dw = self.gen[i](x)  # (B, T, streams, i + 2)
            streams = [weighted_sum(dw[:, :, s], outs) for s in range(dw.size(2))]
            if i < L - 1:
                xq, xk, xv, xr = streams
                states.append(xr)
            if record is not None:
                names = STREAMS if i < L - 1 else ("head",)
                for s, name in enumerate(names):
                    mixes.append((dw[:, :, s], list(range(i + 2))))
                    consumers.append(name if name == "head" else f"{name} {i + 2}")
        if record is not None:
            record["states"] = states
            record["weights"] = {**weights_record(mixes, consumers, L, x), "normalised": False}
        return streams[0]
