"""`make gpu-check`: everything a GPU can check, in one command and one JSON.

Builds bn_ext for the GPU at hand (its compute capability alone, so the build
is short), runs the CUDA tests (tests/test_cuda.py on the device, the
emulated twins and the build checks beside them) and
`python -m bn_ext bench --device cuda --quick`, and writes gpu-check.json
into the output folder: the GPU's name, every test's result, the bench table.
Without a GPU it does what it can: the build, the emulated tests, and a
summary that says the device tests were skipped and why. Exits non-zero when
the build or any test fails."""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_cuda.py", "tests/test_cuda_emulated.py", "tests/test_cuda_build.py"]
BENCH_TIMEOUT_S = 240


def gpu_facts():
    import torch

    if not torch.cuda.is_available():
        return {"present": False, "devices": [], "reason": "torch.cuda.is_available() is False"}
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                        "multiprocessors": p.multi_processor_count})
    return {"present": True, "devices": devices}


# Wheels `make gpu-wheels` downloads here, for a GPU machine with no network
# whose Python lacks them (the build needs CMake).
WHEELS = ROOT / "gpu_check_wheels"


def with_cmake(env, log):
    """env in which setup.py finds the cmake pip package: the Python's own,
    else the wheel in WHEELS installed into build/gpu-tools."""
    if subprocess.run([sys.executable, "-c", "from cmake import CMAKE_BIN_DIR"], env=env, capture_output=True).returncode == 0:
        return env
    tools = ROOT / "build" / "gpu-tools"
    wheels = sorted(WHEELS.glob("cmake-*.whl"))
    if wheels and not (tools / "cmake").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(tools), str(wheels[-1])], stdout=log, stderr=subprocess.STDOUT)
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(tools), env.get("PYTHONPATH")])))


def build(gpu, log):
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    env = with_cmake(env, log)
    if gpu["present"]:
        env["BN_EXT_WITH_CUDA"] = "1"
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted({d["capability"] for d in gpu["devices"]}))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    return {"ok": done.returncode == 0, "seconds": round(time.monotonic() - start, 1),
            "arch_list": env.get("TORCH_CUDA_ARCH_LIST")}


def run_tests(out, log):
    report = out / "junit.xml"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *TESTS], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    cases = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or "")[:500]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time", 0)), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"exit_code": done.returncode, "seconds": round(time.monotonic() - start, 1), **counts, "cases": cases}


def run_bench(out, gpu, log):
    if not gpu["present"]:
        return {"ran": False, "reason": "no CUDA device"}
    folder = out / "bench"
    try:
        done = subprocess.run([sys.executable, "-m", "bn_ext", "bench", "--device", "cuda", "--quick", "--output",
                               str(folder)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ran": False, "reason": f"bench ran past {BENCH_TIMEOUT_S} s"}
    table = folder / "bench.json"
    if done.returncode != 0 or not table.exists():
        return {"ran": False, "reason": f"bench exited with {done.returncode}; see gpu-check.log"}
    return {"ran": True, "results": json.loads(table.read_text())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu_check_results", help="folder for gpu-check.json and the logs")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    gpu = gpu_facts()
    import torch

    summary = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "cpu": platform.processor() or platform.machine()}
    with open(out / "gpu-check.log", "w") as log:
        summary["build"] = build(gpu, log)
        if summary["build"]["ok"]:
            summary["tests"] = run_tests(out, log)
            summary["bench"] = run_bench(out, gpu, log)
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    tests = summary.get("tests", {})
    print(f"gpu-check: GPU {', '.join(d['name'] for d in gpu['devices']) or 'none'}; build "
          f"{'ok' if summary['build']['ok'] else 'FAILED'}; tests {tests.get('passed', 0)} passed, "
          f"{tests.get('failed', 0) + tests.get('error', 0)} failed, {tests.get('skipped', 0)} skipped; bench "
          f"{'ran' if summary.get('bench', {}).get('ran') else 'not run'}; {summary['seconds']} s; "
          f"summary in {out / 'gpu-check.json'}")
    ok = summary["build"]["ok"] and tests.get("exit_code") == 0 and (not gpu["present"] or summary["bench"]["ran"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
