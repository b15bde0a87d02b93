# The two commands of the README. Everything they need is installed by lab/bootstrap.sh.
PY := .venv/bin/python
PYTEST := .venv/bin/pytest

.PHONY: setup demo test test-all test-soak test-user-image test-upgrade test-storage-all test-s3-all test-unit test-cluster test-e2e lab-up lab-down bench

setup:
	bash lab/bootstrap.sh

# KEEP_LAB=1 leaves the demo's lab running afterwards (it shares the cores with what follows)
demo: setup
	$(PY) -m phoenix_lab.demo $(if $(KEEP_LAB),--keep-lab)

# --durations: the slowest tests; tests/timing_report.py adds time by layer, by file and the
# lab's build steps at the end of every run.
test: setup
	$(PYTEST) --durations=15 tests

# Everything: the tests marked `full` as well (another test of a story `make test` covers, a
# minute or more each on the lab), and every storage, cluster and e2e test against both S3
# servers (test-s3-all); tests/conftest.py says what each tier holds.
test-all: setup
	PHOENIX_FULL=1 PHOENIX_S3_SLOW_ON_ALL=1 PHOENIX_LAB_S3_ON_ALL=1 $(PYTEST) --durations=15 tests

# Seeded random chaos schedules beyond the fixed one `make test` runs (one job through ten
# disruptions each).
test-soak: setup
	PHOENIX_CHAOS_SEEDS=$${PHOENIX_CHAOS_SEEDS:-1,2,3} $(PYTEST) -m soak tests

# examples/user-image/Dockerfile on the lab: built, imported into a node, the sample job
# preempted and resumed with the prefetch (tests/e2e/test_user_image.py; minutes, so not in
# `make test`).
test-user-image: setup
	PHOENIX_USER_IMAGE_E2E=1 $(PYTEST) tests/e2e/test_user_image.py

# docs/install.md's upgrade on the lab: the revision in tests/e2e/upgrade-from (its operator
# image built from its Dockerfile, its CRD and chart) runs a job, upgraded to this checkout
# while the job trains, then a preemption the new operator recovers
# (tests/e2e/test_upgrade.py; about 4 minutes with the lab's images cached, so not in
# `make test`).
test-upgrade: setup
	PHOENIX_UPGRADE_E2E=1 $(PYTEST) tests/e2e/test_upgrade.py

test-unit:
	bash lab/bootstrap.sh --no-images
	$(PYTEST) -m unit tests

# The storage layer with its slow kill-and-resume tests against both S3 servers, every seed of
# test_exact_resume.py, the 4-rank DDP resume and its `full` tier (make test runs the slow ones
# against versitygw only, one seed per loader; tests/conftest.py).
test-storage-all: setup
	PHOENIX_FULL=1 PHOENIX_S3_SLOW_ON_ALL=1 $(PYTEST) -m storage tests

# The storage, cluster and e2e layers against both S3 servers: test-storage-all's slow
# storage tests, and every cluster and e2e test on the lab's SeaweedFS too (TLS with the lab
# CA, on the lab's host address). `make test` runs them on versitygw, save the two tests
# marked all_s3_servers, which it runs on both: the e2e preempted-and-resumed sample job
# (tests/e2e/test_recovery.py) and the cluster eviction-resume test
# (tests/cluster/test_operator.py); tests/s3_selection.py.
test-s3-all: setup
	PHOENIX_S3_SLOW_ON_ALL=1 PHOENIX_LAB_S3_ON_ALL=1 $(PYTEST) --durations=15 -m "storage or cluster or e2e" tests

# One layer as make test runs it (PHOENIX_FULL=1 adds its `full` tier)
test-cluster: setup
	$(PYTEST) -m "cluster or storage" tests

test-e2e: setup
	$(PYTEST) -m e2e tests

lab-up: setup
	$(PY) -m phoenix_lab.cli up

lab-down:
	$(PY) -m phoenix_lab.cli down
