// Host launchers of the per-channel reductions and the elementwise pass
// (kernels/batch_norm.cuh), shared by the BatchNorm and GroupNorm ops.
#pragma once

#include "batch_norm_common.h"
#include "cuda/kernels/batch_norm.cuh"
#include "cuda/launch_utils.h"

#include <initializer_list>

namespace bn_ext::cuda {

// A vector width every access of the layout allows: channels-first packs stay
// inside a plane (S % V == 0), channels-last packs inside a row (C % V == 0).
template <typename T>
bool can_vectorize(const BatchNormGeometry& g, std::initializer_list<const void*> pointers) {
  constexpr int V = kPackSize<T>;
  if ((g.channels_last ? g.C : g.S) % V != 0) return false;
  return std::all_of(pointers.begin(), pointers.end(), [](const void* p) { return p == nullptr || aligned16(p); });
}

inline int next_power_of_two(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// finish(d, total) for each of `domains` domains, the total a merge in index
// order of the domain's `count` states partials[d * count, (d + 1) * count).
template <typename State, typename Finish>
void finalize_domains(const State* partials, int64_t domains, int count, const Finish& finish) {
  if (domains == 0) return;
  const auto finalize = channel_finalize<State, Finish>;
  BN_EXT_LAUNCH(finalize, dim3(static_cast<unsigned>(ceil_div(domains, 8))), dim3(kWarp, 8), 0, current_stream(),
                partials, domains, count, finish);
  BN_EXT_LAUNCH_CHECK();
}

// Per-channel reduction of `r` in two stages, then finish(c, total). A
// channels-last input may hold `samples` samples of reduce_size() / samples
// rows each, reduced apart: domain n * C + c, finish called for each.
template <typename T, typename R, typename Finish>
void reduce_channels(const R& r, const BatchNormGeometry& g, const Finish& finish,
                     const at::TensorOptions& acc_options, int64_t samples = 1) {
  using State = typename R::State;
  using A = typename R::A;
  constexpr int kFields = sizeof(State) / sizeof(A);
  const cudaStream_t stream = current_stream();
  const int target_blocks = kBlocksPerSm * sm_count();
  bool vectorize;
  if constexpr (R::kReadsDy) {
    vectorize = can_vectorize<T>(g, {r.x, r.dy, r.gradient.aux, r.gradient.dz});
  } else {
    vectorize = can_vectorize<T>(g, {r.x});
  }
  int count = 1;
  at::Tensor partials;
  auto launch = [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    dispatch_index_type(g.N * g.C * g.S, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (g.channels_last) {
        const int64_t column_blocks = ceil_div(g.C, int64_t(kWarp) * V);
        const int64_t rows = g.reduce_size() / samples;
        const int64_t max_count = std::min<int64_t>(1024, ceil_div(rows, 4 * kChannelsLastRows));
        count = static_cast<int>(std::clamp<int64_t>(ceil_div(target_blocks, column_blocks * samples), 1, max_count));
        partials = at::empty({samples * g.C * count * kFields}, acc_options);
        const dim3 grid(static_cast<unsigned>(column_blocks), static_cast<unsigned>(count),
                        static_cast<unsigned>(samples));
        const dim3 block(kWarp, kChannelsLastRows);
        const auto kernel = channels_last_partials<R, index_t, V>;
        BN_EXT_LAUNCH(kernel, grid, block, 0, stream, r, index_t(rows), index_t(g.C),
                      device_data_mut<State>(partials));
      } else {
        const int bx = std::clamp(next_power_of_two(ceil_div(g.S, V)), kWarp, kBatchNormThreads);
        const int by = kBatchNormThreads / bx;
        const int64_t chunks_per_plane = ceil_div(g.S, int64_t(bx) * V);
        const int64_t items = g.N * chunks_per_plane;
        const int64_t max_count = std::min<int64_t>(1024, ceil_div(items, by));
        count = static_cast<int>(std::clamp<int64_t>(ceil_div(target_blocks, g.C), 1, max_count));
        partials = at::empty({g.C * count * kFields}, acc_options);
        const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(count));
        const dim3 block(bx, by);
        const auto kernel = channels_first_partials<R, index_t, V>;
        BN_EXT_LAUNCH(kernel, grid, block, 0, stream, r, index_t(g.C),
                      index_t(g.S), index_t(chunks_per_plane), index_t(items), device_data_mut<State>(partials));
      }
      BN_EXT_LAUNCH_CHECK();
    });
  };
  if (vectorize) {
    launch(Width<kPackSize<T>>{});
  } else {
    launch(Width<1>{});
  }
  finalize_domains(device_data<State>(partials), samples * g.C, count, finish);
}

template <typename T>
ChannelShift<T> channel_shift(const at::Tensor& x, const BatchNormGeometry& g) {
  return {device_data<T>(x), g.channels_last ? 1 : g.S};
}

// finish(c, identity) for every channel: coefficients that need no reduction.
template <typename State, typename Finish>
void finish_without_reduction(int64_t C, const Finish& finish) {
  finalize_domains(static_cast<const State*>(nullptr), C, 0, finish);
}

template <typename F>
void map_channels(int64_t C, const F& f) {
  if (C == 0) return;  // an empty grid is a launch error
  const auto kernel = channel_map<F>;
  BN_EXT_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(C, 128))), dim3(128), 0, current_stream(), C, f);
  BN_EXT_LAUNCH_CHECK();
}

// out = Form(dy, x, aux, coefficients) over the whole tensor; channels-last
// inputs of `samples` samples take a coefficient set per sample.
template <typename T, typename Form>
void affine_pass(const BatchNormGeometry& g, const T* dy, const T* x, T* out, const acc_t<T>* coefficients,
                 int64_t samples = 1, const T* aux = nullptr) {
  const int64_t numel = g.N * g.C * g.S;
  if (numel == 0) return;
  const bool vectorize = can_vectorize<T>(g, {dy, x, aux, out});
  auto launch = [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    dispatch_index_type(numel, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t blocks =
          std::min<int64_t>(ceil_div(numel / V, kBatchNormThreads), int64_t(sm_count()) * kBlocksPerSm * 8);
      const auto kernel = channel_affine<T, index_t, V, Form>;
      BN_EXT_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)),
                    dim3(kBatchNormThreads), 0, current_stream(), dy, x, aux, out, coefficients, index_t(numel),
                    index_t(g.C), index_t(g.channels_last ? 1 : g.S), index_t(numel / samples),
                    index_t(g.channels_last ? samples * g.C : g.C));
      BN_EXT_LAUNCH_CHECK();
    });
  };
  if (vectorize) {
    launch(Width<kPackSize<T>>{});
  } else {
    launch(Width<1>{});
  }
}

// with_activation (norm_common.h) over this backend's activations.
template <typename Fn>
void with_activation(Activation act, const Fn& fn) {
  bn_ext::with_activation<NoActivation, Relu, Silu>(act, fn);
}

}  // namespace bn_ext::cuda
