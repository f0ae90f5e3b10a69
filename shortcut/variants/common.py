"""What the variants share: their registry, a weighted sum over depth, and the record of its weights for the audit."""

from __future__ import annotations

import torch

from shortcut.config import Arch

VARIANTS: dict[Arch, type] = {}  # arch -> the module that runs the blocks its way (filled by register_variant)


def register_variant(arch: Arch):
    """Class decorator: GPT builds this module for model.arch=arch and keeps it under the arch's name."""
    def register(cls: type) -> type:
        if arch in VARIANTS:
            raise ValueError(f"two variants for model.arch={arch}")
        VARIANTS[arch] = cls
        return cls
    return register


def weighted_sum(weights, sources: list[torch.Tensor]) -> torch.Tensor:
    """sum_j weights[..., j] * sources[j]. weights: (J,) static or (B, T, J) per position; sources: J x (B, T, C).

    Elementwise on purpose: nothing is stacked, so autograd keeps only the sources it already holds (memory O(J)
    per mix instead of a stacked copy each), and it is no matmul, so the FLOP counts leave it out, like norms and
    softmax (2·J·C per token per mix). One-hot weights give back their source exactly (0·x + ... + 1·y = y)."""
    weights = weights.to(sources[0].dtype)
    if weights.dim() > 1:
        weights = weights.unsqueeze(-1)  # (B, T, J, 1)
        out = weights[..., 0, :] * sources[0]
        for j in range(1, len(sources)):
            out = torch.addcmul(out, weights[..., j, :], sources[j])  # one fused multiply-add per source
        return out
    out = weights[0] * sources[0]
    for j in range(1, len(sources)):
        out = out + weights[j] * sources[j]
    return out


def weights_record(mixes: list[tuple[torch.Tensor, list[int]]], consumers: list[str], n_layer: int,
                   like: torch.Tensor) -> dict:
    """GPT.layer_weights' fields from the mixes a forward made: [(weights (J,) or (B, T, J), the layer each of
    the J sources comes from)], one per consumer. A layer's parts (AttnRes: its attention and MLP outputs) add up."""
    B, T = like.shape[:2]
    out = torch.zeros(B, T, len(mixes), n_layer + 1, dtype=torch.float32, device=like.device)
    for a, (w, layers) in enumerate(mixes):
        w = w.detach().float().expand(B, T, -1) if w.dim() == 1 else w.detach().float()
        out[:, :, a].index_add_(-1, torch.tensor(layers, device=like.device), w)
    return {"sources": list(range(n_layer + 1)), "consumers": consumers, "weights": out}
