"""Shared fixtures: offline environment, a small English-like corpus the tests write themselves, tiny configs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "shortcut-tests-hf"))

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will can more out up into "
         "do any your what some time could other than then now only its over also after first two may these "
         "new people such our most should very well way just because good those how even back through much "
         "before where right must make great being down little own old see same little world long thing").split()

# A model small enough for a CPU step in a few milliseconds.
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "wandb=off"]


def english_like(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(4, 14)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!"]))
        words += k
    return "\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)) + "\n"


@pytest.fixture
def text_files(tmp_path: Path) -> Path:
    """Three UTF-8 text files (~60k characters) in tmp_path/texts."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(english_like(4000, seed=i), encoding="utf-8")
    return folder


@pytest.fixture
def prepared(tmp_path: Path, text_files: Path) -> list[str]:
    """Overrides pointing train at a prepared char-level corpus under tmp_path/data."""
    from shortcut.cli import compose
    from shortcut.prepare import prepare

    base = [f"data.root={tmp_path / 'data'}", "domain=text", "domain.source=files"]
    prepare(compose("prepare", base + [f"domain.files={text_files}/*.txt"]))
    return base


def assert_flops_match_the_counter(model, cfg, x) -> None:
    """shortcut.costs.flops_per_token(cfg) equals FlopCounterMode's count per token of model on x (B, T), forward
    and training, relative error <= 1e-6 (MATH backend: attention counted as its two matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from shortcut.costs import flops_per_token

    f = flops_per_token(cfg, seq_len=x.size(1))
    analytic = {"forward": f.forward, "train": f.train}
    for key, run in (("forward", lambda: model(x)), ("train", lambda: model(x, x)[1].backward())):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run()
        measured = counter.get_total_flops() / x.numel()
        assert abs(analytic[key] - measured) <= 1e-6 * measured, (key, analytic, measured)


def tokens(B: int = 2, T: int = 24, seed: int = 0):
    """(B, T) token ids below 40, the tiny models' vocabulary."""
    import torch

    return torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_causal_and_trainable(model) -> None:
    """Changing the tokens from position 15 on leaves every earlier logit unchanged and changes the later ones;
    one backward gives every parameter a gradient."""
    import torch

    x = tokens()
    logits, loss = model(x, x)
    x2 = x.clone()
    x2[:, 15:] = (x2[:, 15:] + 7) % 40  # change the future
    logits2 = model(x2)[0]
    assert torch.equal(logits[:, :15], logits2[:, :15]), "earlier logits depend on later tokens"
    assert not torch.allclose(logits[:, 15:], logits2[:, 15:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def assert_impl_matches_the_reference(cfg, impl, T: int, perturb=None) -> None:
    """The model with model.attn_impl=impl gives the masked reference's logits, loss and gradient of every
    parameter within 1e-5 (same seed; perturb(model) first moves chosen parameters off their init). flex runs on
    CUDA, everything else on the CPU."""
    from dataclasses import replace

    import torch

    from shortcut.config import AttnImpl
    from shortcut.model import GPT

    device = "cuda" if impl == AttnImpl.flex else "cpu"
    results = []
    for attn_impl in (AttnImpl.masked, impl):
        torch.manual_seed(0)
        model = GPT(replace(cfg, attn_impl=attn_impl))
        if perturb is not None:
            perturb(model)
        model = model.to(device)
        x = tokens(B=3, T=T).to(device)
        logits, loss = model(x, x)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def impls_to_test() -> list:
    """Every attention implementation but auto: flex where CUDA is present (it has no CPU backward)."""
    import torch

    from shortcut.config import AttnImpl

    return [i for i in AttnImpl if i != AttnImpl.auto and (i != AttnImpl.flex or torch.cuda.is_available())]


def perturb_own(model, prefixes: tuple[str, ...], seed: int = 1, scale: float = 0.5) -> None:
    """Random values added to a variant's own parameters (those under `prefixes`), so that its mixing is no longer
    the identity or an average it starts at."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.split(".")[0] in prefixes:
                p.add_(torch.randn(p.shape, generator=g) * scale)
