"""The mutation check (tests/mutations.py) stays runnable: every planted bug still finds its one place in the
source, so a refactor cannot silently turn a mutation into a no-op."""

import pytest

from tests import mutations


@pytest.mark.parametrize("name,file,old,new,tests", mutations.MUTATIONS, ids=[m[0] for m in mutations.MUTATIONS])
def test_every_planted_bug_still_applies(name, file, old, new, tests):
    assert mutations.applies(file, old), f"{name}: {old!r} is not exactly once in {file}"
    assert new != old
    for t in tests:
        assert (mutations.ROOT / t.split("::")[0]).is_file(), f"{name}: {t} does not exist"
