"""Attention Residuals (Kimi Team, arXiv 2603.15031, 2026): softmax attention over depth instead of the residual sum.

Every attention and every MLP sublayer is a "layer" l (Section 2). Eq. (1)-(4), Full AttnRes: the input of layer
l is h_l = sum_{i<l} alpha_{i->l} v_i with v_0 = h_1 the token embedding and v_i = f_i(h_i) the output of layer i
(the sublayer itself, pre-norm inside: attn(norm(h)) or mlp(norm(h)), no residual added);
alpha_{i->l} = softmax_i(w_l . RMSNorm(v_i)), one learned pseudo-query w_l in R^d and one RMSNorm per layer,
per position, over depth only. The head reads one more such mix over all sources ("the final output layer
aggregates all ... representations"). Section 5: all w_l start at zero, so every mix starts as the plain average
of its sources: not the baseline's function, and the paper does not start there.

Eq. (5)-(6), Block AttnRes (model.attnres_block = S sublayers per block): a block's source is the sum of its
sublayers' outputs b_n; a layer reads the completed blocks b_0 = h_1, ..., b_{n-1} and, past its block's first
layer, the partial sum b_n^{i-1}. S=1 is Full AttnRes.

Chosen here: the first layer reads the embedding alone (a softmax over one source is 1), so it has no w or norm;
w_l and the RMSNorm gain are vectors, so no weight decay. w_l . RMSNorm_l(v) = (w_l * g_l) . v / rms(v): each
source is normalised once and shared by every later layer. The dot products and sums are elementwise (no matmul),
as are the mixes: 0 extra FLOPs in the counts, about 4·J·d per token per mix (J sources) in fact.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant, weighted_sum, weights_record

EPS = 1e-6


def _rms(v):
    return F.rms_norm(v, (v.size(-1),), eps=EPS)  # RMSNorm without its gain (the gain multiplies w_l)


@register_variant(Arch.attnres)
class AttnRes(nn.Module):
    kind = "attnres softmax"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_layer, self.S = cfg.n_layer, cfg.attnres_block or 1
        n_mix = 2 * cfg.n_layer  # before sublayers 2..2L, and before the head
        self.queries = nn.ParameterList([nn.Parameter(torch.zeros(cfg.n_embd)) for _ in range(n_mix)])  # w_l = 0
        self.gains = nn.ParameterList([nn.Parameter(torch.ones(cfg.n_embd)) for _ in range(n_mix)])  # RMSNorm_l

    @staticmethod
    def extra_flops(cfg: ModelConfig) -> int:
        return 0  # pseudo-query dot products and weighted sums: elementwise

    def mix(self, m: int, values, keys):
        """Mix m over `values` (J x (B, T, C)) with their normalised `keys`: h (B, T, C), alpha (B, T, J)."""
        q = self.queries[m] * self.gains[m]  # (C,)
        alpha = torch.stack([(k * q).sum(dim=-1) for k in keys], dim=-1).softmax(dim=-1)  # (B, T, J)
        return weighted_sum(alpha.to(values[0].dtype), values), alpha

    def forward(self, x, blocks, rope, record: dict | None = None):
        done, done_keys, done_last = [x], [_rms(x)], [-1]  # completed blocks b_0..b_{n-1}, their last sublayer
        partial, partial_last = None, None  # b_n^i, the sum of the current block's outputs so far
        states, mixes, consumers, m = [], [], [], 0

        def sources():
            if partial is None:
                return done, done_keys, done_last
            return done + [partial], done_keys + [_rms(partial)], done_last + [partial_last]

        for b, block in enumerate(blocks):
            for s in range(2):  # the attention sublayer, then the MLP
                n = 2 * b + s  # sublayer index, 0-based: layer l = n + 1 of the paper
                if n == 0:
                    h = x  # h_1: the embedding
                else:
                    values, keys, last = sources()
                    h, alpha = self.mix(m, values, keys)
                    mixes.append((alpha, [(i // 2) + 1 if i >= 0 else 0 for i in last]))  # sublayer -> its block
                    consumers.append(f"{'attn' if s == 0 else 'mlp'} {b + 1}")
                    m += 1
                if s == 0:
                    states.append(h)
                out = block.attn_branch(h, rope) if s == 0 else block.mlp_branch(h)  # f_l(h_l)
                partial = out if partial is None else partial + out
                partial_last = n
                if (n + 1) % self.S == 0:  # the block is complete
                    done, done_keys, done_last = done + [partial], done_keys + [_rms(partial)], done_last + [n]
                    partial = None
        values, keys, last = sources()
        x, alpha = self.mix(m, values, keys)  # what the head reads
        if record is not None:
            mixes.append((alpha, [(i // 2) + 1 if i >= 0 else 0 for i in last]))
            consumers.append("head")
            record["states"] = states
            record["weights"] = {**weights_record(mixes, consumers, self.n_layer, x), "normalised": True}
        return x
