"""Mixture-of-Depths routing (Raposo et al. 2024, arXiv 2404.02258): a routed block processes only some tokens.

Eq. (1): with router weights r_i = w·x_i (one learned vector w per routed block), the block's output is
x_i + r_i·f_i(X̃) for a token it processes and x_i for the others, where f(X̃) = block(X̃) - X̃ is the block's
attention and MLP over the processed tokens X̃ only (attention among them, causal by their original positions).
Multiplying by r puts the router on the gradient path of the language-modelling loss. Gather and scatter are real:
the block runs on c·T tokens, so its attention and MLP cost c of a dense block's (and its attention c² of the
scores), which is what the step time shows.

Which tokens (model.mod_capacity = c):
  training  the top c·T of r over the sequence (the paper's expert-choice routing; it looks at later tokens, so it is
            not causal);
  evaluation and decoding  r_i > 0, the router's own decision, which depends on x_i alone: causal. The paper's first
            method (section 3.5, chosen here): an auxiliary binary cross-entropy of r (as logits) against the top-k
            choice (as targets) teaches the sign of r to predict top-k membership (model.mod_aux_weight); the
            decision at sampling is sigmoid(r) > 0.5. Evaluation reports both modes' NLL, so the gap is seen.
A token a routed block skips still has its state h_{i+1} = h_i, which the shortcut's final block can read.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from shortcut.blocks import Block, BlockCache, BlockInfo, KV, Linear, register_block
from shortcut.config import ModelConfig


def routed_tokens(cfg: ModelConfig, seq_len: int) -> int:
    """k = round(c·T): how many of a sequence's tokens a routed block processes in training."""
    return max(1, round(cfg.mod_capacity * seq_len))


@register_block
class RoutedBlock(Block):
    """A Block behind a router (its state-dict names are the Block's plus router.weight)."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__(cfg, i)
        self.capacity, self.mode = cfg.mod_capacity, "auto"  # auto: top-k in training, causal otherwise
        self.router = Linear(cfg.n_embd, 1, bias=False)

    @staticmethod
    def applies(cfg: ModelConfig, i: int) -> bool:
        return i in cfg.routed_blocks()

    @staticmethod
    def flops(cfg: ModelConfig, i: int, seq_len: int) -> float:
        """Per token of the sequence, at the training capacity: k/T of the tokens run a dense block over k keys;
        all pay the router. (A fraction: shortcut.costs rounds the model's total.)"""
        k = routed_tokens(cfg, seq_len)
        return k / seq_len * Block.flops(cfg, i, k) + 2 * cfg.n_embd

    def new_cache(self, cfg: ModelConfig, batch: int, device, dtype) -> BlockCache:
        return BlockCache(self_kv=KV.empty(cfg, batch, device=device, dtype=dtype, routed=True))

    def forward(self, x, rope=None, taps=None, cache: BlockCache | None = None, need_weights: bool = False):
        r = self.router(x).squeeze(-1)  # (B, n) the router weights r_i
        if cache is not None:
            return self._cached(x, r, rope, cache)
        top_k = self.mode == "topk" or (self.mode == "auto" and self.training)
        n = x.size(1)
        k = max(1, round(self.capacity * n)) if top_k else n
        chosen = torch.zeros_like(r, dtype=torch.bool).scatter(1, r.topk(k, dim=1).indices, True) if top_k \
            else r > 0  # (B, n)
        aux = F.binary_cross_entropy_with_logits(r.float(), chosen.float()) if top_k and self.training else None
        # Each row's processed positions first, in position order (a stable sort), then the others: padding after
        # every real token, which causal attention keeps out of their sums. Causal mode pads to the sequence's
        # length, so that no token's output depends on how many later tokens were chosen (bit-exact causality;
        # the evaluation pays a dense block, decoding skips for real: _cached).
        order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :k]  # (B, k)
        real = torch.gather(chosen, 1, order)  # (B, k): False on the padding
        x_sel = torch.gather(x, 1, order[..., None].expand(-1, -1, x.size(-1)))  # (B, k, C)
        rope_sel = None if rope is None else tuple(t[order][:, None] for t in rope)  # 2 x (B, 1, k, hs/2)
        y, _ = super().forward(x_sel, rope_sel)  # the block over the processed tokens alone
        r_sel = torch.gather(r, 1, order)[..., None].to(x.dtype)  # (B, k, 1)
        out_sel = torch.where(real[..., None], x_sel + r_sel * (y - x_sel), x_sel)  # x + r·f(X̃), or x
        out = x.scatter(1, order[..., None].expand(-1, -1, x.size(-1)), out_sel)
        return out, BlockInfo(processed=chosen, aux_loss=aux)

    def _cached(self, x, r, rope, cache: BlockCache):
        """Decoding: the causal decision; the rows with a processed token run the block, over the keys of the
        tokens this block processed before (the cache marks them), and the others skip it (real saving)."""
        chosen = r > 0  # (B, n)
        cache.self_kv.mark(cache.pos, chosen)
        rows = chosen.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return x, BlockInfo(processed=chosen)
        y, _ = super().forward(x[rows], rope, cache=cache.select(rows))
        r_rows, x_rows = r[rows][..., None].to(x.dtype), x[rows]
        out = x.clone()
        out[rows] = torch.where(chosen[rows][..., None], x_rows + r_rows * (y - x_rows), x_rows)
        return out, BlockInfo(processed=chosen)

    def remember(self, x, rope, taps, cache: BlockCache) -> None:
        raise NotImplementedError("a routed block's keys depend on its router: early exits do not compose with it")


@contextmanager
def routing_mode(model, mode: str):
    """Within: every routed block of model chooses its tokens by `mode` ("topk": the training rule, "causal": the
    router's sign; "auto": top-k in training, causal otherwise), whatever model.training says."""
    blocks = [b for b in model.modules() if isinstance(b, RoutedBlock)]
    before = [b.mode for b in blocks]
    for b in blocks:
        b.mode = mode
    try:
        yield
    finally:
        for b, m in zip(blocks, before):
            b.mode = m
