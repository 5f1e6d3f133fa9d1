"""Planted faults that the test suite must catch (`make mutants`).

Each mutant replaces one exact piece of a source file (the run stops if the
piece is no longer there, so the list follows the code), builds what the file
belongs to, and runs the tests that guard it; the run passes only when every
mutant makes those tests fail. The work happens in a private copy of the
checkout under build/mutants/tree, so the checkout itself is never modified
and later runs rebuild only what changed.

  make mutants                      every mutant
  make mutants FAMILY=group_norm    one family's (batch_norm, row_norm,
                                    group_norm, cuda, fold)
  python tests/mutants.py --list    the mutants, one a line
  python tests/mutants.py ID ...    some of them

The tree builds only the CPU levels the chosen mutants run at (this CPU's
best, and any a mutant names; not even DEFAULT). A mutant then recompiles
only the objects built from its file (ninja's dependency records) at the one
level its tests run, and undoing it costs no compile: the file gets back its
content and its time stamp, and the objects compiled before it come back.
Its tests start with the one known to catch it, in one process; only a
mutant that one misses runs the quick sample of its files, and then the
whole files, in two workers, so what is caught stays the same.

The report (mutant, what it plants, the test that caught it) is printed and
written to build/mutants/report.md and report.json."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutants"
TREE = WORK / "tree"
CMAKE_TREE = TREE / "build" / "cmake"
# The kernel files and the emulated operators compile 3-4 times faster
# unoptimised; every mutant's first test passes on the unmutated tree built
# so before any mutant runs.
OPTIMIZATION = "-O0"
# The emulated CUDA operators, built by tests/test_cuda_emulated.py's fixture.
EMULATOR_TREE = TREE / "build" / "emulated_ops"

BN_TESTS = ["tests/test_batch_norm.py"]
ROW_TESTS = ["tests/test_layer_norm.py", "tests/test_rms_norm.py"]
GN_TESTS = ["tests/test_group_norm.py"]
BN_ACT_TESTS = ["tests/test_batch_norm_act.py"]
FOLD_TESTS = ["tests/test_fold.py"]
EMULATED_TESTS = ["tests/test_cuda_emulated.py"]
FAMILY_TESTS = {"batch_norm": BN_TESTS + BN_ACT_TESTS, "row_norm": ROW_TESTS, "group_norm": GN_TESTS}
# The kernel files (csrc/cpu/kernels/<family>_*kernel.cpp) each test file runs.
FAMILY_OF_TESTS = {test: family for family, tests in FAMILY_TESTS.items() for test in tests}
FAMILIES = ["batch_norm", "row_norm", "group_norm", "cuda", "fold"]


@dataclasses.dataclass
class Mutant:
    id: str
    path: str
    what: str
    old: str
    new: str
    tests: list
    # The test known to catch it ("test_file.py::test_function"): run first, alone.
    first: str = ""
    env: dict = dataclasses.field(default_factory=dict)
    level: str = ""  # a CPU level the faulty code runs at only

    @property
    def family(self):
        """The op family the fault is in: its file's, else its tests'."""
        if self.path.startswith("csrc/cuda/"):
            return "cuda"
        if self.path == FOLD:
            return "fold"
        for family, tests in FAMILY_TESTS.items():
            if self.tests[0] in tests:
                return family
        raise ValueError(f"{self.id}: no family for its tests {self.tests}")


BN_BACKWARD = "csrc/cpu/kernels/batch_norm_backward_kernel.cpp"
BN_SHARED = "csrc/cpu/kernels/batch_norm_kernel.h"
CHANNELS = "csrc/cpu/kernels/channel_kernels.h"
GN_KERNEL = "csrc/cpu/kernels/group_norm_kernel.cpp"
CUDA_GN = "csrc/cuda/kernels/group_norm.cuh"
ROW_KERNEL = "csrc/cpu/kernels/row_norm_kernel.cpp"
UTILS = "csrc/cpu/kernels/kernel_utils.h"
CUDA_BN = "csrc/cuda/kernels/batch_norm.cuh"
CUDA_ROWS = "csrc/cuda/kernels/row_norm.cuh"
CUDA_COMMON = "csrc/cuda/kernels/device_common.cuh"
FOLD = "csrc/fold.cpp"

MUTANTS = [
    # --- CUDA device code, through the emulator ---------------------------------
    Mutant("cuda-missing-syncthreads", CUDA_COMMON, "block_merge reads the warps' partials without the barrier",
           "  if (lane == 0) scratch[warp] = s;\n  __syncthreads();\n",
           "  if (lane == 0) scratch[warp] = s;\n", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_forward_training"),
    Mutant("cuda-welford-merge", CUDA_COMMON, "Chan's merge drops the between-set term of m2",
           "a.m2 + b.m2 + delta * delta * a.count * wb", "a.m2 + b.m2", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_forward_training"),
    Mutant("cuda-halved-m2", CUDA_BN, "batch_norm_stats returns half of m2",
           "m2[c] = m.m2;", "m2[c] = 0.5 * m.m2;", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_stats"),
    Mutant("cuda-channels-last-stride", CUDA_BN, "channels-last reduction rows read with a stride of C - 1",
           "const index_t offset = (n * M + m) * C + c0;", "const index_t offset = (n * M + m) * (C - 1) + c0;",
           EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_forward_training"),
    Mutant("cuda-gn-samples-merged", CUDA_BN, "channels-last partials read every sample's rows from the first sample",
           "const index_t offset = (n * M + m) * C + c0;", "const index_t offset = m * C + c0;", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_group_norm_forward"),
    Mutant("cuda-bn-act-residual-dropped", CUDA_BN, "BatchNorm + add: the residual not added before the activation",
           "return kResidual ? round_to_type<T>(y + aux) : y;", "return y;", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_act"),
    Mutant("cuda-bn-act-dx-shift-dropped", CUDA_BN, "BatchNorm + activation dx: z recomputed without the bias",
           "activation_input<T, kResidual>(x, aux, center, A(0), dy_scale, shift)",
           "activation_input<T, kResidual>(x, aux, center, A(0), dy_scale, A(0))", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_act"),
    Mutant("cuda-gn-mean-term-sign", CUDA_GN, "GroupNorm backward: the mean(w dy) term of dx with the wrong sign",
           "constant = -rs * s.first / count;", "constant = rs * s.first / count;", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_group_norm_backward"),
    Mutant("cuda-eps-twice", CUDA_ROWS, "LayerNorm's rstd adds eps twice",
           "rstd = inverse_sqrt(st.m2 / A(D) + eps);", "rstd = inverse_sqrt(st.m2 / A(D) + eps + eps);",
           EMULATED_TESTS,
           first="test_cuda_emulated.py::test_layer_norm_forward"),
    Mutant("cuda-biased-running-var", CUDA_BN, "running_var updated with the biased variance",
           "const double var = (1.0 / (invstd * invstd) - eps) * unbias;",
           "const double var = (1.0 / (invstd * invstd) - eps);", EMULATED_TESTS,
           first="test_cuda_emulated.py::test_batch_norm_update_stats"),
    Mutant("cuda-dropped-last-row", CUDA_ROWS, "row-norm parameter gradients skip the last row",
           "r < rows; r += int64_t(count) * kParamRows", "r < rows - 1; r += int64_t(count) * kParamRows",
           EMULATED_TESTS,
           first="test_cuda_emulated.py::test_layer_norm_backward"),
    # --- folding arithmetic ---------------------------------------------------
    Mutant("fold-transpose-axis", FOLD, "ConvTranspose folded along the input-channel axis, as a Conv",
           "  if (transposed) {\n    std::vector<int64_t> grouped", "  if (false) {\n    std::vector<int64_t> grouped",
           FOLD_TESTS,
           first="test_fold.py::test_fuse_conv_bn_matches_pair"),
    Mutant("fold-no-eps", FOLD, "folding scale without eps: gamma / sqrt(var)",
           "(running_var.to(at::kDouble) + eps).rsqrt()", "running_var.to(at::kDouble).rsqrt()", FOLD_TESTS,
           first="test_fold.py::test_fuse_linear_bn"),
    Mutant("fold-unscaled-bias", FOLD, "the layer's own bias not multiplied by the BatchNorm scale",
           "bias_like(b * scale + shift, weight, bias)", "bias_like(b + shift, weight, bias)", FOLD_TESTS,
           first="test_fold.py::test_fuse_linear_bn"),
    Mutant("fold-shift-sign", FOLD, "BatchNorm before a Conv: the shift enters the bias with the wrong sign",
           "bias_like(b + shift_contribution, weight, bias)", "bias_like(b - shift_contribution, weight, bias)",
           FOLD_TESTS,
           first="test_fold.py::test_fuse_bn_conv_exact_cases"),
    # --- CPU kernels ----------------------------------------------------------
    Mutant("cpu-zeroed-sum-dy", BN_BACKWARD, "BatchNorm backward: sum(dy) zeroed",
           "sum_dy[c] = s.dy;", "sum_dy[c] = 0.0;", BN_TESTS,
           first="test_batch_norm.py::test_gradients"),
    Mutant("cpu-halved-m2", CHANNELS, "BatchNorm forward: the variance from half of m2",
           "return 1.0 / std::sqrt(m.m2 / static_cast<double>(m.count) + eps);",
           "return 1.0 / std::sqrt(0.5 * m.m2 / static_cast<double>(m.count) + eps);", BN_TESTS,
           first="test_batch_norm.py::test_forward_and_running_stats"),
    Mutant("cpu-dropped-tail", UTILS, "run_sums drops a run's last partial vector",
           "for (int64_t i = steps * 2 * W; i < n; i += W) {", "for (int64_t i = steps * 2 * W; i + W <= n; i += W) {",
           BN_TESTS + ROW_TESTS,
           first="test_batch_norm.py::test_forward_and_running_stats"),
    Mutant("cpu-channels-last-stride", CHANNELS, "channels-last gradient sums read rows with a stride of C - 1",
           "const int64_t offset = (r0 + s) * C + j;", "const int64_t offset = (r0 + s) * (C - 1) + j;",
           BN_TESTS,
           first="test_batch_norm.py::test_gradients"),
    Mutant("cpu-eps-twice", "csrc/cpu/batch_norm.cpp", "BatchNorm eval: invstd adds eps twice",
           "invstd[c] = 1.0 / std::sqrt(var[c] + a.eps);", "invstd[c] = 1.0 / std::sqrt(var[c] + a.eps + a.eps);",
           BN_TESTS,
           first="test_batch_norm.py::test_forward_and_running_stats"),
    Mutant("biased-running-var", "csrc/batch_norm_ops.h", "running_var updated with the biased variance",
           "static_cast<double>(count) / static_cast<double>(count - 1) : 1.0", "1.0 : 1.0", BN_TESTS,
           first="test_batch_norm.py::test_forward_and_running_stats"),
    Mutant("cpu-gradient-sign", BN_BACKWARD, "BatchNorm backward: the mean(dy) term with the wrong sign",
           "proj * (mean - static_cast<double>(k.center[c])) - sum_dy / M",
           "proj * (mean - static_cast<double>(k.center[c])) + sum_dy / M", BN_TESTS,
           first="test_batch_norm.py::test_gradients"),
    Mutant("cpu-bf16-truncated-avx512", UTILS, "AVX512 float to bfloat16 truncates instead of rounding to nearest even",
           "  return at::vec::cvtfp32_bf16(v);\n}",
           "  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));\n}",
           BN_TESTS, env={"BN_EXT_CPU_CAPABILITY": "AVX512"}, level="AVX512",
           first="test_batch_norm.py::test_half_outputs_round_like_torch"),
    Mutant("cpu-bf16-truncated-avx2", UTILS, "AVX2 float to bfloat16 truncates instead of rounding to nearest even",
           "    const __m128i packed = std::is_same_v<T, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))\n"
           "                                                            : at::vec::cvtfp32_fp16(__m256(v));\n"
           "    if (!(stream && stream_store(p, packed))) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);",
           "    const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(__m256(v)), 16);\n"
           "    const __m128i packed = std::is_same_v<T, at::BFloat16>\n"
           "        ? _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1))\n"
           "        : at::vec::cvtfp32_fp16(__m256(v));\n"
           "    if (!(stream && stream_store(p, packed))) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);",
           BN_TESTS, env={"BN_EXT_CPU_CAPABILITY": "AVX2"}, level="AVX2",
           first="test_batch_norm.py::test_half_outputs_round_like_torch"),
    Mutant("cpu-wide-rows-block-vector-dropped", UTILS,
           "the line-wide column walk of 4 KB channels-last rows (AVX2) drops its second vector's sum",
           "    if constexpr (kWithSum) part_sum[v()] += a;",
           "    if constexpr (kWithSum) part_sum[v()] += v() == 1 ? Vec(0) : a;",
           BN_TESTS, env={"BN_EXT_CPU_CAPABILITY": "AVX2"}, level="AVX2",
           first="test_batch_norm.py::test_forward_and_running_stats"),
    Mutant("cpu-short-plane-split-lane-off", CHANNELS,
           "a vector spanning two short planes gives its first plane's last lane the next channel's coefficients",
           "    const Vec first = Vec::arange(Op(0), Op(1)) < Vec(static_cast<Op>(lanes));",
           "    const Vec first = Vec::arange(Op(0), Op(1)) < Vec(static_cast<Op>(lanes - 1));",
           BN_TESTS, first="test_batch_norm.py::test_forward_and_running_stats"),
    # (Channels-first stripes are merged in float64 and rarely change a bit
    # when their count does; channels-last stripes sum rows in float32.)
    Mutant("cpu-thread-count-split", CHANNELS, "channels-last row stripes counted from the thread count",
           "std::max(kChunkRows, kMinStripe / std::max<int64_t>(g.C, 1)),\n                      kMaxReductionTasks);",
           "std::max(kChunkRows, kMinStripe / std::max<int64_t>(g.C, 1)),\n                      at::get_num_threads());",
           BN_TESTS,
           first="test_batch_norm.py::test_results_do_not_depend_on_thread_count"),
    Mutant("cpu-gn-unweighted-group-sum", GN_KERNEL, "GroupNorm backward: the group's sum(w dy) without the weights",
           "A += w[c] * sums[n * g.C + c].dy;", "A += sums[n * g.C + c].dy;", GN_TESTS,
           first="test_group_norm.py::test_group_norm_gradients"),
    Mutant("cpu-gn-no-second-pass", GN_KERNEL, "GroupNorm channels-last: no second pass when a group's shift is far "
           "from its mean", "  if (single) return;", "  (void)single;\n  return;", GN_TESTS,
           first="test_group_norm.py::test_group_norm_exact_when_the_first_values_are_outliers"),
    Mutant("cpu-gn-silu-gradient", CHANNELS, "SiLU's gradient without its z * (1 - s) term (GroupNorm, BatchNorm)",
           "return dy * s * (Vec(1) + z * (Vec(1) - s));", "return dy * s;", GN_TESTS + BN_ACT_TESTS,
           first="test_group_norm.py::test_group_norm_gradients"),
    Mutant("cpu-bn-act-unrounded-statistics", BN_SHARED, "BatchNorm's forward coefficients from unrounded statistics: "
           "the backward's recomputed ReLU mask can differ from the forward's",
           "return static_cast<double>(static_cast<opmath_t<T>>(statistic));", "return statistic;", BN_ACT_TESTS,
           first="test_batch_norm_act.py::test_relu_mask_is_recomputed_from_saved_statistics"),
    Mutant("cpu-bn-act-residual-unrounded", CHANNELS, "BatchNorm + add backward: the normalised value not rounded "
           "to T before the residual is added (half types' masks and gradients drift)",
           "const Vec y = round_to_type<T>(at::vec::fmadd(x - center, scale, shift));",
           "const Vec y = at::vec::fmadd(x - center, scale, shift);", BN_ACT_TESTS,
           first="test_batch_norm_act.py::test_equals_unfused_bitwise"),
    Mutant("cpu-bn-act-residual-tail-not-stored", CHANNELS, "BatchNorm + add backward: the residual's gradient not "
           "stored for a run's or row's partial vector",
           "      store_op_n(out + offset, dz, count);\n      return dz;",
           "      if (count == Vec::size()) store_op_n(out + offset, dz, count);\n      return dz;", BN_ACT_TESTS,
           first="test_batch_norm_act.py::test_equals_unfused_bitwise"),
    Mutant("cpu-gn-plane-split-lane-off", CHANNELS, "GroupNorm channels-first gradient sums: a vector spanning "
           "two planes gives its first plane's last lane to the next channel",
           "const Vec first = Vec::arange(Op(0), Op(1)) < Vec(static_cast<Op>(run_end - i));",
           "const Vec first = Vec::arange(Op(0), Op(1)) < Vec(static_cast<Op>(run_end - i - 1));", GN_TESTS,
           first="test_group_norm.py::test_group_norm_gradients"),
    Mutant("cpu-gn-plane-split-next-center", CHANNELS, "GroupNorm channels-first gradient sums: the next plane's "
           "lanes of a split vector centered on this plane's group",
           "(load_op(x + i) - Vec::blendv(Vec(center[c + 1]), vcenter, first));", "(load_op(x + i) - vcenter);",
           GN_TESTS,
           first="test_group_norm.py::test_group_norm_gradients_of_groups_far_apart"),
    Mutant("cpu-gn-row-order-partials-kept", GN_KERNEL, "GroupNorm channels-last gradient sums: a block of rows' "
           "partials not reset, so earlier blocks count again",
           "    std::fill(part_dy.begin(), part_dy.end(), Op(0));\n", "", GN_TESTS,
           first="test_group_norm.py::test_group_norm_gradients"),
    Mutant("cpu-bf16-rounding-truncates", CHANNELS, "bfloat16 rounding of fused values truncates instead of "
           "rounding to nearest even (AVX2)", "(bits + Bits(0x7FFF) + ((bits >> Bits(16)) & Bits(1)))", "bits",
           GN_TESTS + BN_ACT_TESTS, env={"BN_EXT_CPU_CAPABILITY": "AVX2"}, level="AVX2",
           first="test_batch_norm_act.py::test_equals_unfused_bitwise"),
    Mutant("cpu-gn-layer-norm-channels-projection", GN_KERNEL,
           "LayerNorm over channels backward: dx without its x_hat * mean(g * x_hat) term",
           "- xhat * Vec::loadu(pmean_gx + j)) *", ") *", GN_TESTS,
           first="test_group_norm.py::test_layer_norm_channels_gradients"),
    Mutant("cpu-row-blocks-from-threads", ROW_KERNEL, "row-norm parameter-gradient row blocks counted from the "
           "thread count", "                               kMaxRowBlocks);", "                               "
           "at::get_num_threads());", ROW_TESTS,
           first="test_layer_norm.py::test_results_do_not_depend_on_thread_count"),
    Mutant("cpu-layer-norm-unbiased", ROW_KERNEL, "LayerNorm's variance divided by D - 1",
           "const double rstd = 1.0 / std::sqrt(m.m2 / static_cast<double>(D) + eps);",
           "const double rstd = 1.0 / std::sqrt(m.m2 / static_cast<double>(D - 1) + eps);", ROW_TESTS,
           first="test_layer_norm.py::test_forward_row_lengths"),
    Mutant("cpu-layer-norm-zeroed-bias-grad", ROW_KERNEL, "LayerNorm's grad_bias column sums never added to",
           "(Vec::loadu(sums + D + j, count) + dyv).store(sums + D + j, count);",
           "Vec::loadu(sums + D + j, count).store(sums + D + j, count);", ROW_TESTS,
           first="test_layer_norm.py::test_gradients"),
    Mutant("cpu-center-skipped", CHANNELS, "the forward's elementwise pass skips the center where some "
           "channels keep theirs (means over 8 standard deviations from zero)",
           "out = at::vec::fmadd(kCentered ? v.x - k.center : v.x, k.x_scale, out);",
           "out = at::vec::fmadd(v.x, k.x_scale, out);", BN_TESTS,
           first="test_batch_norm.py::test_means_folded_and_centered_in_one_pass"),
    Mutant("cpu-row-order-partials-kept", UTILS, "channels-last row-order sums: a tile's partial products not "
           "reset, so earlier tiles count again",
           "      std::fill_n(part_product, padded, Acc(0));\n", "", BN_TESTS,
           first="test_batch_norm.py::test_gradients"),
    Mutant("cpu-rms-norm-gradient-sign", ROW_KERNEL, "RMSNorm backward: the mean(g * x_hat) term with the wrong sign",
           "dweight, D, Op(0), rs, Op(0), mean_gx, stream);", "dweight, D, Op(0), rs, Op(0), -mean_gx, stream);",
           ROW_TESTS,
           first="test_rms_norm.py::test_gradients"),
]


def sync_tree():
    """Copy the checkout's files (tracked and untracked, not ignored) into the
    tree, rewriting only those whose content differs, so builds stay incremental."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = ROOT / name, TREE / name
        if not src.is_file():
            continue
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def build_env(extra=None):
    # The CUDA kernels are checked through the emulator: no nvcc build here.
    return dict(os.environ, BN_EXT_WITH_CUDA="0", PYTHONDONTWRITEBYTECODE="1",
                BN_EXT_EMULATOR_OPTIMIZATION=OPTIMIZATION, **(extra or {}))


def build(log, levels):
    env = build_env({"BN_EXT_CPU_LEVELS": ";".join(levels), "BN_EXT_KERNEL_OPTIMIZATION": OPTIMIZATION})
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=TREE, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    return done.returncode == 0


def ninja(*args, log=None):
    from ninja import BIN_DIR

    start = time.monotonic()
    done = subprocess.run([os.path.join(BIN_DIR, "ninja"), "-C", str(CMAKE_TREE), *args], env=build_env(),
                          stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log:
        log.write(f"--- ninja {' '.join(args)}: {time.monotonic() - start:.1f} s\n")
    return done


def link(log):
    """The library from the objects as they are (ninja's library target links
    and compiles nothing when only objects changed), put into the package as
    setup.py puts it: through a new file."""
    if ninja("bn_ext", log=log).returncode != 0:
        return False
    package_copy = TREE / "bn_ext" / "libbn_ext.so.0"
    shutil.copy2(os.path.realpath(CMAKE_TREE / "libbn_ext.so"), f"{package_copy}.tmp")
    os.replace(f"{package_copy}.tmp", package_copy)
    return True


def object_sources():
    """{object: the files it is compiled from, headers included}, from the
    dependency records ninja keeps of the last build."""
    records, current = {}, None
    for line in ninja("-t", "deps").stdout.splitlines():
        if line and not line.startswith(" "):
            current = records.setdefault(line.split(":")[0], set())
        elif line.strip() and current is not None:
            current.add(os.path.realpath(line.strip()))
    return records


def objects_to_recompile(mutant, records, level):
    """The library's objects built from the mutant's file; of the kernel
    objects, those at the level its tests run and of the op families they
    test only. The others stay built from the unmutated file: their code is
    not run, or runs unmutated, which could only hide a fault, never make
    one look caught."""
    source = os.path.realpath(TREE / mutant.path)
    families = {FAMILY_OF_TESTS[t] for t in mutant.tests if t in FAMILY_OF_TESTS}
    chosen = []
    for obj, sources in records.items():
        kernel = re.match(r"CMakeFiles/bn_ext_kernels_(\w+)\.dir/csrc/cpu/kernels/(\w+?)_(?:forward_|backward_)?kernel",
                          obj)
        if source in sources and (kernel is None or (kernel.group(1) == level and kernel.group(2) in families)):
            chosen.append(obj)
    return chosen


class BuiltFiles:
    """The build outputs as the unmutated tree has them, to put back after a
    mutant: copies of the library's objects and the emulated operators."""

    def __init__(self):
        self.folder = WORK / "unmutated"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.files = [f for f in (*CMAKE_TREE.glob("CMakeFiles/**/*.o"), *EMULATOR_TREE.glob("*"))
                      if f.is_file() and f.suffix in (".o", ".so")]
        for f in self.files:
            copy = self.folder / f.relative_to(TREE)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, copy)

    def restore(self):
        """Puts back every output a mutant rebuilt (with its old time stamp,
        still newer than its sources) and drops the library linked from
        them, so the next build only links."""
        changed = False
        for f in self.files:
            copy = self.folder / f.relative_to(TREE)
            if not f.exists() or f.stat().st_mtime_ns != copy.stat().st_mtime_ns:
                shutil.copy2(copy, f)
                changed = changed or f.suffix == ".o" and CMAKE_TREE in f.parents
        if changed:
            for library in CMAKE_TREE.glob("libbn_ext.so*"):
                library.unlink()


def pytest(*args, env=None):
    """pytest in the tree, with waiting OpenMP threads passive (two workers
    share the cores)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=TREE,
                          env=build_env({"OMP_WAIT_POLICY": "passive", **(env or {})}), capture_output=True,
                          text=True)


def run_tests(mutant, log):
    """The mutant's tests, stopping at the first failure: (failed, first
    failing test). Its known catching test runs first, alone; then, if that
    passed, the quick sample (`pytest --quick`) of its files and the whole
    files, so what is caught stays the same."""
    parallel = ["-n", "2"]
    runs = ([[f"tests/{mutant.first}"]] if mutant.first else []) + [[*parallel, "--quick", *mutant.tests],
                                                         [*parallel, *mutant.tests]]
    for selection in runs:
        start = time.monotonic()
        done = pytest("-x", *selection, env=mutant.env)
        log.write(done.stdout[-20000:] + done.stderr[-5000:])
        log.write(f"--- pytest {' '.join(selection)}: {time.monotonic() - start:.1f} s\n")
        # 4 and 5: no such test, no test selected (a stale `first`).
        if done.returncode in (4, 5):
            print(f"{mutant.id}: pytest selected no test from {' '.join(selection)}", flush=True)
        elif done.returncode == 0 and selection == runs[0] and mutant.first:
            print(f"{mutant.id}: its first test, {mutant.first}, passed", flush=True)
        elif done.returncode != 0:
            failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", done.stdout, re.M)
            # A crash (a signal) fails the run without a summary line.
            return True, failed[0] if failed else f"(pytest exited with {done.returncode})"
    return False, ""


def build_emulator(log):
    """The emulated CUDA operators, built as the tests' fixture builds them."""
    code = "import sys; sys.path.insert(0, 'tests'); import test_cuda_emulated as t; t.build_emulator()"
    return subprocess.run([sys.executable, "-c", code], cwd=TREE, env=build_env(), stdout=log,
                          stderr=subprocess.STDOUT).returncode == 0


def cpu_levels():
    """The levels this CPU runs, lowest first."""
    code = "import bn_ext; print(*bn_ext.cpu_capabilities())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Planted faults the tests must catch.")
    parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    parser.add_argument("--family", choices=FAMILIES, help="only this family's mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:34} {m.family:11} {m.path:40} {m.what}")
        return 0
    unknown = set(args.ids) - {m.id for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant id(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if (not args.ids or m.id in args.ids) and args.family in (None, m.family)]
    levels = cpu_levels()
    built = [level for level in levels if level == levels[-1] or any(m.level == level for m in chosen)]
    WORK.mkdir(parents=True, exist_ok=True)
    sync_tree()
    for m in chosen:
        count = (TREE / m.path).read_text().count(m.old)
        if count != 1:
            print(f"{m.id}: the piece to replace occurs {count} times in {m.path}, not once")
            return 2
    results = []
    with open(WORK / "log.txt", "w") as log:
        log.write("clean build\n")
        log.flush()
        if not build(log, built):
            print(f"the unmutated tree does not build; see {WORK / 'log.txt'}")
            return 2
        if any(m.family == "cuda" for m in chosen) and not build_emulator(log):
            print(f"the unmutated emulated operators do not build; see {WORK / 'log.txt'}")
            return 2
        # Every catch below means nothing unless the tree's tests import the
        # tree's own, freshly built library.
        loads = pytest("tests/test_install.py::test_the_package_loads_the_library_cmake_built_last")
        if loads.returncode != 0:
            print(f"the unmutated tree does not load the library it built:\n{loads.stdout[-3000:]}")
            return 2
        # A catch means nothing where the unmutated tree fails the test too.
        firsts_by_env = {}
        for m in chosen:
            if m.first:
                firsts_by_env.setdefault(tuple(sorted(m.env.items())), set()).add(f"tests/{m.first}")
        for env, firsts in firsts_by_env.items():
            done = pytest("-n", "2", *sorted(firsts), env=dict(env))
            log.write(done.stdout[-20000:])
            if done.returncode != 0:
                print(f"the unmutated tree fails the mutants' first tests ({dict(env) or 'default level'}):\n"
                      f"{done.stdout[-3000:]}")
                return 2
        records = object_sources()
        for m in chosen:
            if m.family != "cuda" and m.level in ("", *levels) and not objects_to_recompile(m, records,
                                                                                          m.level or levels[-1]):
                print(f"{m.id}: no object of the library is built from {m.path}")
                return 2
        unmutated = BuiltFiles()
        for m in chosen:
            start = time.monotonic()
            if m.level and m.level not in levels:
                results.append({"id": m.id, "what": m.what, "file": m.path, "caught": None,
                                "by": f"not run: this CPU has no {m.level} level"})
                continue
            path = TREE / m.path
            original, stamp = path.read_bytes(), path.stat()
            log.write(f"\n=== {m.id}\n")
            log.flush()
            try:
                path.write_bytes(original.replace(m.old.encode(), m.new.encode()))
                if m.family == "cuda":
                    # The tests' fixture builds the emulated operators from it.
                    caught, by = run_tests(m, log)
                elif ninja(*objects_to_recompile(m, records, m.level or levels[-1]), log=log).returncode != 0:
                    caught, by = True, "(does not compile)"
                else:
                    # The file as it was, time stamp included: the link
                    # takes the mutated objects and compiles nothing more.
                    path.write_bytes(original)
                    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
                    caught, by = run_tests(m, log) if link(log) else (True, "(does not link)")
            finally:
                path.write_bytes(original)
                os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
                unmutated.restore()
            seconds = round(time.monotonic() - start, 1)
            results.append({"id": m.id, "what": m.what, "file": m.path, "caught": caught, "by": by,
                            "seconds": seconds})
            print(f"{'caught ' if caught else 'MISSED '} {m.id:34} {by}  ({seconds} s)", flush=True)
    lines = ["| mutant | file | fault | caught by |", "|---|---|---|---|"]
    for r in results:
        mark = {True: "", False: "**not caught** ", None: ""}[r["caught"]]
        lines.append(f"| {r['id']} | {r['file']} | {r['what']} | {mark}{r['by']} |")
    (WORK / "report.md").write_text("\n".join(lines) + "\n")
    (WORK / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    missed = [r["id"] for r in results if r["caught"] is False]
    print(f"{sum(r['caught'] is True for r in results)} caught, {len(missed)} missed, "
          f"{sum(r['caught'] is None for r in results)} not run; report in {WORK / 'report.md'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
