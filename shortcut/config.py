"""Typed, validated configuration for every command.

Hydra composes YAML from conf/ onto these dataclasses (its structured-config schemas), so a wrong type, an unknown
key or a bad choice fails at composition; cross-field checks live in ``__post_init__``.
"""

from __future__ import annotations

import difflib
import enum
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

from omegaconf import MISSING


class UserError(Exception):
    """A problem the user can fix (bad input, missing data); reported in one line, without a traceback."""


class Arch(enum.StrEnum):
    """How later layers read earlier ones (one paper each; code in shortcut/model.py and shortcut/variants/)."""
    baseline = "baseline"  # GPT-2: each block reads only the residual stream
    shortcut = "shortcut"  # Verma & Pilanci 2024: the final block attends over (layer, position)
    denseformer = "denseformer"  # Pagliardini et al. 2024: a depth-weighted average after every block
    connect_last = "connect_last"  # the same paper's ablation: one depth-weighted average, after the last block
    attnres = "attnres"  # Kimi Team 2026: each layer's input is a softmax over earlier layer outputs
    mudd = "mudd"  # Xiao et al. 2025: per-position dynamic dense weights for the q, k, v and residual streams
    value_residual = "value_residual"  # Zhou et al. 2024 (ResFormer): every layer's values mix in the first's
    hyper = "hyper"  # Zhu et al. 2024 (Hyper-Connections): n residual streams, learned width and depth connections
    mhc = "mhc"  # Xie et al. 2025 (DeepSeek, mHC): the same, the stream mix projected onto doubly stochastic matrices
    moda = "moda"  # Zhu et al. 2026: one softmax over the layer's sequence keys and earlier layers' keys at the position
    laurel = "laurel"  # Menghani et al. 2025 (LAuReL): every residual x + f(x) becomes alpha·f(x) + g(x, earlier x)


class LaurelMode(enum.StrEnum):
    """Which LAuReL residual g replaces x in x + f(x) (Menghani et al. 2025, Section 2; shortcut/variants/laurel.py)."""
    rw = "rw"  # residual weights: alpha·f(x_i) + beta·x_i
    lr = "lr"  # low rank (with RW): alpha·f(x_i) + beta·(x_i + B·A·x_i)
    pa = "pa"  # previous activations (with RW): alpha·f(x_i) + beta·x_i + B·A·sum_{j<i} gamma_ij·x_j


class PosEmb(enum.StrEnum):
    learned = "learned"  # GPT-2: a learned table added to the token embeddings (wpe)
    rope = "rope"  # rotary embeddings on queries and keys (Su et al. 2021), no table


class Norm(enum.StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class MLPKind(enum.StrEnum):
    gelu = "gelu"  # GPT-2: W2·gelu(W1·x)
    swiglu = "swiglu"  # Shazeer 2020: W2·(silu(W1·x) * W3·x), hidden 8/3·n_embd so parameters match gelu's


class FeatureMap(enum.StrEnum):
    mlp = "mlp"  # h + W2·gelu(W1·LN(h)), W2 zero-initialised
    linear = "linear"  # h + W·h, W zero-initialised
    none = "none"  # h


class ShortcutMode(enum.StrEnum):
    """How a shortcut block uses its depth-and-context attention (issue 13)."""
    replace = "replace"  # the paper's reading: it replaces the block's causal self-attention
    add = "add"  # a second branch beside the kept self-attention, its output projection zero-initialised


class TapBias(enum.StrEnum):
    """A learned per-head logit bias per tap, added to the depth-and-context scores (issue 13)."""
    none = "none"  # no bias: at init the softmax spreads over all K·(t+1) keys
    last = "last"  # initialised so that the deepest tap a block reads holds ~99.5% of the mass at step 0


class ExitPolicy(enum.StrEnum):
    """Which early-exit curves `shortcut eval` measures (issue 12)."""
    none = "none"
    fixed = "fixed"  # every token exits at depth d, for each d
    confidence = "confidence"  # each token at the first depth whose top probability reaches a threshold
    both = "both"


class DecodeExit(enum.StrEnum):
    """How `shortcut sample` chooses each new token's depth (issue 21)."""
    none = "none"  # every block, every token
    confidence = "confidence"  # the first exit depth whose top probability reaches sample.exit_threshold


class MatchBy(enum.StrEnum):
    width = "width"
    depth = "depth"


class TextSource(enum.StrEnum):
    text8 = "text8"
    wikitext103 = "wikitext103"
    files = "files"


class TextTokenizer(enum.StrEnum):
    char = "char"
    byte = "byte"


class MusicSource(enum.StrEnum):
    music21 = "music21"  # the corpus inside the music21 wheel (offline)
    maestro = "maestro"
    files = "files"


class MusicTokenizer(enum.StrEnum):
    REMI = "REMI"
    TSD = "TSD"
    MIDILike = "MIDILike"
    Structured = "Structured"


class AudioSource(enum.StrEnum):
    espeak = "espeak"  # speech synthesised offline with eSpeak NG
    librispeech = "librispeech"
    files = "files"


class AudioTokenizer(enum.StrEnum):
    mulaw = "mulaw"  # 8-bit mu-law samples
    kmeans = "kmeans"  # log-mel frames quantised by a k-means codebook
    encodec = "encodec"  # EnCodec 24 kHz codes (needs transformers and the hub weights)


class OnError(enum.StrEnum):
    skip = "skip"  # an unreadable or missing input is left out, counted and named in the summary and meta.json
    fail = "fail"  # stop at the first one, naming it


class Duplicates(enum.StrEnum):
    refuse = "refuse"  # two runs of one (dataset, variant, seed): stop and list them
    newest = "newest"  # keep the one that finished last


class RowOrder(enum.StrEnum):
    """How compare orders the rows of a dataset's table."""
    variant = "variant"  # the baseline first, then by variant label
    multiplier = "multiplier"  # highest compute multiplier first, then the ladder by training compute


class WandbMode(enum.StrEnum):
    off = "off"
    offline = "offline"
    online = "online"


# WANDB_MODE's values (W&B's own names) -> ours.
_WANDB_ENV = {"disabled": WandbMode.off, "off": WandbMode.off, "offline": WandbMode.offline,
              "dryrun": WandbMode.offline, "online": WandbMode.online, "run": WandbMode.online}


def wandb_mode(configured: WandbMode | str) -> WandbMode:
    """The W&B mode a run uses: WANDB_MODE from the environment when it is set, else the config's wandb.mode.
    W&B users switch logging off (WANDB_MODE=disabled) or offline for a whole session with it and expect it to win
    (issue 19); wandb itself lets a mode passed to wandb.init win, so we decide here, not it."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return WandbMode(configured)
    if env not in _WANDB_ENV:
        raise UserError(f"WANDB_MODE={env!r} is not one of {', '.join(_WANDB_ENV)}; unset it to use wandb.mode")
    return _WANDB_ENV[env]


class Device(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(enum.StrEnum):
    auto = "auto"  # bfloat16 autocast on CUDA, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {why}")


def unknown_key(key: str, known) -> str:
    """One line for a key no schema knows, naming the closest known key where one is close."""
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key {key}: did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f"unknown key {key}: {prefix or 'the config'} has no such setting (--cfg job lists them)"


def check_known_keys(cfg, prefix: str = "") -> None:
    """Refuse every key its schema does not know. Hydra's `+key=value` adds a key even to a typed node, and
    OmegaConf.to_object keeps it as a stray attribute that nothing reads: the run would silently ignore it while
    its config.yaml records it (issue 19)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig) or cfg._is_none() or cfg._is_missing() or cfg._is_interpolation():
        return
    schema = OmegaConf.get_type(cfg)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in cfg:
        if not prefix and key == "hydra":  # Hydra's own node, when a caller asked for it
            continue
        if known is not None and key not in known:
            raise UserError(unknown_key(f"{prefix}{key}", known))
        check_known_keys(cfg._get_node(key), f"{prefix}{key}.")


@dataclass
class DataConfig:
    root: str = "data"  # where prepared corpora live: <root>/<domain>/<source>/


@dataclass
class PrepareConfig:
    """How `shortcut prepare` runs: never what it writes (the corpus and its hash do not depend on these)."""
    workers: Optional[int] = None  # processes decoding and tokenizing; None: all cores
    max_memory_mb: int = 2048  # peak memory the prepare aims to stay under, whatever the corpus size

    def __post_init__(self) -> None:
        _check(self.workers is None or self.workers >= 1, "prepare.workers", "must be at least 1 (or null: all cores)")
        _check(self.max_memory_mb >= 256, "prepare.max_memory_mb", "must be at least 256")


@dataclass
class TextDomain:
    name: str = "text"
    source: TextSource = TextSource.files
    files: Optional[str] = None  # source=files: a glob (or several, comma-separated) of UTF-8 text files
    path: Optional[str] = None  # text8: text8.zip or text8; wikitext103: folder with wiki.{train,valid,test}.raw
    tokenizer: TextTokenizer = TextTokenizer.char
    val_frac: float = 0.05  # source=files: fraction of the characters held out for validation (taken after train)
    test_frac: float = 0.05  # source=files: fraction held out for test (the end of the text)
    on_error: OnError = OnError.skip  # a non-UTF-8 or binary file: skip it (named in meta.json) or stop

    def __post_init__(self) -> None:
        _check(self.name == "text", "domain.name", "must be 'text' for the text domain")
        _check(0 < self.val_frac < 1 and 0 < self.test_frac < 1, "domain.val_frac/test_frac", "must be in (0, 1)")
        _check(self.val_frac + self.test_frac < 0.5, "domain.val_frac + domain.test_frac", "must stay below 0.5")


@dataclass
class MusicDomain:
    name: str = "music"
    source: MusicSource = MusicSource.music21
    collection: str = "bach"  # source=music21: "bach" (the ~370 chorales), "essenFolksong", or another corpus folder
    max_pieces: Optional[int] = None  # at most this many pieces (first by name; music21: of the first this many
    # corpus files, which for an opus like an Essen .abc file hold hundreds of songs); None: all
    files: Optional[str] = None  # source=files: a glob or folder of .mid/.midi files
    path: Optional[str] = None  # source=maestro: the MIDI-only zip or its extracted folder (default: download)
    tokenizer: MusicTokenizer = MusicTokenizer.REMI
    bpe_vocab: Optional[int] = None  # BPE to this vocabulary size, learned on the training split only
    val_frac: float = 0.1  # music21/files: share of pieces for validation (pieces are never cut)
    test_frac: float = 0.1
    pitch_range: List[int] = field(default_factory=lambda: [21, 109])  # [low, high) MIDI pitches
    beat_res: int = 8  # positions per beat for notes up to 4 beats long (half that up to 12 beats)
    use_velocities: bool = True
    num_velocities: int = 32
    use_tempos: bool = True
    num_tempos: int = 32
    use_rests: bool = False
    use_time_signatures: bool = True
    use_sustain_pedals: bool = False
    use_programs: bool = True  # one token stream for all tracks, Program tokens name the instrument
    on_error: OnError = OnError.skip  # an unreadable or missing MIDI file: skip it (named in meta.json) or stop

    def __post_init__(self) -> None:
        _check(self.name == "music", "domain.name", "must be 'music' for the music domain")
        _check(0 < self.val_frac < 1 and 0 < self.test_frac < 1, "domain.val_frac/test_frac", "must be in (0, 1)")
        _check(self.val_frac + self.test_frac < 0.5, "domain.val_frac + domain.test_frac", "must stay below 0.5")
        _check(self.max_pieces is None or self.max_pieces >= 3, "domain.max_pieces", "must be at least 3")
        _check(len(self.pitch_range) == 2 and 0 <= self.pitch_range[0] < self.pitch_range[1] <= 128,
               "domain.pitch_range", "must be [low, high) with 0 <= low < high <= 128")
        _check(self.beat_res >= 1 and self.beat_res & (self.beat_res - 1) == 0, "domain.beat_res",
               "must be a power of two (1, 2, 4, 8, ...)")
        _check(self.num_velocities >= 1 and self.num_tempos >= 1, "domain.num_velocities/num_tempos",
               "must be at least 1")
        _check(self.bpe_vocab is None or self.bpe_vocab >= 1, "domain.bpe_vocab", "must be positive")


@dataclass
class AudioDomain:
    name: str = "audio"
    source: AudioSource = AudioSource.espeak
    files: Optional[str] = None  # source=files: a glob or folder of wav/flac/ogg
    path: Optional[str] = None  # source=librispeech: a local LibriSpeech/ folder (default: download the subsets)
    # source=librispeech: the official subsets each split reads (the paper's 960 h: all three train subsets)
    train_subsets: List[str] = field(default_factory=lambda: ["train-clean-100"])
    val_subsets: List[str] = field(default_factory=lambda: ["dev-clean"])
    test_subsets: List[str] = field(default_factory=lambda: ["test-clean"])
    by_speaker: bool = False  # source=files: split by speaker (SPEAKER-CHAPTER-UTT names, else the parent folder)
    max_files: Optional[int] = None  # use at most this many files (the first by name); None: all
    val_frac: float = 0.1  # files/espeak: share of files (or speakers) for validation
    test_frac: float = 0.1
    text: Optional[str] = None  # source=espeak: a glob of text files to speak; None: built-in sentences
    voices: List[str] = field(default_factory=lambda: ["en-us", "en-gb-x-rp", "en+f3", "en-us+m2", "en+f4"])
    rates: List[int] = field(default_factory=lambda: [140, 175, 210])  # words per minute
    utterances: int = 400  # source=espeak: how many utterances to synthesise
    seed: int = 0  # source=espeak: which voice and rate speak which sentence
    tokenizer: AudioTokenizer = AudioTokenizer.kmeans
    sample_rate: Optional[int] = None  # None: the tokenizer's (mulaw 8000, kmeans 16000, encodec 24000)
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    codebook_size: int = 512
    kmeans_iters: int = 30
    kmeans_frames: int = 200_000  # the codebook is fitted on a uniform sample of this many training frames
    collapse_repeats: bool = False  # kmeans: merge runs of the same code into one token
    encodec_codebooks: int = 2  # encodec: codebooks per frame (2 = 1.5 kbps), flattened frame by frame
    on_error: OnError = OnError.skip  # an unreadable or missing audio file: skip it (named in meta.json) or stop

    def __post_init__(self) -> None:
        _check(self.name == "audio", "domain.name", "must be 'audio' for the audio domain")
        _check(0 < self.val_frac < 1 and 0 < self.test_frac < 1, "domain.val_frac/test_frac", "must be in (0, 1)")
        _check(self.val_frac + self.test_frac < 0.5, "domain.val_frac + domain.test_frac", "must stay below 0.5")
        _check(self.sample_rate is None or self.sample_rate >= 1000, "domain.sample_rate", "must be at least 1000 Hz")
        _check(self.codebook_size >= 2, "domain.codebook_size", "must be at least 2")
        _check(self.n_mels >= 1 and self.win_ms > 0 and 0 < self.hop_ms <= self.win_ms, "domain.n_mels/win_ms/hop_ms",
               "need n_mels >= 1 and 0 < hop_ms <= win_ms")
        _check(self.utterances >= 3, "domain.utterances", "must be at least 3")
        _check(len(self.voices) > 0 and len(self.rates) > 0, "domain.voices/rates", "must not be empty")
        _check(self.encodec_codebooks in (2, 4, 8, 16, 32), "domain.encodec_codebooks", "must be 2, 4, 8, 16 or 32")
        _check(self.max_files is None or self.max_files >= 3, "domain.max_files", "must be at least 3")
        _check(self.kmeans_frames >= 1, "domain.kmeans_frames", "must be at least 1")
        subsets = {"train": self.train_subsets, "val": self.val_subsets, "test": self.test_subsets}
        for split, names in subsets.items():
            _check(len(names) > 0, f"domain.{split}_subsets", "must name at least one LibriSpeech subset")
        named = [n for names in subsets.values() for n in names]
        _check(len(set(named)) == len(named), "domain.train_subsets/val_subsets/test_subsets",
               f"a subset is named twice: {sorted(n for n in set(named) if named.count(n) > 1)}")

    @property
    def rate(self) -> int:
        return self.sample_rate or {AudioTokenizer.mulaw: 8000, AudioTokenizer.kmeans: 16000,
                                    AudioTokenizer.encodec: 24000}[self.tokenizer]


class AttnImpl(enum.StrEnum):
    """How the shortcut's final layer computes its attention over (tap, position) pairs: the same function each time."""
    auto = "auto"  # the fastest exact one for the device (never flex on CPU); see shortcut.attention.resolve_attn_impl
    masked = "masked"  # the readable reference: one attention under a boolean (T, K*T) mask
    lse = "lse"  # one causal attention per tap (kernels skip the future half), merged exactly by log-sum-exp
    flex = "flex"  # torch flex_attention with a block mask over the (T, K*T) layout; CUDA only
    chunked = "chunked"  # CPU: the flash kernel over position-major keys, chunks of queries, skipping the future


@dataclass
class ModelConfig:
    arch: Arch = Arch.baseline
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256  # context length T
    vocab_size: Optional[int] = None  # None: taken from the prepared corpus
    dropout: float = 0.0
    bias: bool = True
    mlp_hidden: Optional[int] = None  # None: 4 * n_embd (parameter matching sets it)
    # --- shortcut only (Verma & Pilanci 2024) ---
    taps: Any = "all"  # layers the final block attends to: "all", "every_K" (every K-th, counting down from L-1), or [l, ...]
    feature_map: FeatureMap = FeatureMap.mlp
    feature_hidden: Optional[int] = None  # hidden width of the mlp feature map; None: n_embd // 2
    depth_embedding: bool = True  # learned e_l added to each tap's features
    attn_impl: AttnImpl = AttnImpl.auto  # speed only: every choice computes the same function
    shortcut_mode: ShortcutMode = ShortcutMode.replace  # replace (the paper) | add (keeps self-attention; starts
    # as the baseline: the added branch's output projection is zero at init)
    tap_bias: TapBias = TapBias.none  # none | last (per head and tap, learned; last: the deepest tap starts with
    # nearly all the mass, so replace mode too starts close to the baseline)
    shortcut_layers: int = 1  # the last N blocks use depth-and-context attention; block i (input h_i) reads the
    # taps l <= i. 1: only the final block (the paper)
    exit_train: float = 0.0  # early exit (issue 12; LayerSkip, Elhoushi et al. 2024; CALM, Schuster et al. 2022):
    # with this probability a training step also trains one exit depth d < full, drawn uniformly from (seed,
    # step) (baseline: the final norm and head on h_d; shortcut: the final block on h_d reading the taps <= d);
    # its loss is then the mean of the full model's and the exit's. 0: off (the default models are unchanged).
    # chosen: one exit a step, so the extra cost is bounded (one head, or one final block, per step)
    # --- Mixture-of-Depths routing (issue 21; Raposo et al. 2024, arXiv 2404.02258), baseline and shortcut ---
    mod_capacity: Optional[float] = None  # c: the fraction of a sequence's tokens a routed block processes
    # (training: its top c·T by router weight; evaluation and decoding: the router's own causal decision); None: dense
    mod_every: int = 2  # every k-th block is routed (blocks k-1, 2k-1, ...; the paper's best: every other one),
    # never the last block nor a shortcut block, which must see every token
    mod_aux_weight: float = 0.01  # the router's auxiliary loss (binary cross-entropy of its weight against the
    # top-k choice, the paper's section 3.5): what makes the causal decision agree with top-k. chosen: 0.01
    # --- the modern baseline, for every arch (the shortcut included); the defaults are GPT-2's ---
    pos: PosEmb = PosEmb.learned  # learned | rope (chosen: theta 10000, rotate-half pairs, on every attention)
    norm: Norm = Norm.layernorm  # layernorm | rmsnorm (every norm of the model, the feature maps' too)
    mlp: MLPKind = MLPKind.gelu  # gelu | swiglu (the blocks' MLPs; the shortcut's feature maps stay gelu)
    # --- denseformer / connect_last (Pagliardini et al. 2024, arXiv 2402.02622) ---
    dwa_dilation: int = 1  # the paper's k: block i's average reads the outputs j <= i with (i - j) % k == 0
    dwa_period: int = 1  # the paper's p: an average after every p-th block only (denseformer)
    # --- attnres (Kimi Team 2026, arXiv 2603.15031) ---
    attnres_block: Optional[int] = None  # Block AttnRes: S sublayers per block (attention and MLP count one
    # each; the paper's S, its 54-layer model uses 12); None: Full AttnRes (every sublayer output a source)
    # --- value_residual (Zhou et al. 2024, arXiv 2410.17897) ---
    value_residual_init: float = 0.5  # lambda_2, the first layer's values' weight at init (own values: 1 - it);
    # chosen: 0.5, the paper's ResFormer U_n = A_n (V_n + V_1) / 2, learned from there; 0 starts as the baseline
    # --- hyper / mhc (Zhu et al. 2024, arXiv 2409.19606; Xie et al. 2025, arXiv 2512.24880) ---
    hc_streams: int = 4  # n, the residual streams (both papers' expansion rate; 4 their default). hyper takes 1
    # (the HC paper's HC x1 ablation: learned scalars on one residual); mhc needs 2 or more
    hc_dynamic: bool = True  # input-dependent connections (HC's DHC; mHC's alpha·(x·phi) terms); false: static
    # ones only (HC's SHC; mHC with its biases b alone)
    mhc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp iterations projecting H_res (the mHC paper's t_max = 20)
    # --- moda (Zhu et al. 2026, arXiv 2603.15619) ---
    moda_ffn_kv: bool = True  # each FFN also writes a key/value pair (a KV projection of its input) for later
    # layers: the paper's default (Table 3 row 4); false: only the attention layers' own keys/values (row 3, no
    # new parameters)
    # --- laurel (Menghani et al., ICML 2025, arXiv 2411.07501) ---
    laurel: LaurelMode = LaurelMode.lr  # rw | lr | pa (chosen default: lr, RW+LR)
    laurel_rank: int = 4  # r of the low-rank maps B·A (lr and pa); chosen: 4 (+0.1% parameters at GPT-2 small)
    # --- parameter matching: grow this model until its parameter count matches another arch's ---
    match_params: Optional[Arch] = None  # e.g. arch=baseline match_params=shortcut (or mudd, attnres, ...)
    match_by: MatchBy = MatchBy.width

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _check(getattr(self, key) >= 1, f"model.{key}", "must be at least 1")
        _check(self.n_embd % self.n_head == 0, "model.n_embd",
               f"{self.n_embd} is not divisible by model.n_head={self.n_head}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.vocab_size is None or self.vocab_size >= 2, "model.vocab_size", "must be at least 2")
        _check(self.mlp_hidden is None or self.mlp_hidden >= 1, "model.mlp_hidden", "must be at least 1")
        _check(self.feature_hidden is None or self.feature_hidden >= 1, "model.feature_hidden", "must be at least 1")
        _check(self.match_params != self.arch, "model.match_params", "must name an arch other than model.arch")
        self.tap_layers()  # validates taps
        _check(0.0 <= self.exit_train <= 1.0, "model.exit_train", "must be a probability in [0, 1]")
        _check(self.exit_train == 0 or self.arch in ("baseline", "shortcut"),
               "model.exit_train", f"early exit is built for model=baseline and model=shortcut, not {self.arch}")
        _check(isinstance(self.shortcut_layers, int) and 1 <= self.shortcut_layers <= self.n_layer,
               "model.shortcut_layers", f"must be in 1..model.n_layer={self.n_layer}")
        _check(self.exit_train == 0 or len(self.exit_depths()) >= 2, "model.exit_train",
               f"this {self.arch} model has no exit depth below its full depth (n_layer={self.n_layer}, "
               f"taps={self.taps}); use more layers or a shallower tap, or exit_train=0")
        first = self.n_layer - self.shortcut_layers  # the first shortcut block reads taps l <= first
        _check(min(self.tap_layers()) <= first, "model.shortcut_layers",
               f"block {first}, the first of the last {self.shortcut_layers}, reads the taps at or below its input "
               f"layer {first}, and model.taps={self.tap_layers()} has none; lower it or add a tap <= {first}")
        for key, choices in (("arch", Arch), ("attn_impl", AttnImpl), ("pos", PosEmb), ("norm", Norm),
                             ("mlp", MLPKind), ("shortcut_mode", ShortcutMode), ("tap_bias", TapBias),
                             ("laurel", LaurelMode)):
            try:  # a plain string (Python callers, tests) becomes the enum
                setattr(self, key, choices(getattr(self, key)))
            except ValueError:
                raise ValueError(f"model.{key}: {getattr(self, key)!r} is not one of {', '.join(choices)}") from None
        _check(self.mod_capacity is None or 0 < self.mod_capacity <= 1, "model.mod_capacity",
               "must be a fraction in (0, 1], or null for a dense model")
        _check(self.mod_every >= 1, "model.mod_every", "must be at least 1")
        _check(self.mod_aux_weight >= 0, "model.mod_aux_weight", "must be >= 0")
        if self.mod_capacity is not None:
            _check(self.arch in ("baseline", "shortcut"), "model.mod_capacity",
                   f"routing is built for model=baseline and model=shortcut, not {self.arch}")
            _check(self.exit_train == 0, "model.mod_capacity",
                   "routing and early exits (model.exit_train) do not compose here: choose one")
            _check(len(self.routed_blocks()) > 0, "model.mod_every",
                   f"routes no block of this {self.n_layer}-layer model (never the last block nor a shortcut "
                   f"block); lower it or add layers")
        _check(self.dwa_dilation >= 1, "model.dwa_dilation", "must be at least 1")
        _check(1 <= self.dwa_period <= self.n_layer, "model.dwa_period", f"must be in 1..model.n_layer={self.n_layer}")
        _check(self.attnres_block is None or self.attnres_block >= 1, "model.attnres_block",
               "must be at least 1 (sublayers per block), or null for Full AttnRes")
        _check(0.0 <= self.value_residual_init <= 1.0, "model.value_residual_init", "must be in [0, 1]")
        _check(self.hc_streams >= 1, "model.hc_streams", "must be at least 1")
        _check(self.hc_streams >= 2 or self.arch != Arch.mhc, "model.hc_streams",
               "mhc needs at least 2 streams (with one, H_res is the constant 1); model=hyper takes 1")
        _check(self.mhc_sinkhorn_iters >= 1, "model.mhc_sinkhorn_iters",
               "must be at least 1 (the paper's 20): without an iteration H_res is not doubly stochastic")
        _check(isinstance(self.laurel_rank, int) and self.laurel_rank >= 1
               and (self.arch != Arch.laurel or self.laurel_rank <= self.n_embd), "model.laurel_rank",
               f"must be in 1..model.n_embd={self.n_embd}")
        _check(self.pos != PosEmb.rope or (self.n_embd // self.n_head) % 2 == 0, "model.pos",
               f"rope needs an even head size (n_embd / n_head = {self.n_embd // self.n_head})")

    @property
    def d_mlp(self) -> int:
        """MLP hidden width: 4·n_embd for gelu; for swiglu 8/3·n_embd, so its three matrices hold gelu's 8·n_embd²."""
        return self.mlp_hidden or (4 * self.n_embd if self.mlp == MLPKind.gelu else (8 * self.n_embd + 1) // 3)

    @property
    def d_feature(self) -> int:
        return self.feature_hidden or max(1, self.n_embd // 2)

    def shortcut_taps(self) -> dict[int, list[int]]:
        """Block i (0-based; it reads h_i, the output of block i-1, h_0 the embeddings) -> the taps its
        depth-and-context attention reads: every tap l <= i, for each of the last shortcut_layers blocks."""
        L, taps = self.n_layer, self.tap_layers()
        return {i: [l for l in taps if l <= i] for i in range(L - self.shortcut_layers, L)}

    def routed_blocks(self) -> list[int]:
        """The blocks Mixture-of-Depths routes (model.mod_capacity): every mod_every-th, k-1, 2k-1, ..., except the
        last block and the shortcut blocks (they must see every token); [] for a dense model."""
        if self.mod_capacity is None:
            return []
        k, last = self.mod_every, self.n_layer - 1
        shortcut = self.shortcut_taps() if self.arch == Arch.shortcut else {}
        return [i for i in range(k - 1, last, k) if i not in shortcut]

    def exit_depths(self) -> list[int]:
        """The depths d (blocks run before the exit) an early exit can use, the full depth last: baseline 1..L
        (the head on h_d); shortcut 1..L-1 (the final block on h_d, which needs a tap <= d; L-1 is the full model)."""
        if self.arch == Arch.shortcut:
            return [d for d in range(1, self.n_layer) if d >= min(self.tap_layers())]
        return list(range(1, self.n_layer + 1))

    def tap_layers(self) -> list[int]:
        """The layers l (0 = embeddings, l = output of block l) whose outputs the final block attends to."""
        L, taps = self.n_layer, self.taps
        if isinstance(taps, str) and taps == "all":
            return list(range(L))
        if isinstance(taps, str) and taps.startswith("every_") and taps[6:].isdigit() and int(taps[6:]) >= 1:
            return sorted(range(L - 1, -1, -int(taps[6:])))
        if isinstance(taps, (list, tuple)):
            layers = list(taps)
            _check(len(layers) > 0, "model.taps", "the list is empty")
            _check(all(isinstance(l, int) and 0 <= l < L for l in layers), "model.taps",
                   f"{layers} must hold layer indices in 0..{L - 1} (0 = embeddings)")
            _check(len(set(layers)) == len(layers), "model.taps", f"{layers} repeats a layer")
            return sorted(layers)
        raise ValueError(f"model.taps: {taps!r} is not 'all', 'every_K' (K >= 1) or a list like [0,2,3]")


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine ends here
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on weights with dim >= 2 only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 32  # fixed validation windows of block_size tokens, the same for every run
    ckpt_every: int = 200
    keep_ckpts: int = 2  # latest checkpoints kept in ckpt/
    resume: Optional[bool] = None  # None: resume when the run dir has a checkpoint
    device: Device = Device.auto
    precision: Precision = Precision.auto
    compile: bool = False  # torch.compile (CUDA only)
    # Data-parallel processes for one run: `shortcut train train.nproc=N` launches torchrun (NCCL on GPUs, gloo on
    # CPUs). The step's batch (batch_size x grad_accum windows) is split over them, so N changes speed, not results.
    nproc: int = 1
    # Compute-matched training: spend a fixed number of training FLOPs, with the run's own full warmup + cosine.
    flops_budget: Optional[float] = None  # total training FLOPs; sets max_steps = budget / FLOPs per step
    match_flops: Optional[str] = None  # a model choice (e.g. baseline): spend what it spends in max_steps steps

    def __post_init__(self) -> None:
        _check(self.flops_budget is None or self.flops_budget > 0, "train.flops_budget", "must be positive")
        _check(self.flops_budget is None or self.match_flops is None, "train.flops_budget",
               "set train.flops_budget or train.match_flops, not both")
        for key in ("max_steps", "batch_size", "grad_accum", "nproc", "log_every", "eval_every", "eval_windows",
                    "ckpt_every", "keep_ckpts"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be at least 1")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", f"must be in [0, train.lr={self.lr}]")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline  # offline writes under <run dir>/wandb; `wandb sync` uploads later
    project: str = "shortcut"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    split: str = "test"
    max_tokens: Optional[int] = None  # None: the whole split
    # Sliding window: each window of block_size tokens scores only its last `stride` targets (the first window
    # scores all), so every scored token after the first window has >= block_size - stride tokens of context.
    # None: block_size // 2. stride = block_size gives non-overlapping windows (mean context ~ block_size / 2).
    stride: Optional[int] = None
    batch_size: int = 16
    device: Device = Device.auto
    audit: bool = True  # depth audit (shortcut) and logit lens (both) under <run dir>/audit/
    audit_sequences: int = 32  # fixed validation windows the audit measures
    audit_seq_len: Optional[int] = None  # tokens per audit window; None: block_size
    audit_plots: int = 3  # windows drawn in depth_profile.png
    audit_plot_tokens: int = 64  # tokens per drawn window
    # Early exit (issue 12): fixed (every token exits at depth d, each d), confidence (a token exits at the first
    # depth whose prediction's top probability reaches a threshold, its state copied upward, as in CALM), both.
    # Written to <run dir>/audit/exit_curve.json and .png, and eval.json's "exit".
    exit: ExitPolicy = ExitPolicy.none
    exit_thresholds: list = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    exit_max_tokens: Optional[int] = None  # the exit curves score the first of the eval's targets, at most this
    # many (and at most max_tokens; None: the eval's own): one pass per threshold
    # Decoding speeds (issue 21), eval.json's "decode": greedy, one sequence, from the split's first block_size // 2
    # tokens: plain (KV cache), exit decoding at decode_threshold and speculative decoding drafting at depth
    # decode_draft (None: the middle exit depth), for the models with exits. 0: not measured.
    decode_tokens: int = 0
    decode_threshold: float = 0.9
    decode_draft: Optional[int] = None
    decode_draft_tokens: int = 4
    # Robustness (issue 23, shortcut.robustness): besides the in-domain split, score the model with each context
    # token replaced, with probability p, by another token drawn uniformly (the targets stay clean), for each p of
    # `noise` (eval.noise=0.05,0.2), and on each shifted source of `shift` (eval.shift='collection=essenFolksong':
    # the run's domain settings with these source keys changed, or a prepared corpus folder; several joined by ";"),
    # tokenized with the run's own tokenizer. Written to eval.json's "conditions".
    noise: List[float] = field(default_factory=list)
    noise_seed: int = 0  # which tokens are replaced, and by what: the same for every model, so rows pair
    shift: Any = field(default_factory=list)  # a string (";"-separated) or a list of strings
    robust_max_tokens: Optional[int] = None  # each condition scores the first this many targets of its split
    # (and at most max_tokens; None: the eval's own), so the in-domain condition is eval.json's NLL

    def __post_init__(self) -> None:
        if isinstance(self.shift, str):
            self.shift = [s.strip() for s in self.shift.split(";") if s.strip()]
        _check(isinstance(self.shift, (list, tuple)) and all(isinstance(s, str) and s.strip() for s in self.shift),
               "eval.shift", "must be a string of domain settings (eval.shift='collection=essenFolksong'), a "
               "prepared corpus folder, or a list of them")
        self.shift = [s.strip() for s in self.shift]
        _check(len(set(self.shift)) == len(self.shift), "eval.shift", "names the same shift twice")
        _check(all(0 <= p <= 1 for p in self.noise), "eval.noise", "must be probabilities in [0, 1]")
        _check(len(set(self.noise)) == len(self.noise), "eval.noise", "names the same probability twice")
        _check(self.robust_max_tokens is None or self.robust_max_tokens >= 1, "eval.robust_max_tokens",
               "must be at least 1")
        try:
            self.exit = ExitPolicy(self.exit)
        except ValueError:
            raise ValueError(f"eval.exit: {self.exit!r} is not one of {', '.join(ExitPolicy)}") from None
        try:
            self.exit_thresholds = sorted({float(t) for t in self.exit_thresholds})
        except (TypeError, ValueError):
            raise ValueError(f"eval.exit_thresholds: {self.exit_thresholds!r} must be a list of numbers") from None
        _check(len(self.exit_thresholds) >= 1 and all(0 < t <= 1 for t in self.exit_thresholds),
               "eval.exit_thresholds", "must be a non-empty list of probabilities in (0, 1]")
        _check(self.exit_max_tokens is None or self.exit_max_tokens >= 1, "eval.exit_max_tokens",
               "must be at least 1")
        for key in ("audit_sequences", "audit_plots", "audit_plot_tokens"):
            _check(getattr(self, key) >= 1, f"eval.{key}", "must be at least 1")
        _check(self.audit_seq_len is None or self.audit_seq_len >= 2, "eval.audit_seq_len", "must be at least 2")
        _check(self.split in ("train", "val", "test"), "eval.split", "must be train, val or test")
        _check(self.max_tokens is None or self.max_tokens >= 1, "eval.max_tokens", "must be at least 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be at least 1")
        _check(self.stride is None or self.stride >= 1, "eval.stride", "must be at least 1")
        _check(self.decode_tokens >= 0, "eval.decode_tokens", "must be >= 0 (0: no decoding speeds)")
        _check(0 < self.decode_threshold <= 1, "eval.decode_threshold", "must be a probability in (0, 1]")
        _check(self.decode_draft is None or self.decode_draft >= 1, "eval.decode_draft", "must be at least 1")
        _check(self.decode_draft_tokens >= 1, "eval.decode_draft_tokens", "must be at least 1")


@dataclass
class SampleConfig:
    n: int = 4  # samples, generated together from the same prompt
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: Optional[int] = None  # keep the k most likely tokens
    top_p: Optional[float] = None  # keep the smallest set of tokens whose probability reaches p
    seed: int = 0
    prompt: Optional[str] = None  # text: a string; music: a MIDI file; audio: a wav/flac file
    from_test: bool = False  # prime with the start of the test split instead
    prompt_tokens: int = 128  # at most this many prompt tokens (from_test, or a long prompt: its first ones)
    prompt_bars: int = 2  # music: the prompt's first bars (tokenizers with Bar tokens; else prompt_tokens)
    prompt_seconds: float = 2.0  # audio: the prompt's first seconds
    cache: bool = True  # KV cache (baseline, shortcut, moda, laurel); False: a full forward per token, to compare
    device: Device = Device.auto
    # Adaptive decoding (issue 21), baseline and shortcut with the KV cache:
    exit: DecodeExit = DecodeExit.none  # confidence: each new token stops at the
    # first exit depth whose top probability reaches exit_threshold (CALM: its state copied upward), really skipping
    exit_threshold: float = 0.9
    speculative: Optional[int] = None  # self-speculative decoding (LayerSkip): draft with the exit at this depth,
    # verify with the full model; greedy output = full-depth greedy output, sampled output distributed as its
    draft_tokens: int = 4  # drafts per round

    def __post_init__(self) -> None:
        try:
            self.exit = DecodeExit(self.exit)
        except ValueError:
            raise ValueError(f"sample.exit: {self.exit!r} is not one of {', '.join(DecodeExit)}") from None
        _check(0 < self.exit_threshold <= 1, "sample.exit_threshold", "must be a probability in (0, 1]")
        _check(self.speculative is None or self.speculative >= 1, "sample.speculative",
               "must be an exit depth (at least 1), or null")
        _check(self.draft_tokens >= 1, "sample.draft_tokens", "must be at least 1")
        _check(self.speculative is None or self.exit == DecodeExit.none, "sample.speculative",
               "drafts with a fixed exit depth: leave sample.exit=none")
        _check(self.cache or (self.speculative is None and self.exit == DecodeExit.none), "sample.cache",
               "exit and speculative decoding need the KV cache: sample.cache=true")
        for key in ("n", "max_new_tokens", "prompt_tokens", "prompt_bars"):
            _check(getattr(self, key) >= 1, f"sample.{key}", "must be at least 1")
        _check(self.temperature >= 0, "sample.temperature", "must be >= 0 (0 is greedy)")
        _check(self.top_k is None or self.top_k >= 1, "sample.top_k", "must be at least 1")
        _check(self.top_p is None or 0 < self.top_p <= 1, "sample.top_p", "must be in (0, 1]")
        _check(self.prompt_seconds > 0, "sample.prompt_seconds", "must be positive")
        _check(not (self.from_test and self.prompt), "sample.from_test", "give sample.prompt or from_test, not both")


# --- one schema per command; conf/<command>.yaml fills them ---

@dataclass
class PrepareJob:
    domain: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class TrainJob:
    seed: int = 0
    domain: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", "must be >= 0")


@dataclass
class EvalJob:
    run_dir: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    data_root: Optional[str] = None  # where the prepared corpora are now, if they moved since training


@dataclass
class SampleJob:
    run_dir: str = MISSING
    sample: SampleConfig = field(default_factory=SampleConfig)
    data_root: Optional[str] = None  # where the prepared corpora are now, if they moved since training


@dataclass
class CompareJob:
    runs: str = "runs/**"  # comma-separated globs of run dirs (or of folders above them, e.g. a sweep dir)
    variants: List[str] = field(default_factory=list)  # only these variants (model choice names); [] = all
    # The row every Δ is against: its label as the table shows it (reference='baseline model.n_embd=32'), its model
    # choice (reference=baseline_matched) or a settings_hash prefix. None: each variant against the baseline of the
    # same resolved model but its arch's own fields, trained the same way (issue 19); never one of another size.
    reference: Optional[str] = None
    name: str = "compare"  # results go to <results_root>/<name>/
    results_root: str = "results"
    duplicates: Duplicates = Duplicates.refuse
    # Fit baseline loss vs training compute over a ladder of >= 3 baseline sizes (power law + constant) and report,
    # per variant, the baseline compute that reaches its loss divided by its own compute, with a bootstrap interval.
    compute_multiplier: bool = False
    sort: RowOrder = RowOrder.variant  # variant | multiplier (with compute_multiplier=true: best first)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # the table and plots as a W&B run (offline default)

    def __post_init__(self) -> None:
        _check(self.sort != RowOrder.multiplier or self.compute_multiplier, "sort",
               "sort=multiplier orders rows by their compute multiplier: add compute_multiplier=true")


def register_schemas() -> None:
    """Make the schemas visible to Hydra's defaults lists (conf/*.yaml name them)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=PrepareJob)
    cs.store(name="train_schema", node=TrainJob)
    cs.store(name="eval_schema", node=EvalJob)
    cs.store(name="compare_schema", node=CompareJob)
    cs.store(name="sample_schema", node=SampleJob)
    # Kept out of the domain group itself so that `--help` lists only real choices; conf/domain/*.yaml extend them.
    cs.store(group="schema/domain", name="text", node=TextDomain)
    cs.store(group="schema/domain", name="music", node=MusicDomain)
    cs.store(group="schema/domain", name="audio", node=AudioDomain)
