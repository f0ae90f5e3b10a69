"""Incremental decoding with a KV cache, for the baseline and the shortcut model (every mode, tap bias and number of
shortcut blocks; the variants in shortcut/variants/ decode with a full forward instead).

Each new token costs one pass through the blocks at its own position: GPT.forward with a Cache, in which every block
keeps the keys and values it made (shortcut.blocks: a self-attention's (B, nh, T, hs), a shortcut block's (tap,
position) ones (B, nh, K_i, T, hs)). This module holds the policy only: what to cache and when to rebuild it.

The window: a model sees at most block_size tokens (learned positions end there). When the window is full, the cache
is rebuilt from the last block_size // 2 tokens (positions start again at 0), so every token is predicted from at
least block_size // 2 tokens of context, and the cached logits always equal a full forward pass over the tokens
since the last rebuild (tested at every step).
"""

from __future__ import annotations

import torch

from shortcut.config import Arch
from shortcut.model import GPT


def supports_cache(model: GPT) -> bool:
    """The baseline and the shortcut (the variants in shortcut/variants/ decode with a full forward instead)."""
    return model.cfg.arch in (Arch.baseline, Arch.shortcut)


def slide(seq: torch.Tensor, ids: torch.Tensor, T: int) -> tuple[torch.Tensor, bool]:
    """The window rule of every decoder: append ids (B,) to seq (B, t); a full window (t = T) keeps the last T // 2
    tokens instead, and says so (a cache must then be rebuilt)."""
    longer = torch.cat([seq, ids[:, None]], dim=1)
    return (longer[:, -(T // 2):], True) if seq.size(1) == T else (longer, False)


class KVCacheDecoder:
    """start(prompt) -> logits of the next token; push(ids) -> the next logits, one token per row at a time."""

    def __init__(self, model: GPT):
        if not supports_cache(model):
            raise ValueError(f"no KV cache for {model.cfg.arch}")
        self.model, self.T = model, model.cfg.block_size
        self.seq = self.cache = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        self.seq = prompt[:, -self.T:]
        return self._prefill()

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> torch.Tensor:
        self.seq, rebuilt = slide(self.seq, ids, self.T)
        if rebuilt:
            return self._prefill()
        return self.model(ids[:, None], cache=self.cache)[0][:, -1]  # (B, V)

    def _prefill(self) -> torch.Tensor:
        self.cache = self.model.new_cache(self.seq.size(0))
        return self.model(self.seq, cache=self.cache)[0][:, -1]  # (B, V)
