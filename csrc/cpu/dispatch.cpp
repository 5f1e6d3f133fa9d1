// Chooses the CPU kernel level once (see dispatch.h). The build defines
// BN_EXT_HAVE_<LEVEL> for each level it compiled the kernel files at.
#include "cpu/dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

namespace bn_ext::cpu {

#define BN_EXT_DECLARE_LEVEL(LEVEL)                   \
  namespace LEVEL {                                   \
  extern const BatchNormKernels batch_norm_kernels;  \
  extern const RowNormKernels row_norm_kernels;       \
  extern const GroupNormKernels group_norm_kernels;   \
  }

#if defined(BN_EXT_HAVE_DEFAULT)
BN_EXT_DECLARE_LEVEL(DEFAULT)
#endif
#if defined(BN_EXT_HAVE_AVX2)
BN_EXT_DECLARE_LEVEL(AVX2)
#endif
#if defined(BN_EXT_HAVE_AVX512)
BN_EXT_DECLARE_LEVEL(AVX512)
#endif
#if defined(BN_EXT_HAVE_AVX512_BF16)
BN_EXT_DECLARE_LEVEL(AVX512_BF16)
#endif

namespace {

#define BN_EXT_LEVEL_TABLES(LEVEL) CpuKernels{#LEVEL, &LEVEL::batch_norm_kernels, &LEVEL::row_norm_kernels, &LEVEL::group_norm_kernels}

// Every level of this build, lowest first (CMake builds at least one).
const CpuKernels kLevels[] = {
#if defined(BN_EXT_HAVE_DEFAULT)
    BN_EXT_LEVEL_TABLES(DEFAULT),
#endif
#if defined(BN_EXT_HAVE_AVX2)
    BN_EXT_LEVEL_TABLES(AVX2),
#endif
#if defined(BN_EXT_HAVE_AVX512)
    BN_EXT_LEVEL_TABLES(AVX512),
#endif
#if defined(BN_EXT_HAVE_AVX512_BF16)
    BN_EXT_LEVEL_TABLES(AVX512_BF16),
#endif
};

// Every level name, in the order DEFAULT < AVX2 < AVX512 < AVX512_BF16.
const char* const kOrder[] = {"DEFAULT", "AVX2", "AVX512", "AVX512_BF16"};

// The rank of a level name (its place in kOrder), or -1.
int level_rank(const std::string& name) {
  const auto it = std::find(std::begin(kOrder), std::end(kOrder), name);
  return it == std::end(kOrder) ? -1 : static_cast<int>(it - std::begin(kOrder));
}

// The best level this CPU runs: ATen's choice ("DEFAULT", "AVX2" or "AVX512"
// on x86-64, after ATEN_CPU_CAPABILITY), plus the bfloat16 check.
int cpu_rank() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string aten = at::get_cpu_capability();
  if (aten == "AVX512" && __builtin_cpu_supports("avx512bf16")) return level_rank("AVX512_BF16");
  return std::max(level_rank(aten), 0);
#else
  return level_rank("DEFAULT");
#endif
}

// BN_EXT_CPU_CAPABILITY's rank, or the highest when it is unset.
int requested_rank() {
  const char* env = std::getenv("BN_EXT_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return level_rank("AVX512_BF16");
  std::string name(env);
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::toupper(ch); });
  const int rank = level_rank(name);
  TORCH_CHECK_VALUE(rank >= 0, "BN_EXT_CPU_CAPABILITY must be DEFAULT, AVX2, AVX512 or AVX512_BF16, got '", env,
                    "'");
  return rank;
}

// The best level of this build at or below both the CPU's and the requested
// one. A build without DEFAULT (BN_EXT_CPU_LEVELS) may have none.
const CpuKernels& choose_level() {
  const int limit = std::min(cpu_rank(), requested_rank());
  const CpuKernels* chosen = nullptr;
  std::string built;
  for (const auto& level : kLevels) {
    if (level_rank(level.level) <= limit) chosen = &level;
    built += (built.empty() ? "" : ", ") + std::string(level.level);
  }
  TORCH_CHECK(chosen != nullptr, "bn_ext's CPU kernels were built at ", built, " only, and this CPU runs up to ",
              kOrder[cpu_rank()], " (BN_EXT_CPU_CAPABILITY asks for at most ", kOrder[requested_rank()],
              "): rebuild with DEFAULT in BN_EXT_CPU_LEVELS");
  return *chosen;
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = choose_level();
  return chosen;
}

std::vector<std::string> available_cpu_capabilities() {
  std::vector<std::string> names;
  for (const auto& level : kLevels) {
    if (level_rank(level.level) <= cpu_rank()) names.emplace_back(level.level);
  }
  return names;
}

// The largest cache level Linux lists for cpu0 (sysfs: "32768K"), else 32
// MB. Not sysconf(_SC_LEVEL3_CACHE_SIZE): in a virtual machine glibc read
// 320 MB from cpuid where the CPU's L3 is 32 MB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
      int64_t size = 0;
      std::string unit;
      if (!(file >> size)) break;
      file >> unit;
      const int64_t scale = unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : 1;
      largest = std::max(largest, size * scale);
    }
    return largest > 0 ? largest : int64_t(32) << 20;
  }();
  return bytes;
}

}  // namespace bn_ext::cpu
