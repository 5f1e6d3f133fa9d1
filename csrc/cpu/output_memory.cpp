#include "cpu/output_memory.h"

#include "bn_ext/bn_ext.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace bn_ext::cpu {
namespace {

constexpr size_t kHugePage = size_t(1) << 21;
constexpr size_t kDefaultLimitBytes = size_t(1) << 30;

// The limit at start: BN_EXT_OUTPUT_CACHE_BYTES, else 1 GiB.
size_t initial_limit() {
  const char* env = std::getenv("BN_EXT_OUTPUT_CACHE_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(env, &end, 10);
  TORCH_CHECK(*end == '\0' && env[0] != '-', "BN_EXT_OUTPUT_CACHE_BYTES must be a number of bytes, got '", env, "'");
  return static_cast<size_t>(v);
}

// A block of memory: 2 MB-aligned, a whole number of huge pages.
struct Block {
  void* data;
  size_t capacity;
};

// A 2 MB-aligned mapping of `capacity` bytes of its own (malloc would take
// such sizes from its heap once its mmap threshold has grown, and hand back
// pages that heap trimming and regrowth fault in anew).
void* new_block_memory(size_t capacity) {
#ifdef __linux__
  void* mapped = mmap(nullptr, capacity + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(mapped != MAP_FAILED, "bn_ext: out of memory allocating an output of ", capacity, " bytes");
  const auto begin = reinterpret_cast<uintptr_t>(mapped);
  const uintptr_t aligned = (begin + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  if (aligned > begin) munmap(mapped, aligned - begin);
  const size_t tail = kHugePage - (aligned - begin);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + capacity), tail);
  void* data = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
  // Advice only: a kernel without THP, or a refusal, leaves ordinary pages.
  (void)madvise(data, capacity, MADV_HUGEPAGE);
#endif
  return data;
#else
  void* data = std::aligned_alloc(kHugePage, capacity);
  TORCH_CHECK(data != nullptr, "bn_ext: out of memory allocating an output of ", capacity, " bytes");
  return data;
#endif
}

void free_block_memory(void* data, size_t capacity) {
#ifdef __linux__
  munmap(data, capacity);
#else
  (void)capacity;
  std::free(data);
#endif
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t capacity = (std::max<size_t>(n, 1) + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(capacity);
    if (block == nullptr) block = new Block{new_block_memory(capacity), capacity};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ += block->capacity;
    }
    report(block->data, static_cast<int64_t>(block->capacity));
    return {block->data, block, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  CpuOutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, cached_bytes_, in_use_bytes_, hits_, misses_};
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    release_beyond(bytes);
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_beyond(0);
  }

  static OutputCache& instance() {
    // Never destroyed: outputs may be freed during interpreter shutdown.
    static auto* cache = new OutputCache();
    return *cache;
  }

 private:
  // Frees kept blocks, largest first, until at most `keep` bytes are kept.
  // The caller holds mutex_.
  void release_beyond(size_t keep) {
    while (cached_bytes_ > keep) {
      auto largest = std::prev(free_.end());
      cached_bytes_ -= largest->first;
      free_block_memory(largest->second->data, largest->first);
      delete largest->second;
      free_.erase(largest);
    }
  }

  // The smallest kept block that holds `capacity` bytes without wasting more
  // than as much again, or nullptr.
  Block* take(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(capacity);
    if (it == free_.end() || it->first > 2 * capacity) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    Block* block = it->second;
    cached_bytes_ -= block->capacity;
    free_.erase(it);
    return block;
  }

  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    OutputCache& cache = instance();
    cache.report(block->data, -static_cast<int64_t>(block->capacity));
    std::unique_lock<std::mutex> lock(cache.mutex_);
    cache.in_use_bytes_ -= block->capacity;
    if (cache.cached_bytes_ + block->capacity <= cache.limit_) {
      cache.cached_bytes_ += block->capacity;
      cache.free_.emplace(block->capacity, block);
      return;
    }
    lock.unlock();
    free_block_memory(block->data, block->capacity);
    delete block;
  }

  // Tells torch.profiler's memory profiling, as torch's own CPU allocator does.
  void report(void* data, int64_t bytes) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_bytes_;
      reserved = in_use_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(data, bytes, in_use, reserved, c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;
  size_t limit_ = initial_limit();
  size_t cached_bytes_ = 0, in_use_bytes_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output_like(const at::Tensor& x, at::MemoryFormat format) {
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  // (With the limit at 0 large outputs still come from here, for the huge
  // pages; their memory goes back to the system when they are freed.)
  if (bytes < kLargeOutputBytes) return at::empty_like(x, format);
  OutputCache& cache = OutputCache::instance();
  const auto ks = c10::DispatchKeySet(c10::DispatchKey::CPU);
  if (format != at::MemoryFormat::Preserve) {
    return at::detail::empty_generic(x.sizes(), &cache, ks, x.scalar_type(), format);
  }
  if (!x.is_non_overlapping_and_dense()) return at::empty_like(x, format);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &cache, ks, x.scalar_type());
}

}  // namespace bn_ext::cpu

namespace bn_ext {

using cpu::OutputCache;

CpuOutputCacheStats cpu_output_cache_stats() { return OutputCache::instance().stats(); }

void set_cpu_output_cache_limit(size_t bytes) { OutputCache::instance().set_limit(bytes); }

void empty_cpu_output_cache() { OutputCache::instance().release_all(); }

}  // namespace bn_ext
