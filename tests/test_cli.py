"""The command line: `python -m bn_ext demo` and `python -m bn_ext fold`."""

import copy
import math
import subprocess
import sys

import pytest
import torch
import torchvision

import bn_ext

from bn_ext.__main__ import main


def test_demo_runs_and_checks_itself(capsys):
    assert main(["demo", "--steps", "2", "--image-size", "32", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "BatchNorms: 20 before, 0 left" in out
    assert "ONNX Runtime vs folded model" in out and "result: OK" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "bn_ext", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "fold" in result.stdout


@pytest.fixture
def exported_resnet(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    return path, model, x


@pytest.mark.parametrize("example_shape", [None, "1,3,32,32"])
def test_fold_command_on_an_exported_program(exported_resnet, tmp_path, capsys, example_shape):
    path, model, x = exported_resnet
    out_path = tmp_path / "folded.pt2"
    args = ["fold", str(path), "-o", str(out_path), "--check"]
    if example_shape:
        args += ["--example-shape", example_shape]
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "20 before, 0 left" in report and "layer1.0.bn1" in report and "PASS" in report
    folded = torch.export.load(out_path)
    names = {str(n.target) for n in folded.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_command_rejects_a_bad_shape(exported_resnet, tmp_path):
    path, _, _ = exported_resnet
    with pytest.raises(SystemExit):
        main(["fold", str(path), "-o", str(tmp_path / "x.pt2"), "--example-shape", "1,three"])


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    import json

    assert main(["bench", "--quick", "--filter", "small inputs", "--output", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "geomean" in out and "LayerNorm 8x16" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["results"]) == 4 and all(r["torch_ms"] > 0 and r["bn_ext_ms"] > 0 for r in data["results"])
    # Kernel timings from the child process, as-shipped ones from this one, and the limit.
    assert all(r["shipped_torch_ms"] > 0 and r["shipped_bn_ext_ms"] > 0 and r["limit_ms"] > 0
               for r in data["results"])
    assert data["cpu_capability"] == bn_ext.cpu_capability()
    # Forward through a module keeps only O(C) statistics beyond its output.
    assert all(r["extra_bytes"] is not None and r["extra_bytes"] < 4096 for r in data["results"])
    assert data["copy_bandwidth_gbps"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # each kernel ratio repeated three times (the thirds of its rounds), and the verdict on it
    assert all(len(r["ratio_thirds"]) == 3 and min(r["ratio_thirds"]) > 0 for r in data["results"])
    assert all(r["slower"] == (max(r["ratio_thirds"]) < 1.0 or (r["compiled_ratio_thirds"] is not None and max(
        r["compiled_ratio_thirds"]) < 1.0)) for r in data["results"])
    assert "cases slower than torch eager or torch.compile in all three repeats" in out


@pytest.mark.level_independent
def test_bench_tells_a_slower_case_from_noise():
    from bn_ext import bench

    assert bench.thirds([5.0, 1.0, 2.0, 9.0, 3.0, 4.0, 7.0]) == [3.0, 5.5, 4.0]  # [5, 1], [2, 9], [3, 4, 7]
    case = dict(group="g", name="n", torch_ms=0.9, bn_ext_ms=1.0, bytes=1)
    slower = bench.Result(**case, ratio_thirds=[0.9, 0.95, 0.99])
    noise = bench.Result(**case, ratio_thirds=[0.8, 1.01, 0.9])
    behind_compile = bench.Result(**case | {"torch_ms": 1.5}, compiled_ms=0.9, ratio_thirds=[1.4, 1.5, 1.6],
                                  compiled_ratio_thirds=[0.8, 0.9, 0.95])
    assert slower.slower and not slower.noise
    assert noise.noise and not noise.slower
    assert behind_compile.slower
    assert not bench.Result(**case | {"torch_ms": 1.2}, ratio_thirds=[1.1, 1.2, 1.3]).noise


@pytest.mark.level_independent
def test_bench_counts_the_second_read_of_a_reduction_past_the_cache(monkeypatch):
    from bn_ext import bench

    x = torch.empty(1024, 256)  # 1 MiB
    assert bench.catalogue._reread(x) == 0 and bench.catalogue._reread(x, x) == 0  # within this machine's last-level cache
    monkeypatch.setattr(bench.catalogue, "last_level_cache_bytes", lambda: 1024**2 + 1)
    assert bench.catalogue._reread(x) == 0 and bench.catalogue._reread(x, x) == 2 * 1024**2  # x and dy together outgrow it
    result = bench.Result("g", "n", 2.0, 1.0, 100, limit_ms=0.5, algorithm_limit_ms=0.75)
    assert result.limit_share == 0.5 and result.algorithm_share == 0.75
    # a BatchNorm training forward past that cache: its input read again for the output
    case = next(c for c in bench.suite(quick=True) if c.group == "BatchNorm2d train forward")
    calls = case.make()
    assert calls.reread == calls.bytes // 2 > 0, case.name  # bytes: x read once, y written once


@pytest.mark.level_independent
def test_bench_rounds_follow_the_case_time(monkeypatch):
    from bn_ext import bench

    # A clock that moves only when a timed call runs: each call takes `cost`.
    clock = [0.0]
    monkeypatch.setattr(bench.engine.time, "perf_counter", lambda: clock[0])

    def rounds(cost, repeats, min_seconds, max_seconds):
        calls = []

        def fn():
            clock[0] += cost
            calls.append(1)

        bench.time_interleaved([fn], repeats, min_seconds, max_seconds=max_seconds)
        return len(calls) - 2  # after the two warm-up calls

    # (Costs and limits are binary fractions: the sums are exact.)
    assert rounds(2**-6, 15, 0.0, 1.0) == 15
    assert rounds(2**-6, 15, 0.25, 1.0) == 16  # more while under min_seconds
    assert rounds(2**-10, 15, 0.25, 1.0) == 150  # at most ten times as many
    assert rounds(0.25, 15, 0.25, 1.0) == bench.MIN_ROUNDS == 6  # fewer once over max_seconds, not under 6
    assert rounds(0.25, 15, 0.25, math.inf) == 15
    assert rounds(0.25, 3, 0.0, 1.0) == 3


@pytest.mark.level_independent
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bench_images_come_in_their_memory_format(memory_format):
    from bn_ext.bench.catalogue import _random_images

    torch.manual_seed(0)
    x = _random_images(4, 64, 16, torch.bfloat16, memory_format)
    assert x.shape == (4, 64, 16, 16) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=memory_format)
    assert abs(x.float().mean().item()) < 0.02 and abs(x.float().std().item() - 1) < 0.02


def test_bench_runs_at_a_lower_capability(tmp_path):
    # The level is chosen at load: bench runs itself again with it asked for.
    command = [sys.executable, "-m", "bn_ext", "bench", "--quick", "--filter", "small inputs", "--threads", "1",
               "--capability", "default", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads((tmp_path / "bench.json").read_text())
    # Both libraries' kernels at the level asked for.
    assert data["cpu_capability"] == "DEFAULT"
    assert data["torch_cpu_capability"] == "DEFAULT"
    assert "CPU kernels DEFAULT" in result.stdout


def fold_command(*args):
    return subprocess.run([sys.executable, "-m", "bn_ext", "fold", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_fold_command_bad_input_is_one_line_and_exit_code_2(exported_resnet, tmp_path):
    path, _, _ = exported_resnet
    before = path.read_bytes()
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not a zip file at all")
    cases = [
        ((tmp_path / "missing.pt2", "-o", tmp_path / "out.pt2"), "input: no such file"),
        ((corrupt, "-o", tmp_path / "out.pt2"), "input: not a program saved with torch.export.save"),
        ((path, "-o", tmp_path / "no" / "such" / "folder" / "out.pt2"), "--output: cannot write"),
        ((path, "-o", path), "--output: is the input file"),
        ((path, "-o", tmp_path / "out.pt2", "--example-shape", "1,5,32,32"),
         "--example-shape: the program does not take an input of shape (1, 5, 32, 32)"),
    ]
    for args, message in cases:
        done = fold_command(*args)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr[-2000:])
        assert not (tmp_path / "out.pt2").exists()
    assert path.read_bytes() == before


def test_fold_command_that_fails_verification_writes_nothing(exported_resnet, tmp_path):
    path, _, _ = exported_resnet
    done = fold_command(path, "-o", tmp_path / "out.pt2", "--atol", "0", "--rtol", "0")
    assert done.returncode == 1
    assert "verification FAILED" in done.stderr and "BatchNorm folding report" in done.stdout
    assert not (tmp_path / "out.pt2").exists()


def test_fold_command_refuses_a_program_exported_in_training_mode(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),)), path)
    done = fold_command(path, "-o", tmp_path / "out.pt2")
    assert done.returncode == 2 and "input: the program was exported in training mode" in done.stderr
    assert not (tmp_path / "out.pt2").exists()


def test_fold_command_equalizes_a_program_on_request(tmp_path, capsys):
    from bn_ext.equalization_bench import depthwise_chain, spread_statistics

    torch.manual_seed(0)
    model = depthwise_chain()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    spread_statistics(model, (x,))
    path = tmp_path / "chain.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    assert main(["fold", str(path), "-o", str(tmp_path / "out.pt2"), "--equalize"]) == 0
    line = capsys.readouterr().out
    assert "folded 2 of 2 BatchNorms" in line and "equalized 2 layer pairs" in line, line
    before, after = (float(v) for v in line.split("output error ")[1].split(";")[0].split(" -> "))
    assert after < before / 10, line
    equalized = torch.export.load(tmp_path / "out.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(equalized(x), model(x), rtol=1e-5, atol=1e-5 * model(x).abs().max().item())
    # the same for its ONNX export
    onnx_path = tmp_path / "chain.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False)
    assert main(["fold", str(onnx_path), "-o", str(tmp_path / "out.onnx"), "--equalize",
                 "--example-shape", "8,3,16,16"]) == 0
    line = capsys.readouterr().out
    before, after = (float(v) for v in line.split("output error ")[1].split(";")[0].split(" -> "))
    assert "equalized 2 layer pairs" in line and after < before / 10, line


@pytest.mark.level_independent
def test_the_unet_block_workload_computes_the_same_fused_and_unfused():
    from bn_ext import bench

    torch.manual_seed(0)
    block = bench.UNetBlock(64)
    fused = bench.UNetBlock(64, fused=True)
    fused.load_state_dict(block.state_dict())
    converted = bn_ext.nn.convert(copy.deepcopy(block))
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    want = block(x)
    (grad,) = torch.autograd.grad(want.square().sum(), x)
    for model in (fused, converted):
        got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x)[0], grad, rtol=1e-4, atol=1e-4)
    rows = bench.engine._step_rows({"torch": block, "bn_ext fused": fused}, x.detach(), lambda out: out.square().mean(), 2,
                            "contiguous", "U-Net block")
    assert [r["model"] for r in rows] == ["torch", "bn_ext fused"] and rows[0]["speedup"] == 1.0
    assert all(r["step_ms"] > 0 and 0 < r["norm_share"] < 1 for r in rows)
