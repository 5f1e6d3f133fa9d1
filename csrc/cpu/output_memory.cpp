#include "cpu/output_memory.h"

#include "bn_ext/bn_ext.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <thread>

namespace bn_ext::cpu {
namespace {

constexpr size_t kPage = 4096;
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

// A block of memory from torch's own CPU allocation (c10::alloc_cpu), so an
// output that misses the cache costs exactly what torch's output would: no
// memory of bn_ext's own, no huge-page advice. (Advising fresh mappings for
// huge pages was tried: their first touch ran from 8.8 GB/s to 0.25 GB/s on
// a virtual machine with THP defrag=madvise, against 1-2 GB/s for 4 KB pages,
// so on some machines a first call was three times slower than torch's.)
struct Block {
  void* data;
  size_t capacity;
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t capacity = (std::max<size_t>(n, 1) + kPage - 1) / kPage * kPage;
    Block* block = take(capacity);
    if (block == nullptr) block = new Block{c10::alloc_cpu(capacity), capacity};
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
    static auto* cache = [] {
      // fork() copies the mutex as it is: a child forked while another
      // thread held it would wait forever on its first large output
      // (DataLoader workers, multiprocessing). The fork waits for the lock,
      // so the child inherits a consistent cache, and both sides let it go.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return new OutputCache();
    }();
    return *cache;
  }

  void hold_lock(std::chrono::milliseconds duration) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::this_thread::sleep_for(duration);
  }

 private:
  // Frees kept blocks, largest first, until at most `keep` bytes are kept.
  // The caller holds mutex_.
  void release_beyond(size_t keep) {
    while (cached_bytes_ > keep) {
      auto largest = std::prev(free_.end());
      cached_bytes_ -= largest->first;
      c10::free_cpu(largest->second->data);
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
    c10::free_cpu(block->data);
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
  if (bytes < kLargeOutputBytes) return at::empty_like(x, format);
  OutputCache& cache = OutputCache::instance();
  const auto ks = c10::DispatchKeySet(c10::DispatchKey::CPU);
  if (format != at::MemoryFormat::Preserve) {
    return at::detail::empty_generic(x.sizes(), &cache, ks, x.scalar_type(), format);
  }
  if (!x.is_non_overlapping_and_dense()) return at::empty_like(x, format);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &cache, ks, x.scalar_type());
}

void hold_output_cache_lock(std::chrono::milliseconds duration) { OutputCache::instance().hold_lock(duration); }

}  // namespace bn_ext::cpu

namespace bn_ext {

using cpu::OutputCache;

CpuOutputCacheStats cpu_output_cache_stats() { return OutputCache::instance().stats(); }

void set_cpu_output_cache_limit(size_t bytes) { OutputCache::instance().set_limit(bytes); }

void empty_cpu_output_cache() { OutputCache::instance().release_all(); }

}  // namespace bn_ext
