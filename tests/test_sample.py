"""Sampling: the KV cache gives a full forward pass's logits at every step (past block_size too), the sampling
rules do what they say, and `shortcut sample` writes files each domain's own readers open."""

import itertools
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY
from shortcut.cli import compose
from shortcut.config import ModelConfig, SampleConfig, UserError
from shortcut.generate import KVCacheDecoder, supports_cache
from shortcut.model import GPT
from shortcut.prepare import prepare
from shortcut.generate import FullForward, pick_next
from shortcut.sample import sample
from shortcut.train import train


EXTRAS = [{}, {"pos": "rope"}, {"taps": [0, 2], "feature_map": "linear"}, {"norm": "rmsnorm", "mlp": "swiglu"}]
# Issue 13's switches at tiny size: mode x bias x shortcut blocks x taps (all, or sparse: block 2 reads [0, 2],
# block 3 [0, 2, 3]), and one point with the modern baseline's positions, norm and MLP.
SWITCHES = [{"shortcut_mode": m, "tap_bias": b, "shortcut_layers": n, "taps": t, "n_layer": 4}
            for m, b, n, t in itertools.product(["replace", "add"], ["none", "last"], [1, 2], ["all", [0, 2, 3]])]
CACHED = ([("baseline", e) for e in EXTRAS] + [("shortcut", e) for e in EXTRAS] + [("shortcut", s) for s in SWITCHES]
          + [("shortcut", {**SWITCHES[-1], "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"})])


@pytest.mark.parametrize("arch,extra", CACHED, ids=str)
def test_cached_logits_equal_a_full_forward_at_every_step(arch, extra):
    torch.manual_seed(0)
    cfg = {"n_layer": 3, "n_head": 2, "n_embd": 32, "block_size": 12, "vocab_size": 40, **extra}
    model = GPT(ModelConfig(arch=arch, **cfg)).eval()
    with torch.no_grad():  # away from the init: tap biases, zero projections and feature maps all matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert supports_cache(model)
    decoder, uncached = KVCacheDecoder(model), FullForward(model)
    prompt = torch.randint(0, 40, (2, 5))
    logits, full = decoder.start(prompt), uncached.start(prompt)
    lengths = []
    for _ in range(30):  # past block_size: the window is rebuilt from its last half four times
        with torch.no_grad():
            reference = model(decoder.seq)[0][:, -1]  # a full forward over the window the cache holds
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)  # sample.cache=false: the same window
        lengths.append(decoder.seq.size(1))
        ids = torch.randint(0, 40, (2,))
        logits, full = decoder.push(ids), uncached.push(ids)
    assert max(lengths) == 12 and min(lengths[8:]) == 6  # full windows, and rebuilt from block_size // 2


def test_sampling_rules():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]]).repeat(2000, 1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert pick_next(logits[:1], SampleConfig(temperature=0), gen()).item() == 2
    top2 = pick_next(logits, SampleConfig(top_k=2), gen())
    assert set(top2.tolist()) == {2, 3}
    p = torch.softmax(logits[0], 0)  # 0.644, 0.237, 0.087, 0.032 for tokens 2, 3, 1, 0
    nucleus = pick_next(logits, SampleConfig(top_p=0.85), gen())
    assert set(nucleus.tolist()) == {2, 3} and float(p[2] + p[3]) >= 0.85
    full = pick_next(logits, SampleConfig(), gen())
    assert set(full.tolist()) == {0, 1, 2, 3} and abs((full == 2).float().mean() - p[2]) < 0.04
    assert torch.equal(full, pick_next(logits, SampleConfig(), gen()))  # the seed decides


def test_sample_text(tmp_path, prepared):
    run = tmp_path / "r"
    train(compose("train", prepared + TINY + ["model=shortcut", "train.max_steps=30"]), run)
    record = sample(compose("sample", [f"run_dir={run}", "sample.n=3", "sample.max_new_tokens=40",
                                       "sample.prompt='The '"]))
    texts = [(run / "samples" / f["files"][0]).read_text() for f in record["samples"]]
    assert len(texts) == 3 and all(t.startswith("The ") and len(t) == 44 for t in texts)
    saved = json.loads((run / "samples" / "samples.json").read_text())
    assert saved["cache"] is True and saved["tokens_per_s"] > 0 and saved["settings"]["n"] == 3
    uncached = sample(compose("sample", [f"run_dir={run}", "sample.n=3", "sample.max_new_tokens=40",
                                         "sample.prompt='The '", "sample.cache=false", "sample.temperature=0"]))
    cached = sample(compose("sample", [f"run_dir={run}", "sample.n=3", "sample.max_new_tokens=40",
                                       "sample.prompt='The '", "sample.temperature=0"]))
    read = lambda rec: [(run / "samples" / f["files"][0]).read_text() for f in rec["samples"]]  # noqa: E731
    assert uncached["cache"] is False and read(cached) == read(uncached)  # greedy: the same text either way
    with pytest.raises(UserError, match="sample.prompt has characters"):
        sample(compose("sample", [f"run_dir={run}", "sample.prompt='日本'"]))
    from_test = sample(compose("sample", [f"run_dir={run}", "sample.from_test=true", "sample.prompt_tokens=10",
                                          "sample.max_new_tokens=5", "sample.n=1"]))
    assert from_test["samples"][0]["prompt_tokens"] == 10


def test_sample_music_writes_midi_music21_reads(tmp_path):
    import music21

    from test_music import write_piece

    folder = tmp_path / "midi"
    folder.mkdir()
    for i in range(6):
        write_piece(folder / f"p{i}.mid", seed=i)
    base = [f"data.root={tmp_path / 'data'}", "domain=music", "domain.source=files"]
    prepare(compose("prepare", base + [f"domain.files={folder}"]))
    train(compose("train", base + TINY + ["model=shortcut", "train.max_steps=30"]), tmp_path / "r")
    record = sample(compose("sample", [f"run_dir={tmp_path / 'r'}", "sample.n=2", "sample.max_new_tokens=60",
                                       f"sample.prompt={folder / 'p0.mid'}"]))
    for entry in record["samples"]:
        mid = tmp_path / "r" / "samples" / entry["files"][0]
        assert mid.suffix == ".mid" and (tmp_path / "r" / "samples" / entry["files"][1]).suffix == ".png"
        music21.converter.parse(str(mid))  # a MIDI file music21 opens


@pytest.mark.parametrize("tokenizer", ["mulaw", "kmeans"])
def test_sample_audio_writes_wav(tmp_path, tokenizer):
    from test_audio import sound

    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(6):
        sf.write(folder / f"{100 + i}-1-0001.wav", np.concatenate([sound("tone", 0.5, 16000, i),
                                                                   sound("chirp", 0.5, 16000)]), 16000)
    base = [f"data.root={tmp_path / 'data'}", "domain=audio", "domain.source=files", f"domain.tokenizer={tokenizer}",
            "domain.codebook_size=16"]
    prepare(compose("prepare", base + [f"domain.files={folder}"]))
    train(compose("train", base + TINY + ["train.max_steps=10"]), tmp_path / "r")
    record = sample(compose("sample", [f"run_dir={tmp_path / 'r'}", "sample.n=1", "sample.max_new_tokens=50",
                                       f"sample.prompt={folder / '100-1-0001.wav'}", "sample.prompt_seconds=0.1"]))
    wav, rate = sf.read(tmp_path / "r" / "samples" / record["samples"][0]["files"][0])
    assert rate == (8000 if tokenizer == "mulaw" else 16000) and len(wav) > 0 and np.isfinite(wav).all()


def test_other_variants_decode_without_a_cache():
    model = GPT(ModelConfig(arch="denseformer", n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)).eval()
    assert not supports_cache(model)
    full = FullForward(model)
    assert full.start(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 20)
