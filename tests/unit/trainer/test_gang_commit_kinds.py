"""What a gang's failed commit is raised as: the same kind on every rank, from the worst of
the ranks' errors, so that every rank retries a final checkpoint the same number of times
(finish.Finisher._final_save) and none waits alone in a collective."""
from __future__ import annotations

import pytest

from phoenix_trainer.core.errors import CheckpointError, StorageError, SupersededError
from phoenix_trainer.distributed import _ERROR_KINDS, _error_kind, _gang_error_kind

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("error, kind", [
    (SupersededError("attempt 3 owns the phase"), "superseded"),
    (StorageError("S3 put failed"), "storage"),
    (ConnectionResetError("reset by peer"), "storage"),
    (CheckpointError("entry 'x' cannot be loaded"), "other"),
    (ValueError("bad"), "other"),
])
def test_a_ranks_error_kind(error, kind):
    assert _error_kind(error) == kind


@pytest.mark.parametrize("kinds, raised", [
    (["storage", "storage"], StorageError),  # only then is it waited out
    (["storage", "other"], CheckpointError),
    (["other", "superseded", "storage"], SupersededError),  # never retried
])
def test_the_gangs_kind_is_the_worst_of_its_ranks(kinds, raised):
    assert _ERROR_KINDS[_gang_error_kind(kinds)] is raised
