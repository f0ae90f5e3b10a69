# shortcut: common jobs. `make help` lists them.
PY ?= python3

.PHONY: help install test test-all demo
help:
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
	shortcut train -m experiment=demo model=baseline,shortcut
	shortcut eval run_dir=runs/demo/baseline/seed0
	shortcut eval run_dir=runs/demo/shortcut/seed0
	shortcut compare runs=runs/demo name=demo
