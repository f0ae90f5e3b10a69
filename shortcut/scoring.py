"""Which targets of a split a sliding-window evaluation scores, in batches, and their summed NLL.

Shared by the evaluation (shortcut.evaluate), the early-exit curves and the audit, so that every number is measured
on the same targets with the same context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shortcut.data import TokenData
from shortcut.model import GPT


def sliding_windows(n_tokens: int, block_size: int, stride: int, max_targets: int | None = None
                    ) -> list[tuple[int, int, int]]:
    """(start, length, first scored position) of the windows that score targets 1..n-1 (the first max_targets of
    them) exactly once. The first window scores all its positions; each next one ends `stride` targets later and
    scores only what is new, so its scored positions are >= length - stride (context >= length - stride + 1)."""
    targets = n_tokens - 1 if max_targets is None else min(n_tokens - 1, max_targets)
    T = min(block_size, targets)
    windows, scored = [(0, T, 0)], T  # targets are token indices 1..scored so far
    while scored < targets:
        end = min(scored + stride, targets)
        windows.append((end - T, T, scored - (end - T)))  # inputs end-T..end-1 predict targets end-T+1..end
        scored = end
    return windows


@torch.no_grad()
def split_nll(model: GPT, data: TokenData, split: str, stride: int, max_tokens: int | None, batch_size: int,
              ctx) -> tuple[float, int, float]:
    """Summed next-token NLL (nats) over a split, the number of tokens scored, and their mean context length."""
    windows = sliding_windows(len(data.splits[split]), data.block_size, stride, max_tokens)
    total, count, context = 0.0, 0, 0
    for x, y, keep in scored_batches(data, split, windows, batch_size, next(model.parameters()).device):
        with ctx:
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        total += nll[keep].sum().item()
        count += int(keep.sum())
        pos = torch.arange(1, x.size(1) + 1, device=x.device)  # a target at position i sees i + 1 tokens
        context += int((pos[None, :] * keep).sum())
    return total, count, context / count


def scored_batches(data: TokenData, split: str, windows: list[tuple[int, int, int]], batch_size: int, device):
    """The windows of sliding_windows in batches: (x, y, keep) on the device, keep (B, T) marking the targets
    each window scores."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        x, y = data.windows(split, [s for s, _, _ in chunk], chunk[0][1])
        x, y = x.to(device), y.to(device)
        first = torch.tensor([f for _, _, f in chunk], device=device)
        yield x, y, torch.arange(x.size(1), device=device)[None, :] >= first[:, None]
