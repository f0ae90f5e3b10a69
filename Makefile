# shortcut: common jobs. `make help` lists them.
PY ?= python3

.PHONY: help install test test-all
help:
	@echo "make install   install shortcut and its test dependencies (editable)"
	@echo "make test      the default test suite (what CI runs)"
	@echo "make test-all  also the slow tests"

install:
	$(PY) -m pip install -e '.[dev]'

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m ''
