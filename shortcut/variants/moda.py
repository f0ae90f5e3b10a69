"""Mixture-of-depths attention, MoDA (Zhu et al., arXiv 2603.15619, 2026): every head's one softmax spans its
layer's causal sequence keys and the keys that all earlier layers wrote at the query's own position.

Section 2.2 ("Mixture-of-Depths Attention", Fig. 1, Fig. 3(d), Alg. 1). Layer l reads its hidden state X_{l-1} and
the depth KV stream {(K_i, V_i)}_{i<l}; the query q_t (the sequence attention's own: no depth-query projection)
attends in one softmax to the sequence keys k_s, s <= t, of its layer and to the depth keys K_{i,t} of the same
position t only, "all attention scores normalized jointly under a single softmax":
    o_t = sum_{s<=t} p_ts v_s + sum_i p_ti V_{i,t},   p_t = softmax([q_t.k_s / sqrt(d)]_{s<=t} ++ [q_t.K_{i,t} / sqrt(d)]_i)
Write step: "for the attention layer, we append the current layer's key-value pair to the depth stream" (its
sequence K/V reused, no new projection: Table 3 row 3, +0.12% FLOPs there); "for the FFN layer, we obtain its
corresponding key-value pair via a light-weight KV projection" of the FFN's input (row 4, the paper's default, the
one its 1.5B results use): model.moda_ffn_kv.

Which keys and values block l (0-based; block 0 reads the embeddings) reuses: for query position t, the key and
value every earlier block i < l's attention made for position t (after RoPE, as its own sequence attention used
them) and, with moda_ffn_kv, (K, V) = W_kv,i · LN_2(h) of block i's FFN input h at position t: 2·l depth slots
(l without). Block 0 has none and is the baseline's block. Later positions are never read (causal in depth and
sequence); with a KV cache, a new token's depth slots are made in its own pass, so decoding composes with it.

Chosen here, where the paper leaves it open or builds otherwise: pre-norm blocks, the project's (the paper finds
post-norm better and reports both); no GQA (every head has its own keys, so an FFN's KV projection is C -> 2C, the
paper's C -> 2C/G); the KV projection reads LN_2(h), what the FFN reads, has a bias per model.bias and starts
N(0, 0.02) like W_k and W_v; its keys get RoPE at their own position, so every depth score is q.k as for the
sequence key at distance 0, like the reused attention keys; the last block's FFN writes nothing (no layer reads
it); an explicit softmax over the [sequence | depth] scores (the readable reference: no fused kernel, so step times
are not those of the paper's Triton kernel). Not the baseline at initialisation: the depth slots hold softmax mass
from step 0, and the paper does not start there. FLOPs: the depth scores and values are matmuls, 4·C·S_l per token
in block l (S_l slots), plus 2·C·2C per FFN KV projection; the paper's +3.7% is at 1.5B with GQA and T=4096.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shortcut.blocks import Linear, apply_rope
from shortcut.config import Arch, ModelConfig
from shortcut.variants.common import register_variant, weights_record


def moda_attention(q, k, v, kd=None, vd=None, pos: int = 0, dropout_p: float = 0.0):
    """One softmax over sequence and depth keys. q: (B, nh, n, hs) at positions pos..pos+n-1; k, v: (B, nh, pos+n,
    hs), the layer's sequence keys (query t sees s <= t); kd, vd: (B, nh, n, S, hs), the depth keys and values of
    the query's own position, or None. Returns y (B, nh, n, hs) and the depth probabilities (B, nh, n, S) or None."""
    n, t, hs = q.size(2), k.size(2), q.size(-1)
    scale = hs ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, nh, n, t)
    queries = pos + torch.arange(n, device=q.device)
    causal = torch.arange(t, device=q.device)[None, :] <= queries[:, None]  # (n, t)
    scores = scores.masked_fill(~causal, float("-inf"))
    if kd is not None:
        depth = (q.unsqueeze(-2) @ kd.transpose(-1, -2)).squeeze(-2) * scale  # (B, nh, n, S): a matmul, counted
        scores = torch.cat([scores, depth], dim=-1)  # (B, nh, n, t + S)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    p = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    y = p[..., :t] @ v  # (B, nh, n, hs)
    if kd is None:
        return y, None
    y = y + (p[..., t:].unsqueeze(-2) @ vd).squeeze(-2)  # + sum_i p_ti V_{i,t}
    return y, probs[..., t:]


@register_variant(Arch.moda)
class MoDA(nn.Module):
    caches = True  # composes with the KV cache: a token's depth slots come from its own pass

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, self.n_layer = cfg.n_embd, cfg.n_layer
        # for the depth audit: per block l >= 1, the head-averaged softmax mass on each earlier layer's slots (an
        # attention's slot counts for its input layer l, an FFN's for its block's output l + 1); none with 1 block
        self.kind = "moda depth attention mass" if cfg.n_layer > 1 else None
        # W_kv of the FFNs of blocks 0..L-2 (the last block's FFN pair would have no reader)
        self.ffn_kv = nn.ModuleList([Linear(C, 2 * C, bias=cfg.bias) for _ in range(cfg.n_layer - 1)]) \
            if cfg.moda_ffn_kv else None

    @staticmethod
    def slots(cfg: ModelConfig, l: int) -> int:
        """Depth slots block l reads: one per earlier attention, and one per earlier FFN with moda_ffn_kv."""
        return l * (2 if cfg.moda_ffn_kv else 1)

    @staticmethod
    def extra_flops(cfg: ModelConfig) -> int:
        C, L = cfg.n_embd, cfg.n_layer
        depth = sum(2 * 2 * C * MoDA.slots(cfg, l) for l in range(L))  # q.K_i and p.V_i over every head
        return depth + (L - 1) * 2 * C * 2 * C * cfg.moda_ffn_kv  # the FFNs' KV projections

    def forward(self, x, blocks, rope, record: dict | None = None, cache=None):
        """x: (B, n, C) embeddings at the cache's next positions (0.. without one); cache: the blocks' BlockCaches."""
        L = len(blocks)
        kd, vd, layers = [], [], []  # the depth stream: S x (B, nh, n, hs), and the source layer of each slot
        states, mixes, consumers = [x], [], []
        for l, block in enumerate(blocks):
            attn = block.attn
            q, k, v = attn.project(block.ln_1(x), rope=rope)  # 3 x (B, nh, n, hs)
            pos = 0 if cache is None else cache[l].pos
            ks, vs = (k, v) if cache is None else cache[l].self_kv.write(k, v, pos)  # (B, nh, pos + n, hs)
            depth = (torch.stack(kd, dim=3), torch.stack(vd, dim=3)) if kd else (None, None)  # (B, nh, n, S, hs)
            y, p = moda_attention(q, ks, vs, *depth, pos, attn.dropout if self.training else 0.0)
            x = x + attn.merge(y)
            kd, vd, layers = kd + [k], vd + [v], layers + [l]  # the attention's own pair, read from h_l
            h = block.ln_2(x)  # (B, n, C), the FFN's input
            if self.ffn_kv is not None and l < L - 1:
                kf, vf = (attn.heads(t) for t in self.ffn_kv[l](h).split(x.size(-1), dim=-1))  # 2 x (B, nh, n, hs)
                kd, vd, layers = kd + [apply_rope(kf, rope) if rope is not None else kf], vd + [vf], layers + [l + 1]
            x = x + block.mlp(h)
            if l < L - 1:
                states.append(x)
            if record is not None and p is not None:
                mixes.append((p.mean(dim=1).float(), layers[:p.size(-1)]))  # (B, n, S), head-averaged
                consumers.append(f"block {l}")
        if record is not None:
            record["states"] = states
            record["weights"] = {**weights_record(mixes, consumers, L, x), "normalised": False}
        return x
