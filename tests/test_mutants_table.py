"""The planted faults of tests/mutants.py (`make mutants`) still apply to the
code: each one's piece of code stands exactly once in its file, so a rename
in the kernels cannot silently retire a mutant."""

import pytest

from mutants import MUTANTS, ROOT


@pytest.mark.level_independent
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_the_mutant_applies_once(mutant):
    assert (ROOT / mutant.path).read_text().count(mutant.old) == 1, (
        f"{mutant.id}: the piece it replaces is not found exactly once in {mutant.path}")
    for path in mutant.tests:
        assert (ROOT / path).exists(), f"{mutant.id}: no test file {path}"
    if mutant.first:  # the test known to catch it: test_file.py::test_function
        file, _, function = mutant.first.partition("::")
        assert f"def {function}(" in (ROOT / "tests" / file).read_text(), f"{mutant.id}: no test {mutant.first}"
