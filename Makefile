# shortcut: common jobs. `make help` lists them.
PY ?= python3

TEXT ?= /usr/share/common-licenses/*
# A Hydra launcher for the training sweeps, e.g. LAUNCHER=slurm_gpu (SLURM via Submitit: pip install -e '.[cluster]')
LAUNCHER ?=
SWEEP = $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER))

.PHONY: help install test test-all gpu-check demo reproduce-paper reproduce-paper-cpu scaling scaling-cpu bench
help:
	@echo "make reproduce-paper      the paper's table on one GPU (downloads text8, WikiText-103, MAESTRO, LibriSpeech)"
	@echo "make reproduce-paper-cpu  the same table at CPU scale on offline data, under 30 min (TEXT='books/*.txt')"
	@echo "make scaling-cpu  compute multiplier of the shortcut on a ladder of baseline sizes, chorales, CPU (~40 min)"
	@echo "make scaling      the same at GPT-2-small scale on text8, for one GPU"
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

# On a CUDA machine: every attention implementation against the reference, then the GPU path end to end (~6 min).
gpu-check:
	$(PY) benchmarks/attn_impls.py
	$(PY) benchmarks/gpu_check.py

bench:
	$(PY) benchmarks/tokenize_audio.py
	$(PY) benchmarks/train_step.py
