"""The command line: `python -m bn_ext demo` runs and agrees with torch.nn."""

import subprocess
import sys

from bn_ext.__main__ import main


def test_demo_trains_and_matches_torch(capsys):
    assert main(["demo", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "loss bn_ext" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "bn_ext", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout
