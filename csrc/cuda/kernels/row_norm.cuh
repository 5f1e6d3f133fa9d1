// LayerNorm and RMSNorm device code (kRms selects RMSNorm: no mean, no bias).
// The input is `rows` rows of D contiguous values. Short rows: a warp per row
// (blockDim (32, rows per block)); long rows: a block per row. A row is read
// in 16-byte packs between a scalar head (up to the first 16-byte boundary)
// and a scalar tail, so rows of any length and offset are vectorised.
// dweight/dbias: float32 (op-math) column partials per block of rows, then a
// fixed-order sum per column.
#pragma once

#include "device_common.cuh"

#include <type_traits>

namespace bn_ext::cuda {

// Threads of a block-per-row block, and rows of a warp-per-row block.
constexpr int kRowBlockThreads = 256;
constexpr int kWarpRowsPerBlock = 4;
// Rows a parameter-gradient block walks at once (blockDim.y).
constexpr int kParamRows = 8;

// Calls f(j, Width<W>) for the pieces of a row this thread owns: elements j,
// j + 1, ..., j + W - 1, with W = V inside the 16-byte aligned body and 1 in
// the head and tail (and everywhere when !vectorized).
template <typename T, typename F>
__device__ __forceinline__ void for_each_row_piece(const T* row, int64_t D, int lane, int lanes, bool vectorized,
                                                   const F& f) {
  constexpr int V = kPackSize<T>;
  int64_t head = D;
  if (vectorized) {
    head = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / sizeof(T));
    if (head > D) head = D;
  }
  for (int64_t j = lane; j < head; j += lanes) f(j, Width<1>{});
  const int64_t body_end = head + (D - head) / V * V;
  for (int64_t j = head + int64_t(lane) * V; j < body_end; j += int64_t(lanes) * V) f(j, Width<V>{});
  for (int64_t j = body_end + lane; j < D; j += lanes) f(j, Width<1>{});
}

// A row's total, on every thread of the row.
template <bool kWarpPerRow, typename State>
__device__ __forceinline__ State row_merge(State s, State* scratch) {
  if constexpr (kWarpPerRow) {
    return shuffle_from(warp_merge(s), 0);
  } else {
    return block_merge(s, scratch);
  }
}

// y = (x - mean) * rstd * weight + bias; mean and rstd saved per row.
template <typename T, bool kRms, bool kWarpPerRow>
__global__ void row_norm_forward(const T* __restrict__ x, const acc_t<T>* __restrict__ weight,
                                 const acc_t<T>* __restrict__ bias, T* __restrict__ y, acc_t<T>* __restrict__ mean_out,
                                 acc_t<T>* __restrict__ rstd_out, int64_t rows, int64_t D, acc_t<T> eps,
                                 bool vectorized) {
  using A = acc_t<T>;
  const int64_t row = kWarpPerRow ? int64_t(blockIdx.x) * blockDim.y + threadIdx.y : int64_t(blockIdx.x);
  if (row >= rows) return;  // warp-per-row: the whole warp
  const int lane = threadIdx.x, lanes = blockDim.x;
  const T* xr = x + row * D;
  T* yr = y + row * D;
  // LayerNorm takes the moments about the row's first value (exact
  // differences near the mean keep a large mean's precision).
  const A shift = kRms || D == 0 ? A(0) : to_acc(xr[0]);
  using State = std::conditional_t<kRms, SquareSum<A>, Moments<A>>;
  __shared__ State scratch[kWarp];
  State st = State::identity();
  for_each_row_piece(xr, D, lane, lanes, vectorized, [&](int64_t j, auto w) {
    constexpr int W = decltype(w)::value;
    A v[W];
    load_acc<W>(xr + j, v);
#pragma unroll
    for (int k = 0; k < W; ++k) st.add(v[k] - shift);
  });
  st = row_merge<kWarpPerRow>(st, scratch);
  A shifted_mean = A(0), rstd;
  if constexpr (kRms) {
    rstd = inverse_sqrt(st.sum / A(D) + eps);
  } else {
    shifted_mean = st.mean;
    rstd = inverse_sqrt(st.m2 / A(D) + eps);
  }
  if (lane == 0) {
    if (!kRms) mean_out[row] = shift + shifted_mean;
    rstd_out[row] = rstd;
  }
  for_each_row_piece(xr, D, lane, lanes, vectorized, [&](int64_t j, auto w) {
    constexpr int W = decltype(w)::value;
    A v[W];
    load_acc<W>(xr + j, v);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      v[k] = ((v[k] - shift) - shifted_mean) * rstd;
      if (weight) v[k] *= weight[j + k];
      if (bias) v[k] += bias[j + k];
    }
    store_acc<W>(yr + j, v);
  });
}

// Per row, with g = dy * weight and x_hat = (x - mean) * rstd (mean 0 for RMSNorm):
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (RMSNorm: no mean(g) term)
template <typename T, bool kRms, bool kWarpPerRow>
__global__ void row_norm_backward_input(const T* __restrict__ dy, const T* __restrict__ x,
                                        const acc_t<T>* __restrict__ weight, const acc_t<T>* __restrict__ mean,
                                        const acc_t<T>* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int64_t D,
                                        bool vectorized) {
  using A = acc_t<T>;
  const int64_t row = kWarpPerRow ? int64_t(blockIdx.x) * blockDim.y + threadIdx.y : int64_t(blockIdx.x);
  if (row >= rows) return;
  const int lane = threadIdx.x, lanes = blockDim.x;
  const int64_t offset = row * D;
  const A row_mean = kRms ? A(0) : mean[row], row_rstd = rstd[row];
  // g and x_hat of the W elements at j.
  auto load = [&](int64_t j, auto w, A (&g)[decltype(w)::value], A (&x_hat)[decltype(w)::value]) {
    constexpr int W = decltype(w)::value;
    load_acc<W>(dy + offset + j, g);
    load_acc<W>(x + offset + j, x_hat);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      if (weight) g[k] *= weight[j + k];
      x_hat[k] = (x_hat[k] - row_mean) * row_rstd;
    }
  };
  __shared__ Sums<A> scratch[kWarp];
  Sums<A> s = Sums<A>::identity();
  for_each_row_piece(x + offset, D, lane, lanes, vectorized, [&](int64_t j, auto w) {
    constexpr int W = decltype(w)::value;
    A g[W], x_hat[W];
    load(j, w, g, x_hat);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      s.first += g[k];
      s.second += g[k] * x_hat[k];
    }
  });
  s = row_merge<kWarpPerRow>(s, scratch);
  const A mean_g = kRms ? A(0) : s.first / A(D), mean_g_x_hat = s.second / A(D);
  for_each_row_piece(x + offset, D, lane, lanes, vectorized, [&](int64_t j, auto w) {
    constexpr int W = decltype(w)::value;
    A g[W], x_hat[W];
    load(j, w, g, x_hat);
#pragma unroll
    for (int k = 0; k < W; ++k) g[k] = row_rstd * (g[k] - mean_g - x_hat[k] * mean_g_x_hat);
    store_acc<W>(dx + offset + j, g);
  });
}

// Column partials of dweight = sum(dy * x_hat) and dbias = sum(dy): block
// (b, p) of (32, kParamRows) threads covers columns [32 b, 32 b + 32) and rows
// p * kParamRows + y, then every count * kParamRows-th; its rows' sums are
// added in order into partials[p][0][j] (dweight) and partials[p][1][j] (dbias).
template <typename T, bool kRms>
__global__ void row_norm_param_partials(const T* __restrict__ dy, const T* __restrict__ x,
                                        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                                        int64_t rows, int64_t D, acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t j = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const int p = blockIdx.y, count = gridDim.y;
  Sums<A> s = Sums<A>::identity();
  if (j < D) {
    for (int64_t r = int64_t(p) * kParamRows + threadIdx.y; r < rows; r += int64_t(count) * kParamRows) {
      const A g = to_acc(dy[r * D + j]);
      const A x_hat = (to_acc(x[r * D + j]) - (kRms ? A(0) : mean[r])) * rstd[r];
      s.first += g * x_hat;
      s.second += g;
    }
  }
  __shared__ Sums<A> scratch[kParamRows][kWarp];
  scratch[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < D) {
    for (int y = 1; y < kParamRows; ++y) s = Sums<A>::merge(s, scratch[y][threadIdx.x]);
    partials[(int64_t(p) * 2) * D + j] = s.first;
    partials[(int64_t(p) * 2 + 1) * D + j] = s.second;
  }
}

// dweight and dbias (either may be null) from `count` partials, added in order.
template <typename A>
__global__ void column_sums(const A* __restrict__ partials, int count, int64_t D, A* __restrict__ dweight,
                            A* __restrict__ dbias) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  A w = A(0), b = A(0);
  for (int p = 0; p < count; ++p) {
    w += partials[(int64_t(p) * 2) * D + j];
    b += partials[(int64_t(p) * 2 + 1) * D + j];
  }
  if (dweight) dweight[j] = w;
  if (dbias) dbias[j] = b;
}

}  // namespace bn_ext::cuda
