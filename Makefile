# The two commands of the README. Everything they need is installed by lab/bootstrap.sh.
PY := .venv/bin/python
PYTEST := .venv/bin/pytest

.PHONY: setup demo test test-unit test-cluster test-e2e lab-up lab-down bench

setup:
	bash lab/bootstrap.sh

demo: setup
	$(PY) -m phoenix_lab.demo

test: setup
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) -m unit tests

test-cluster: setup
	$(PYTEST) -m "cluster or storage" tests

test-e2e: setup
	$(PYTEST) -m e2e tests

lab-up: setup
	$(PY) -m phoenix_lab.cli up

lab-down:
	$(PY) -m phoenix_lab.cli down
