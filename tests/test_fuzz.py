"""Seeded random bad and edge-case inputs over every functional op against
its torch twin (tests/fuzz_cases.py), in a subprocess so that a crash fails
this test. BN_EXT_FUZZ_CASES sets the count (default 300)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.level_independent
@pytest.mark.parametrize("seed", [0])
def test_random_bad_inputs_behave_as_torch(seed):
    cases = int(os.environ.get("BN_EXT_FUZZ_CASES", "300"))
    run = subprocess.run([sys.executable, str(HERE / "fuzz_cases.py"), "--cases", str(cases), "--seed", str(seed)],
                         capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, f"crashed ({run.returncode}) at {lines[-1] if lines else None}:\n{run.stderr[-3000:]}"
    differs = [line for line in lines if line.get("verdict") == "differs"]
    counts = lines[-1]["counts"]
    assert sum(counts.values()) == cases
    assert not differs, "\n".join(json.dumps(d) for d in differs[:20]) + f"\n{len(differs)} of {cases} differ"
