"""Command line: python -m bn_ext {demo,fold,bench,info} ..."""

from __future__ import annotations

import argparse
import sys


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 1,3,224,224, got {text!r}") from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_ext", description="bn_ext command line")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train with bn_ext BatchNorm, then fold ResNet-18 for deployment")
    demo.add_argument("--steps", type=int, default=5, help="training steps of the side-by-side check")
    demo.add_argument("--image-size", type=int, default=224)
    demo.add_argument("--repeats", type=int, default=20, help="timed runs per latency median")

    fold = commands.add_parser("fold", help="fold the BatchNorms of a torch.export program (.pt2) or an ONNX file")
    fold.add_argument("input", help="program saved with torch.export.save, or an ONNX model (.onnx)")
    fold.add_argument("-o", "--output", required=True, help="where to save the folded program")
    fold.add_argument("--check", action="store_true", help="print the full folding report")
    fold.add_argument("--example-shape", type=_shape, help="input shape for verification, e.g. 1,3,224,224 "
                      "(default: the program's own example inputs)")
    fold.add_argument("--equalize", action="store_true",
                      help="then cross-layer equalization for int8 (see bn_ext.equalize)")
    fold.add_argument("--atol", type=float)
    fold.add_argument("--rtol", type=float)

    bench = commands.add_parser("bench", help="time bn_ext against torch's native kernels")
    bench.add_argument("--quick", action="store_true",
                       help="a short subset with fewer repetitions, without the torch.compile peer")
    bench.add_argument("--filter", help="only cases whose group or name contains this text")
    bench.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    bench.add_argument("--output", default="bench_results", help="folder for bench.json and bench.png")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--capability", type=str.upper, choices=["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"],
                       help="CPU level of both libraries' kernels (default: the best this CPU runs)")
    bench.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    bench.add_argument("--training-step", action="store_true",
                       help="time a ResNet-50 training step (torch, bn_ext, bn_ext with fused activations) instead")
    # The child process that times kernel against kernel (see bn_ext/bench.py).
    bench.add_argument("--kernel-timings", help=argparse.SUPPRESS)

    equalization = commands.add_parser(
        "equalization", help="int8 output error before and after cross-layer equalization (models with random "
                             "weights and spread BatchNorm statistics)")
    equalization.add_argument("--filter", help="only models whose name contains this text")

    commands.add_parser("info", help="how this bn_ext was built and what it runs with")

    args = parser.parse_args(argv)
    if args.command == "info":
        print(build_info())
        return 0
    if args.command == "demo":
        from bn_ext.demo import run_demo

        return run_demo(steps=args.steps, image_size=args.image_size, repeats=args.repeats)
    if args.command == "fold":
        return _fold(args)
    if args.command == "equalization":
        from bn_ext.equalization_bench import table

        print(table(args.filter))
        return 0
    if args.command == "bench":
        return _bench(args, sys.argv[1:] if argv is None else argv)
    return 2


def build_info() -> str:
    """The build (versions, CPU levels, CUDA architectures, the emulated
    operators) and the run-time settings, a line each."""
    import os
    from pathlib import Path

    import torch

    import bn_ext
    from bn_ext import _build_info
    from bn_ext.bench import has_cuda_kernels

    package = Path(bn_ext.__file__).resolve().parent
    emulated = sorted((package.parent / "build" / "emulated_ops").glob("bn_ext_emulated*.so"))
    cache = bn_ext.cpu_output_cache_stats()
    chosen = os.environ.get("BN_EXT_CPU_CAPABILITY")
    lines = [
        f"bn_ext {bn_ext.__version__} at {package}",
        f"torch {torch.__version__} (built against {_build_info.TORCH_VERSION})",
        f"CPU levels compiled: {', '.join(_build_info.CPU_LEVELS)}",
        f"CPU level in use: {bn_ext.cpu_capability()}"
        + (f" (BN_EXT_CPU_CAPABILITY={chosen})" if chosen else " (the best this CPU runs)"),
        "CUDA kernels: " + (f"built for CUDA {_build_info.CUDA_VERSION}, architectures {_build_info.CUDA_ARCHS}"
                            if has_cuda_kernels() else "not built")
        + (f"; {torch.cuda.device_count()} device(s) present" if torch.cuda.is_available() else "; no device present"),
        "emulated CUDA operators (tests): " + (f"built, {emulated[0]}" if emulated else "not built"),
        f"CPU output cache: limit {cache.limit_bytes} bytes"
        + (f" (BN_EXT_OUTPUT_CACHE_BYTES={os.environ['BN_EXT_OUTPUT_CACHE_BYTES']})"
           if "BN_EXT_OUTPUT_CACHE_BYTES" in os.environ else " (default)")
        + f", {cache.cached_bytes} bytes kept now",
        f"threads: {torch.get_num_threads()}",
    ]
    return "\n".join(lines)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    import os
    from pathlib import Path

    import torch

    import bn_ext

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.capability and args.capability != bn_ext.cpu_capability():
        # The level is chosen when bn_ext loads: run again with it asked for.
        if args.capability not in bn_ext.cpu_capabilities():
            print(f"bench: --capability {args.capability} is not one this build and CPU run: "
                  f"{', '.join(bn_ext.cpu_capabilities())}", file=sys.stderr)
            return 2
        # torch's kernels at the same level (its top x86 level is AVX512), so
        # the ratios are those of a CPU that runs no more than this level.
        torch_level = {"AVX512_BF16": "AVX512"}.get(args.capability, args.capability)
        env = {**os.environ, "BN_EXT_CPU_CAPABILITY": args.capability, "ATEN_CPU_CAPABILITY": torch_level.lower()}
        os.execve(sys.executable, [sys.executable, "-m", "bn_ext", *argv], env)
    from bn_ext.bench import kernel_timings, run, training_step_report

    if args.training_step:
        training_step_report(steps=2 if args.quick else 5)
        return 0
    if args.kernel_timings:
        kernel_timings(args.quick, args.filter, not (args.no_compile or args.quick), Path(args.kernel_timings))
        return 0
    run(quick=args.quick, pattern=args.filter, threads=args.threads, output=Path(args.output), device=args.device,
        compile_peer=not (args.no_compile or args.quick))
    return 0


def _fold(args: argparse.Namespace) -> int:
    """Bad input (a missing or unreadable program, example inputs it does not
    take, an output that cannot be written) is one line naming the argument
    and exit code 2, with nothing written; a fold that fails verification
    prints the report and exits 1, with nothing written."""
    import logging
    import os
    import zipfile

    import torch

    from bn_ext.equalization import EqualizationError
    from bn_ext.fold import FoldVerificationError, fold_exported_program, training_batch_norms

    def bad(argument: str, message: str) -> int:
        print(f"python -m bn_ext fold: {argument}: {message}", file=sys.stderr)
        return 2

    if not os.path.isfile(args.input):
        return bad("input", f"no such file: {args.input}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return bad("--output", f"cannot write {args.output}")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        return bad("--output", "is the input file; write the folded program elsewhere")
    if args.input.endswith(".onnx"):
        return _fold_onnx_file(args, bad)
    # torch.export.load logs the error with its traceback before raising it.
    export_log = logging.getLogger("torch.export")
    level, export_log.level = export_log.level, logging.CRITICAL
    try:
        program = torch.export.load(args.input)
    except (zipfile.BadZipFile, RuntimeError, ValueError, KeyError, EOFError) as error:
        return bad("input", f"not a program saved with torch.export.save ({type(error).__name__}: {error})")
    finally:
        export_log.setLevel(level)
    training = training_batch_norms(program.graph)
    if training:
        return bad("input", f"the program was exported in training mode ({len(training)} BatchNorms use batch "
                   "statistics); export model.eval() to fold")
    inputs = None if args.example_shape is None else (torch.randn(args.example_shape),)
    if inputs is not None:
        try:
            program.module()(*inputs)
        except Exception as error:  # noqa: BLE001  (whatever the program raises on the wrong shape)
            return bad("--example-shape", f"the program does not take an input of shape {args.example_shape} "
                       f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    try:
        folded, report = fold_exported_program(program, inputs, atol=args.atol, rtol=args.rtol, progress=True,
                                               equalize=args.equalize)
    except FoldVerificationError as error:
        return _verification_failed(error)
    except EqualizationError as error:
        return _equalization_failed(error)
    torch.export.save(folded, args.output)
    return _folded(report, args)


def _verification_failed(error) -> int:
    print(error.report)
    print(f"verification FAILED (max error {error.report.max_abs_error:.3g}); nothing written", file=sys.stderr)
    return 1


def _equalization_failed(error) -> int:
    print(error, file=sys.stderr)
    print("nothing written", file=sys.stderr)
    return 1


def _folded(report, args: argparse.Namespace) -> int:
    if args.check:
        print(report)
    else:
        equalized = report.equalization
        print(f"folded {len(report.folded)} of {report.batch_norms_before} BatchNorms; "
              f"max error {report.max_abs_error:.3g}: PASS; "
              + ("" if equalized is None else f"equalized {len(equalized.equalized)} layer pairs, per-tensor int8 "
                 f"output error {equalized.before.per_tensor_weights:.3g} -> {equalized.after.per_tensor_weights:.3g}; ")
              + f"wrote {args.output}")
    return 0


def _fold_onnx_file(args: argparse.Namespace, bad) -> int:
    import numpy as np
    import onnx

    from bn_ext.equalization import EqualizationError
    from bn_ext.fold import FoldVerificationError
    from bn_ext.onnx_fold import fold_onnx, training_batch_norms

    try:
        model = onnx.load(args.input)
        onnx.checker.check_model(model)
    except Exception as error:  # noqa: BLE001  (protobuf's and onnx's errors alike)
        return bad("input", f"not a valid ONNX model ({type(error).__name__}: {str(error).splitlines()[0]})")
    training = training_batch_norms(model)
    if training:
        return bad("input", f"the model has {len(training)} BatchNormalization nodes in training mode (batch "
                   "statistics); export model.eval() to fold")
    feeds = None
    if args.example_shape is not None:
        initializers = {t.name for t in model.graph.initializer}
        inputs = [v for v in model.graph.input if v.name not in initializers]
        if len(inputs) != 1:
            return bad("--example-shape", f"the model has {len(inputs)} inputs; the option gives one shape")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
        feeds = {inputs[0].name: np.random.default_rng(0).standard_normal(args.example_shape).astype(dtype)}
    try:
        folded, report = fold_onnx(model, example_inputs=feeds, atol=args.atol, rtol=args.rtol, equalize=args.equalize)
    except FoldVerificationError as error:
        return _verification_failed(error)
    except EqualizationError as error:
        return _equalization_failed(error)
    except Exception as error:  # noqa: BLE001  (onnxruntime rejecting the example shape, say)
        return bad("--example-shape" if feeds is not None else "input",
                   f"the model does not run ({type(error).__name__}: {str(error).splitlines()[0]})")
    onnx.save(folded, args.output)
    return _folded(report, args)


if __name__ == "__main__":
    sys.exit(main())
