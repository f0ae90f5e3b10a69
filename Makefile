# shortcut: common jobs. `make help` lists them.
PY ?= python3

TEXT ?= /usr/share/common-licenses/*
# A Hydra launcher for the training sweeps, e.g. LAUNCHER=slurm_gpu (SLURM via Submitit: pip install -e '.[cluster]')
LAUNCHER ?=
SWEEP = $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER))

.PHONY: help install test test-all gpu-check demo reproduce-paper reproduce-paper-cpu scaling scaling-cpu bench \
	peers peers-cpu peers-deep-cpu ablations-cpu shortcut-search shortcut-search-cpu early-exit-cpu adaptive adaptive-cpu \
	robustness-cpu
help:
	@echo "make reproduce-paper      the paper's table on one GPU (downloads text8, WikiText-103, MAESTRO, LibriSpeech)"
	@echo "make reproduce-paper-cpu  the same table at CPU scale on offline data, under 30 min (TEXT='books/*.txt')"
	@echo "make scaling-cpu  compute multiplier of the shortcut on a ladder of baseline sizes, chorales, CPU (~40 min)"
	@echo "make scaling      the same at GPT-2-small scale on text8, for one GPU"
	@echo "make peers-cpu    shortcut vs DenseFormer, AttnRes, MUDD, value residual, chorales, CPU (MODERN=1: RoPE/RMSNorm/SwiGLU)"
	@echo "make peers-deep-cpu  every peer (HC, mHC, MoDA, LAuReL too) at 12 layers vs a baseline ladder, chorales + text, CPU (~2 h)"
	@echo "make peers        the same on text8, WikiText-103, MAESTRO, LibriSpeech, 12 and 24 layers (~47 GPU-hours)"
	@echo "make shortcut-search-cpu  issue 13's grid of shortcut modes vs a baseline ladder, chorales + text, CPU (~2 h)"
	@echo "make shortcut-search      the same at GPT-2-small scale on text8, for one GPU (~5 GPU-hours)"
	@echo "make adaptive-cpu  routing, exit and speculative decoding vs dense ladders, chorales + text, CPU (~90 min measured)"
	@echo "make adaptive      the same at GPT-2-small scale on text8, for one GPU (~6 GPU-hours)"
	@echo "make early-exit-cpu  NLL vs compute of early exits, baseline (LayerSkip) and shortcut, chorales, CPU (~25 min)"
	@echo "make robustness-cpu  shifted (Essen, another text) and noisy inputs: depth use and unsafe exits, CPU (18 min measured, ≤ 45)"
	@echo "make ablations-cpu  the shortcut's own ablations (taps, feature map, depth embedding), chorales, CPU"
	@echo "make gpu-check  on a CUDA device: fused kernels, bf16 vs fp32, resume, tokens/s and MFU (< 8 min on an H200)"
	@echo "make bench     speed benchmarks (tokenization real-time factor, training throughput)"
	@echo "make demo      offline demo: Bach chorales, baseline vs shortcut, eval, comparison table (~5 min on CPU)"
	@echo "make install   install shortcut and its test dependencies (editable)"
	@echo "make test      the default test suite (what CI runs)"
	@echo "make test-all  also the slow tests"

install:
	$(PY) -m pip install -e '.[dev]'

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m ''

# The main job on the embedded default dataset (the music21 chorales ship with the music21 wheel; no network).
demo:
	shortcut prepare domain=music
	shortcut train -m experiment=demo model=baseline,shortcut seed=0,1,2
	shortcut eval run_dir=runs/demo
	shortcut compare runs=runs/demo name=demo wandb=off

# prepare -> train (multirun) -> eval -> compare. Re-running resumes: finished runs are skipped, evaluated runs too.
# A failed training job does not stop the others ("-"): compare then lists what is missing.
reproduce-paper:
	shortcut prepare -m dataset=text8,wikitext103,maestro,librispeech
	-shortcut train -m experiment=paper $(SWEEP)
	shortcut eval run_dir=runs/paper
	shortcut compare runs=runs/paper name=paper

reproduce-paper-cpu:
	shortcut prepare -m dataset=chorales,speech,text_local "domain.files='$(TEXT)'"
	-shortcut train -m experiment=paper_cpu
	shortcut eval run_dir=runs/paper_cpu eval.audit_sequences=16
	shortcut compare runs=runs/paper_cpu name=paper_cpu

# The compute multiplier: a ladder of baseline sizes (the experiment's sweep), the shortcut at the middle size.
scaling-cpu:
	shortcut prepare domain=music
	-shortcut train -m experiment=scaling_cpu
	-shortcut train -m experiment=scaling_cpu model=shortcut model.n_embd=96
	shortcut eval run_dir=runs/scaling_cpu eval.audit_sequences=8
	shortcut compare runs=runs/scaling_cpu name=scaling_cpu compute_multiplier=true

scaling:
	shortcut prepare dataset=text8
	-shortcut train -m experiment=scaling $(SWEEP)
	-shortcut train -m experiment=scaling model=shortcut model.n_embd=576 $(SWEEP)
	shortcut eval run_dir=runs/scaling
	shortcut compare runs=runs/scaling name=scaling compute_multiplier=true

# The layer-aggregation family (issue 11): every variant, the baseline and a parameter-matched baseline, plus a
# ladder of baseline widths for the compute multiplier. MODERN=1: the same on the modern baseline, in its own folder.
PEERS_MODERN = $(if $(MODERN),model.pos=rope model.norm=rmsnorm model.mlp=swiglu)
PEERS_STYLE = $(if $(MODERN),rope-rmsnorm-swiglu,learned-layernorm-gelu)

peers-cpu:
	shortcut prepare domain=music
	-shortcut train -m experiment=peers_cpu $(PEERS_MODERN)
	-shortcut train -m experiment=peers_cpu model=baseline model.n_embd=64,192 $(PEERS_MODERN)
	shortcut eval run_dir=runs/peers_cpu/$(PEERS_STYLE) eval.audit_sequences=8
	shortcut compare runs=runs/peers_cpu/$(PEERS_STYLE) name=peers_cpu-$(PEERS_STYLE) compute_multiplier=true wandb=off

peers:
	shortcut prepare -m dataset=text8,wikitext103,maestro,librispeech
	-shortcut train -m experiment=peers $(PEERS_MODERN) $(SWEEP)
	-shortcut train -m experiment=peers model=baseline model.n_layer=12 model.n_head=8 model.n_embd=512,1024 \
		$(PEERS_MODERN) $(SWEEP)
	shortcut eval run_dir=runs/peers/$(PEERS_STYLE)
	shortcut compare runs=runs/peers/$(PEERS_STYLE) name=peers-$(PEERS_STYLE) compute_multiplier=true

# One sweep per switch, each away from the default shortcut (taps=all, feature_map=mlp, depth_embedding=true).
ablations-cpu:
	shortcut prepare domain=music
	-shortcut train -m experiment=ablations_cpu model=baseline,shortcut
	-shortcut train -m experiment=ablations_cpu model=shortcut "model.taps=every_2,[0,2,3],[3]"
	-shortcut train -m experiment=ablations_cpu model=shortcut model.feature_map=linear,none
	-shortcut train -m experiment=ablations_cpu model=shortcut model.depth_embedding=false
	shortcut eval run_dir=runs/ablations_cpu eval.audit_sequences=8
	shortcut compare runs=runs/ablations_cpu name=ablations_cpu wandb=off

# Issue 13: every way of starting and placing the shortcut ({replace, add} x tap bias x taps x shortcut layers) against
# a ladder of baseline widths, one table per domain sorted by compute multiplier. The text half reads SEARCH_TEXT:
# the King James Bible (4.4 MB) where Debian's bible-kjv is installed (apt-get install bible-kjv), else TEXT.
SEARCH_TEXT ?= $(if $(shell command -v bible 2>/dev/null),data/kjv.txt,$(TEXT))
SEARCH_GRID = model=shortcut model.shortcut_mode=replace,add model.tap_bias=none,last "model.taps=all,[0,6,11]" \
	model.shortcut_layers=1,2

data/kjv.txt:
	mkdir -p data && bible -f "Gen1:1-Rev22:21" | sed 's/^[^ ]* //' > $@.tmp && mv $@.tmp $@

shortcut-search-cpu: $(filter data/kjv.txt,$(SEARCH_TEXT))
	shortcut prepare domain=music
	shortcut prepare dataset=text_local "domain.files='$(SEARCH_TEXT)'"
	-shortcut train -m experiment=shortcut_search_cpu
	-shortcut train -m experiment=shortcut_search_cpu model.n_embd=64 $(SEARCH_GRID)
	shortcut eval run_dir=runs/shortcut_search_cpu eval.max_tokens=40000 eval.audit_sequences=4
	shortcut compare runs=runs/shortcut_search_cpu name=shortcut_search_cpu compute_multiplier=true sort=multiplier \
		wandb=off

shortcut-search:
	shortcut prepare dataset=text8
	-shortcut train -m experiment=shortcut_search $(SWEEP)
	-shortcut train -m experiment=shortcut_search model.n_head=8 model.n_embd=512 $(SWEEP)
	-shortcut train -m experiment=shortcut_search model.n_head=16 model.n_embd=1024 $(SWEEP)
	-shortcut train -m experiment=shortcut_search $(SEARCH_GRID) $(SWEEP)
	shortcut eval run_dir=runs/shortcut_search
	shortcut compare runs=runs/shortcut_search name=shortcut_search compute_multiplier=true sort=multiplier

# Issue 22: every peer at 12 layers (the baseline ladder is the experiment's own sweep), then every variant at d=64.
PEERS_DEEP = baseline_matched,shortcut,denseformer,connect_last,attnres,mudd,value_residual,hyper,mhc,moda,laurel

peers-deep-cpu: $(filter data/kjv.txt,$(SEARCH_TEXT))
	shortcut prepare domain=music
	shortcut prepare dataset=text_local "domain.files='$(SEARCH_TEXT)'"
	-shortcut train -m experiment=peers_deep_cpu
	-shortcut train -m experiment=peers_deep_cpu model=$(PEERS_DEEP) model.n_embd=64
	-shortcut train -m experiment=peers_deep_cpu $(ADAPTIVE_SPARSE) model.n_embd=64
	shortcut eval run_dir=runs/peers_deep_cpu eval.max_tokens=40000 eval.audit_sequences=4
	shortcut compare runs=runs/peers_deep_cpu name=peers_deep_cpu compute_multiplier=true sort=multiplier wandb=off

# Issue 21: adaptive compute. The baseline ladder (the experiment's sweep), then the baseline, the paper's shortcut
# and issue 13's choice, dense / routed (Mixture-of-Depths) / exit-trained; decoding speeds (plain, exit, speculative)
# in every eval.json; one table per domain sorted by compute multiplier.
ADAPTIVE_SPARSE = model=shortcut "model.taps=[0,6,11]" model.shortcut_layers=2
ADAPTIVE_EVAL = eval.max_tokens=40000 eval.audit_sequences=4 eval.decode_tokens=256 eval.decode_threshold=0.5 \
	eval.decode_draft=3

adaptive-cpu: $(filter data/kjv.txt,$(SEARCH_TEXT))
	shortcut prepare domain=music
	shortcut prepare dataset=text_local "domain.files='$(SEARCH_TEXT)'"
	-shortcut train -m experiment=adaptive_cpu
	-shortcut train -m experiment=adaptive_cpu model=baseline,shortcut model.n_embd=64 model.mod_capacity=0.125
	-shortcut train -m experiment=adaptive_cpu model=baseline,shortcut model.n_embd=64 model.exit_train=0.5
	-shortcut train -m experiment=adaptive_cpu model=shortcut model.n_embd=64
	-shortcut train -m experiment=adaptive_cpu $(ADAPTIVE_SPARSE) model.n_embd=64 model.mod_capacity=null,0.125
	-shortcut train -m experiment=adaptive_cpu $(ADAPTIVE_SPARSE) model.n_embd=64 model.exit_train=0.5
	shortcut eval run_dir=runs/adaptive_cpu $(ADAPTIVE_EVAL)
	shortcut compare runs=runs/adaptive_cpu name=adaptive_cpu compute_multiplier=true sort=multiplier wandb=off

adaptive:
	shortcut prepare dataset=text8
	-shortcut train -m experiment=adaptive $(SWEEP)
	-shortcut train -m experiment=adaptive model=baseline,shortcut model.mod_capacity=0.125 $(SWEEP)
	-shortcut train -m experiment=adaptive model=baseline,shortcut model.exit_train=0.5 $(SWEEP)
	-shortcut train -m experiment=adaptive model=shortcut $(SWEEP)
	-shortcut train -m experiment=adaptive $(ADAPTIVE_SPARSE) model.mod_capacity=null,0.125 $(SWEEP)
	-shortcut train -m experiment=adaptive $(ADAPTIVE_SPARSE) model.exit_train=0.5 $(SWEEP)
	shortcut eval run_dir=runs/adaptive eval.decode_tokens=512 eval.decode_threshold=0.5 eval.decode_draft=3
	shortcut compare runs=runs/adaptive name=adaptive compute_multiplier=true sort=multiplier

# Issue 12: early exit. Plain and exit-trained baselines and shortcuts at the demo's size; fixed and confidence exits.
early-exit-cpu:
	shortcut prepare domain=music
	-shortcut train -m experiment=early_exit_cpu
	shortcut eval run_dir=runs/early_exit_cpu eval.exit=both eval.audit=false
	shortcut compare runs=runs/early_exit_cpu name=early_exit_cpu wandb=off

# Issue 23: shifted and noisy inputs, unsafe exits. The demo's models, plain and exit-trained, 3 seeds, on the chorales
# (shift: Essen folk songs, music21 wheel) and TEXT (shift: SHIFT_TEXT, Python's language reference written from the
# interpreter's own pydoc_data: offline on every CPython); noise 0.05 / 0.2; confidence exits at 0.5 / 0.7 / 0.9.
SHIFT_TEXT ?= data/python-reference.txt
ESSEN = collection=essenFolksong max_pieces=500
ROBUST_EVAL = eval.noise=0.05,0.2 eval.exit=confidence "eval.exit_thresholds=[0.5,0.7,0.9]" \
	eval.robust_max_tokens=4096 eval.exit_max_tokens=4096 eval.audit_sequences=8

data/python-reference.txt:
	mkdir -p data && $(PY) -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics[k] for k in sorted(t.topics)))" \
		> $@.tmp && mv $@.tmp $@

# The two datasets run side by side, one thread each (sizing in conf/experiment/robustness_cpu.yaml).
robustness-cpu: $(filter data/python-reference.txt,$(SHIFT_TEXT))
	shortcut prepare domain=music
	shortcut prepare dataset=text_local "domain.files='$(TEXT)'"
	-OMP_NUM_THREADS=1 shortcut train -m experiment=robustness_cpu dataset=chorales & p=$$!; \
		OMP_NUM_THREADS=1 shortcut train -m experiment=robustness_cpu dataset=text_local "domain.files='$(TEXT)'"; \
		wait $$p
	OMP_NUM_THREADS=1 shortcut eval run_dir=runs/robustness_cpu/chorales $(ROBUST_EVAL) "eval.shift='$(ESSEN)'" & \
		p=$$!; OMP_NUM_THREADS=1 shortcut eval run_dir=runs/robustness_cpu/text_local $(ROBUST_EVAL) \
		"eval.shift='files=$(SHIFT_TEXT)'"; s=$$?; wait $$p && exit $$s
	shortcut compare runs=runs/robustness_cpu name=robustness_cpu wandb=off

# On a CUDA machine: every attention implementation against the reference, then the GPU path end to end (~6 min).
gpu-check:
	$(PY) benchmarks/attn_impls.py
	$(PY) benchmarks/gpu_check.py

bench:
	$(PY) benchmarks/tokenize_audio.py
	$(PY) benchmarks/prepare_memory.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/variant_overhead.py
	$(PY) benchmarks/sample_speed.py
