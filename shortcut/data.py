"""Batches from a prepared corpus: random training windows chosen by (seed, step) alone, fixed validation windows.

Because a step's batch depends only on (seed, step), a resumed run sees exactly the batches an uninterrupted one
would, two runs with the same seed see the same data (which is what makes paired tests over seeds valid), and
splitting the step's batch into micro-batches (gradient accumulation) or over processes does not change it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shortcut import corpus
from shortcut.config import UserError


class TokenData:
    """A prepared corpus, opened for training or evaluation. Opening it verifies every file against meta.json (sizes,
    then sha256: shortcut.corpus.verify), so content_hash, which runs record, is the hash of the bytes read, and a
    changed split is refused in one line before any step or score. The hash check is also what keeps random bytes
    (token ids past the vocabulary) from reaching the embedding: no separate scan of the ids is needed."""

    def __init__(self, path: Path, block_size: int):
        self.path = Path(path)
        self.meta = corpus.read_meta(self.path)
        self.block_size = block_size
        self.content_hash = corpus.verify(self.path, self.meta)
        self.splits = {s: corpus.load_split(self.path, s, self.meta) for s in corpus.SPLITS}
        split, arr = min(self.splits.items(), key=lambda kv: len(kv[1]))
        if len(arr) < block_size + 1:
            raise UserError(
                f"model.block_size={block_size} is larger than the data allows: the {split} split of {self.path} "
                f"has {len(arr)} tokens; use model.block_size={max(1, len(arr) - 1)} or less, or more data")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def windows(self, split: str, starts, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for windows starting at starts: two (B, T) int64 tensors."""
        T = length or self.block_size
        data = self.splits[split]
        xy = torch.from_numpy(np.stack([np.asarray(data[s:s + T + 1], dtype=np.int64) for s in starts]))
        return xy[:, :-1], xy[:, 1:]

    def step_starts(self, seed: int, step: int, n: int) -> np.ndarray:
        """The n window starts of a step's whole batch."""
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, len(self.splits["train"]) - self.block_size, size=n)

    def train_batch(self, seed: int, step: int, batch_size: int, grad_accum: int = 1, micro: int = 0):
        """Micro-batch `micro` (of grad_accum, batch_size windows each) of the step's batch."""
        starts = self.step_starts(seed, step, batch_size * grad_accum)
        return self.windows("train", starts[micro * batch_size:(micro + 1) * batch_size])

    def fixed_starts(self, split: str, n: int, length: int | None = None) -> np.ndarray:
        """n window starts spread evenly over the split: the same for every run, so losses compare."""
        last = len(self.splits[split]) - (length or self.block_size) - 1
        return np.unique(np.linspace(0, last, n).round().astype(np.int64))
