// BatchNorm device code. Two layouts, as on the CPU: channels-first (N, C, S)
// and channels-last (M, C). Per-channel reductions run in two stages: a grid
// of (channel, partial) blocks writes one state per block, then a warp per
// channel merges its partials in index order. No floating-point atomics, so
// the result depends on the shape and the device only, never on timing.
// One elementwise kernel serves forward, eval and backward:
//   out = dy * dy_scale + (x - center) * x_scale + constant   (coefficients per channel)
#pragma once

#include "device_common.cuh"

namespace bn_ext::cuda {

// Threads per block of the reduction and elementwise kernels.
constexpr int kBatchNormThreads = 256;
// Rows a channels-last reduction block walks at once (blockDim.y).
constexpr int kChannelsLastRows = 8;

// Per-channel coefficient arrays, each of C values, stored back to back.
// kShift: the forward's bias, for a backward form that recomputes the forward value.
enum Coefficient { kCenter = 0, kDyScale = 1, kXScale = 2, kConstant = 3, kShift = 4, kCoefficientCount = 5 };

// A value of each channel (its first element) that its statistics are taken
// about: x - shift is exact for values near the mean, so a large mean
// (1e4 with std 1e-2) costs no precision in the moments or the normalisation.
template <typename T>
struct ChannelShift {
  const T* x;
  int64_t channel_stride;  // S channels-first, 1 channels-last
  __device__ __forceinline__ acc_t<T> operator()(int64_t c) const { return to_acc(x[c * channel_stride]); }
};

// What a reduction folds in per element: Welford moments of x - shift ...
// (Shift: the value of reduction domain c, as ChannelShift.)
template <typename T, typename Shift = ChannelShift<T>>
struct MomentsReduction {
  using A = acc_t<T>;
  using State = Moments<A>;
  static constexpr bool kReadsDy = false;
  const T* x;
  const T* dy;  // unused
  Shift shift;
  __device__ __forceinline__ A center(int64_t c) const { return shift(c); }
  __device__ __forceinline__ static void add(State& s, A x, A, A center) { s.add(x - center); }
};

// The mean of reduction domain c: one value per domain ...
template <typename A>
struct PerChannel {
  const A* mean;
  __device__ __forceinline__ A operator()(int64_t c) const { return mean[c]; }
};

// ... or one per `channels` adjacent domains (GroupNorm's groups).
template <typename A>
struct PerGroup {
  const A* mean;
  int64_t channels;
  __device__ __forceinline__ A operator()(int64_t c) const { return mean[c / channels]; }
};

// The backward's reduction, GradSumsReduction (sum(dz) and sum(dz * (x -
// mean))), follows the activations it may take dy through, further below.

// Channels-first partials. Block (c, p) of a blockDim (bx, by) grid walks
// items = (plane n, chunk of bx * V elements of the plane); row y of the block
// takes items p * by + y, then every partials * by-th. One state per block.
template <typename R, typename index_t, int V>
__global__ void channels_first_partials(R r, index_t C, index_t S, index_t chunks_per_plane, index_t items,
                                        typename R::State* partials) {
  using State = typename R::State;
  using A = typename R::A;
  const index_t c = blockIdx.x;
  const int p = blockIdx.y, count = gridDim.y;
  const A center = r.center(c);
  State s = State::identity();
  for (index_t item = index_t(p) * blockDim.y + threadIdx.y; item < items; item += index_t(count) * blockDim.y) {
    const index_t n = item / chunks_per_plane;
    const index_t s0 = (item - n * chunks_per_plane) * blockDim.x * V + threadIdx.x * V;
    if (s0 >= S) continue;
    const index_t offset = (n * C + c) * S + s0;
    A x[V], dy[V];
    load_acc<V>(r.x + offset, x);
    if constexpr (R::kReadsDy) {
      load_acc<V>(r.dy + offset, dy);
      r.gradient(dy, x, offset, int64_t(c), 0);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) R::add(s, x[v], R::kReadsDy ? dy[v] : A(0), center);
  }
  __shared__ State scratch[kWarp];
  s = block_merge(s, scratch);
  if (threadIdx.x == 0 && threadIdx.y == 0) partials[int64_t(c) * count + p] = s;
}

// Channels-last partials. Block (b, p, n) of (32, kChannelsLastRows)
// threads: thread x owns channels [c0, c0 + V) of sample n's M rows (one
// sample, n = 0, for BatchNorm), thread row y walks rows p * rows + y, then
// every partials * rows-th; the rows' states are merged in order. Reduction
// domain n * C + c, partials in its order.
template <typename R, typename index_t, int V>
__global__ void channels_last_partials(R r, index_t M, index_t C, typename R::State* partials) {
  using State = typename R::State;
  using A = typename R::A;
  const index_t c0 = (index_t(blockIdx.x) * kWarp + threadIdx.x) * V;
  const index_t n = blockIdx.z;
  const int p = blockIdx.y, count = gridDim.y;
  const bool active = c0 < C;
  State s[V];
  A center[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    s[v] = State::identity();
    center[v] = active ? r.center(int64_t(n) * C + c0 + v) : A(0);
  }
  if (active) {
    for (index_t m = index_t(p) * kChannelsLastRows + threadIdx.y; m < M; m += index_t(count) * kChannelsLastRows) {
      const index_t offset = (n * M + m) * C + c0;
      A x[V], dy[V];
      load_acc<V>(r.x + offset, x);
      if constexpr (R::kReadsDy) {
        load_acc<V>(r.dy + offset, dy);
        r.gradient(dy, x, offset, int64_t(n) * C + c0, 1);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) R::add(s[v], x[v], R::kReadsDy ? dy[v] : A(0), center[v]);
    }
  }
  __shared__ State scratch[kChannelsLastRows][kWarp][V];
#pragma unroll
  for (int v = 0; v < V; ++v) scratch[threadIdx.y][threadIdx.x][v] = s[v];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      State total = scratch[0][threadIdx.x][v];
      for (int y = 1; y < kChannelsLastRows; ++y) total = State::merge(total, scratch[y][threadIdx.x][v]);
      partials[(int64_t(n) * C + c0 + v) * count + p] = total;
    }
  }
}

// A warp per channel (blockDim (32, 8)) merges the channel's `count` partials
// in index order (lane l takes l, l + 32, ...; then a fixed tree) and hands
// the total to `finish(c, total)`. count == 0 hands the identity.
template <typename State, typename Finish>
__global__ void channel_finalize(const State* partials, int64_t C, int count, Finish finish) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // a whole warp: its lanes share threadIdx.y
  State s = State::identity();
  for (int p = threadIdx.x; p < count; p += kWarp) s = State::merge(s, partials[c * count + p]);
  s = warp_merge(s);
  if (threadIdx.x == 0) finish(c, s);
}

// A thread per channel.
template <typename F>
__global__ void channel_map(int64_t C, F f) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) f(c);
}

// The forward coefficients of entry e: out = (x - center) * x_scale + (bias -
// offset * x_scale), where offset = mean - center (zero when center is the mean).
template <typename A>
__device__ __forceinline__ void store_forward_coefficients(A* coefficients, int64_t entries, int64_t e, A center,
                                                           A offset, A x_scale, A bias) {
  coefficients[kCenter * entries + e] = center;
  coefficients[kXScale * entries + e] = x_scale;
  coefficients[kConstant * entries + e] = bias - offset * x_scale;
}

// Training forward: batch statistics, saved, and the normalisation's
// coefficients: out = (x - shift) * x_scale + (bias - (mean - shift) * x_scale).
template <typename T>
struct TrainingForwardFinish {
  using A = acc_t<T>;
  ChannelShift<T> shift;
  const A* weight;  // null: 1
  const A* bias;    // null: 0
  A eps;
  A* save_mean;
  A* save_invstd;
  A* coefficients;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t c, const Moments<A>& m) const {
    const A invstd = inverse_sqrt(m.m2 / m.count + eps);
    const A mean = shift(c) + m.mean, x_scale = weight ? weight[c] * invstd : invstd;
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    // From the statistics as saved, so a backward that recomputes the
    // forward's value (BatchNorm + activation) finds it exactly.
    store_forward_coefficients(coefficients, C, c, mean, A(0), x_scale, bias ? bias[c] : A(0));
  }
};

// Eval forward: the running statistics, saved, and the coefficients.
template <typename A>
struct EvalForwardCoefficients {
  const A* weight;
  const A* bias;
  const A* running_mean;
  const A* running_var;
  A eps;
  A* save_mean;
  A* save_invstd;
  A* coefficients;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t c) const {
    const A invstd = inverse_sqrt(running_var[c] + eps);
    save_mean[c] = running_mean[c];
    save_invstd[c] = invstd;
    store_forward_coefficients(coefficients, C, c, running_mean[c], A(0), weight ? weight[c] * invstd : invstd,
                               bias ? bias[c] : A(0));
  }
};

// The forward's coefficients from saved statistics (BatchNorm + activation's
// backward recomputes the forward's value from them).
template <typename A>
struct ForwardCoefficientsFromStats {
  const A* weight;  // null: 1
  const A* bias;    // null: 0
  const A* mean;
  const A* invstd;
  A* coefficients;
  int64_t C;
  __device__ __forceinline__ void operator()(int64_t c) const {
    store_forward_coefficients(coefficients, C, c, mean[c], A(0), weight ? weight[c] * invstd[c] : invstd[c],
                               bias ? bias[c] : A(0));
  }
};

// For batch_norm_stats: float64 mean and M2.
template <typename T>
struct MomentsFinish {
  ChannelShift<T> shift;
  double* mean;
  double* m2;
  __device__ __forceinline__ void operator()(int64_t c, const Moments<acc_t<T>>& m) const {
    mean[c] = static_cast<double>(shift(c)) + static_cast<double>(m.mean);
    m2[c] = m.m2;
  }
};

// Backward: the parameter gradients asked for and dx's coefficients, from
// sum(dy) and sum(dy * (x - mean)). With x_hat = (x - mean) * invstd:
//   training: dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
//   eval:     dx = w * invstd * dy
template <typename A>
struct BackwardFinish {
  const A* weight;
  const A* mean;
  const A* invstd;
  A count;
  bool training;
  A* grad_weight;   // null: not asked for
  A* grad_bias;     // null: not asked for
  A* coefficients;  // null: dx not asked for
  int64_t C;
  bool stores_shift = false;  // kShift = bias (AffineThroughActivation's)
  const A* bias = nullptr;    // null: 0
  __device__ __forceinline__ void operator()(int64_t c, const Sums<A>& s) const {
    const A sum_dy = s.first, sum_dy_xmu = s.second;
    if (grad_weight) grad_weight[c] = sum_dy_xmu * invstd[c];
    if (grad_bias) grad_bias[c] = sum_dy;
    if (!coefficients) return;
    // Written as the forward's scale (weight * invstd) so the recomputed forward value is exact.
    const A dy_scale = weight ? weight[c] * invstd[c] : invstd[c];
    if (stores_shift) coefficients[kShift * C + c] = bias ? bias[c] : A(0);
    coefficients[kCenter * C + c] = mean[c];
    coefficients[kDyScale * C + c] = dy_scale;
    coefficients[kXScale * C + c] = training ? -dy_scale * invstd[c] * invstd[c] * sum_dy_xmu / count : A(0);
    coefficients[kConstant * C + c] = training ? -dy_scale * sum_dy / count : A(0);
  }
};

// Running statistics: new = (1 - f) * old + f * batch, f = momentum, or
// 1 / num_batches_tracked for a cumulative average (read on the device, so
// the host never waits). Double arithmetic, as the CPU op; C values only.
template <typename A>
struct RunningStatsUpdate {
  const A* save_mean;
  const A* save_invstd;
  const A* old_mean;  // null: no running_mean
  const A* old_var;   // null: no running_var
  A* new_mean;
  A* new_var;
  double momentum;
  const int64_t* num_batches_tracked;  // non-null: cumulative average
  double eps;
  double unbias;
  __device__ __forceinline__ void operator()(int64_t c) const {
    const double f = num_batches_tracked ? 1.0 / static_cast<double>(*num_batches_tracked) : momentum;
    if (old_mean) new_mean[c] = static_cast<A>((1.0 - f) * old_mean[c] + f * save_mean[c]);
    if (old_var) {
      const double invstd = save_invstd[c];
      const double var = (1.0 / (invstd * invstd) - eps) * unbias;
      new_var[c] = static_cast<A>((1.0 - f) * old_var[c] + f * var);
    }
  }
};

// Elementwise forms: what the pass computes from dy, x, aux (a third input:
// BatchNorm's residual) and a channel's coefficients (center, dy_scale, x_scale,
// constant). A form reads only the operands it declares.
//   Affine<kReadsDy, kReadsX>: [dy * dy_scale] + [(x - center) * x_scale] + constant
//   ActivatedAffine<T, Act, kResidual>: act(Affine<false, true> [+ aux])
//   ActivationGradient<T, Act>: dy * act'(z) for that forward value z (no residual)
//   AffineThroughActivation<T, Act, kResidual>: Affine<true, true> of that dy * act'(z)
// The activations round z to T where the unfused ops would have stored it.
// Only AffineThroughActivation reads the fifth coefficient, shift.
template <bool kDy, bool kX>
struct Affine {
  static constexpr bool kReadsDy = kDy, kReadsX = kX, kReadsAux = false, kReadsShift = false;
  template <typename A>
  __device__ __forceinline__ static A apply(A dy, A x, A, A center, A dy_scale, A x_scale, A constant, A = A(0)) {
    A o = constant;
    if constexpr (kDy) o += dy * dy_scale;
    if constexpr (kX) o += (x - center) * x_scale;
    return o;
  }
};

__device__ __forceinline__ float exponential(float v) { return expf(v); }
__device__ __forceinline__ double exponential(double v) { return exp(v); }

// Activations of the normalised value z and their gradients dy * act'(z),
// as torch's relu and silu kernels compute them.
struct NoActivation {
  template <typename A>
  __device__ __forceinline__ static A value(A z) {
    return z;
  }
  template <typename A>
  __device__ __forceinline__ static A grad(A dy, A) {
    return dy;
  }
};

struct Relu {
  template <typename A>
  __device__ __forceinline__ static A value(A z) {
    return z > A(0) || z != z ? z : A(0);  // NaN kept
  }
  template <typename A>
  __device__ __forceinline__ static A grad(A dy, A z) {
    return z <= A(0) ? A(0) : dy;  // NaN passes, as torch's threshold_backward
  }
};

struct Silu {
  template <typename A>
  __device__ __forceinline__ static A value(A z) {
    return z / (A(1) + exponential(-z));
  }
  template <typename A>
  __device__ __forceinline__ static A grad(A dy, A z) {
    const A s = A(1) / (A(1) + exponential(-z));
    return dy * s * (A(1) + z * (A(1) - s));
  }
};

// v as T would hold it.
template <typename T, typename A>
__device__ __forceinline__ A round_to_type(A v) {
  return to_acc(from_acc<T>(v));
}

// The pre-activation value z: the normalised x [+ aux], each sum rounded to T.
template <typename T, bool kResidual, typename A>
__device__ __forceinline__ A activation_input(A x, A aux, A center, A dy_scale, A x_scale, A constant) {
  const A y = round_to_type<T>(Affine<false, true>::apply(A(0), x, A(0), center, dy_scale, x_scale, constant));
  return kResidual ? round_to_type<T>(y + aux) : y;
}

template <typename T, typename Act, bool kResidual = false>
struct ActivatedAffine {
  static constexpr bool kReadsDy = false, kReadsX = true, kReadsAux = kResidual, kReadsShift = false;
  template <typename A>
  __device__ __forceinline__ static A apply(A, A x, A aux, A center, A dy_scale, A x_scale, A constant, A = A(0)) {
    return Act::value(activation_input<T, kResidual>(x, aux, center, dy_scale, x_scale, constant));
  }
};

template <typename T, typename Act>
struct ActivationGradient {
  static constexpr bool kReadsDy = true, kReadsX = true, kReadsAux = false, kReadsShift = false;
  template <typename A>
  __device__ __forceinline__ static A apply(A dy, A x, A, A center, A dy_scale, A x_scale, A constant, A = A(0)) {
    return Act::grad(dy, activation_input<T, false>(x, A(0), center, dy_scale, x_scale, constant));
  }
};

// BatchNorm + activation's dx: the forward value is z = (x - center) * dy_scale
// + shift [+ aux], as the forward computed it (center the mean, dy_scale =
// weight * invstd its scale, shift its bias), and dz rounds as it is stored.
template <typename T, typename Act, bool kResidual>
struct AffineThroughActivation {
  static constexpr bool kReadsDy = true, kReadsX = true, kReadsAux = kResidual, kReadsShift = true;
  template <typename A>
  __device__ __forceinline__ static A apply(A dy, A x, A aux, A center, A dy_scale, A x_scale, A constant, A shift) {
    const A dz = round_to_type<T>(Act::grad(dy, activation_input<T, kResidual>(x, aux, center, A(0), dy_scale, shift)));
    return Affine<true, true>::apply(dz, x, A(0), center, dy_scale, x_scale, constant);
  }
};

// The gradient a backward's sums take: dy itself ...
struct PlainGradient {
  const void* aux = nullptr;  // no third input, no output
  void* dz = nullptr;
  template <int V, typename index_t, typename A>
  __device__ __forceinline__ void operator()(A (&)[V], const A (&)[V], index_t, int64_t, int64_t) const {}
};

// ... or dz = dy * act'(z), rounded to T as the unfused ops store it, of the
// forward's value z recomputed from x [+ aux] and the forward's coefficients
// (entry e of `entries`); stored to dz where it is wanted (the residual's gradient).
template <typename T, typename Act, bool kResidual>
struct GradientThrough {
  using A = acc_t<T>;
  const T* aux;  // the residual, if kResidual
  T* dz;         // null: not stored
  const A* forward;
  int64_t entries;
  // Elements offset .. offset + V of entries entry + v * entry_step.
  template <int V, typename index_t>
  __device__ __forceinline__ void operator()(A (&dy)[V], const A (&x)[V], index_t offset, int64_t entry,
                                             int64_t entry_step) const {
    A av[V];
    if constexpr (kResidual) load_acc<V>(aux + offset, av);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t e = entry + v * entry_step;
      const A z = activation_input<T, kResidual>(x[v], kResidual ? av[v] : A(0), forward[kCenter * entries + e], A(0),
                                                 forward[kXScale * entries + e], forward[kConstant * entries + e]);
      dy[v] = round_to_type<T>(Act::grad(dy[v], z));
    }
    if (dz) store_acc<V>(dz + offset, dy);
  }
};

// ... or sum(dz) and sum(dz * (x - mean)) for the backward, dz = Gradient's.
template <typename T, typename Mean = PerChannel<acc_t<T>>, typename Gradient = PlainGradient>
struct GradSumsReduction {
  using A = acc_t<T>;
  using State = Sums<A>;
  static constexpr bool kReadsDy = true;
  const T* x;
  const T* dy;
  Mean mean;
  Gradient gradient{};
  __device__ __forceinline__ A center(int64_t c) const { return mean(c); }
  __device__ __forceinline__ static void add(State& s, A x, A dy, A center) {
    s.first += dy;
    s.second += dy * (x - center);
  }
};

// The elementwise pass over `numel` elements, V at a time (grid-stride).
// Channels-first (inner = S): element i takes coefficient entry (i / S) % C.
// Channels-last (inner = 1): rows of C channels, `sample` elements a sample
// (numel for one set), entry (i / sample) * C + i % C; a pack holds V
// consecutive channels (C % V == 0). `entries` coefficients of each kind.
template <typename T, typename index_t, int V, typename Form>
__global__ void channel_affine(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ aux,
                               T* __restrict__ out, const acc_t<T>* __restrict__ coefficients, index_t numel,
                               index_t C, index_t inner, index_t sample, index_t entries) {
  using A = acc_t<T>;
  const index_t channel_step = inner == 1 ? 1 : 0;
  const index_t stride = index_t(gridDim.x) * blockDim.x * V;
  for (index_t i = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const index_t c = inner == 1 ? i / sample * C + i % C : (i / inner) % C;
    A xv[V], gv[V], av[V], o[V];
    if constexpr (Form::kReadsX) load_acc<V>(x + i, xv);
    if constexpr (Form::kReadsDy) load_acc<V>(dy + i, gv);
    if constexpr (Form::kReadsAux) load_acc<V>(aux + i, av);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const index_t cv = c + v * channel_step;
      o[v] = Form::apply(Form::kReadsDy ? gv[v] : A(0), Form::kReadsX ? xv[v] : A(0),
                         Form::kReadsAux ? av[v] : A(0), coefficients[kCenter * entries + cv],
                         coefficients[kDyScale * entries + cv], coefficients[kXScale * entries + cv],
                         coefficients[kConstant * entries + cv],
                         Form::kReadsShift ? coefficients[kShift * entries + cv] : A(0));
    }
    store_acc<V>(out + i, o);
  }
}

}  // namespace bn_ext::cuda
