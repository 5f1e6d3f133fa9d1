// GroupNorm device code (InstanceNorm: one channel per group), on
// BatchNorm's reductions and elementwise pass (batch_norm.cuh) through views
// of the same memory, as on the CPU:
//   channels-first, group r = n * G + g is one contiguous run of D = C/G * S
//     values: BatchNorm's channels-first reduction of a (1, N*G, D) input;
//   channels-last, per-(n, c) partial states over each sample's S rows (the
//     channels-last reduction with a sample per grid z), merged per group by
//     channel_finalize with C/G partials a group.
// Every state of a group is taken about the group's first value, so states
// merge exactly and a large mean costs no precision. Coefficients are per
// (n, c), entry r * C/G + j for channel j of group r, in both layouts.
#pragma once

#include "batch_norm.cuh"

namespace bn_ext::cuda {

// The first value of group r = n * G + g: at n * sample + g * group_step
// (sample = C * S; group_step = C/G * S channels-first, C/G channels-last).
template <typename T>
struct GroupFirst {
  const T* x;
  int64_t G, sample, group_step;
  __device__ __forceinline__ acc_t<T> operator()(int64_t r) const {
    return to_acc(x[r / G * sample + r % G * group_step]);
  }
};

// The shift of reduction domain n * C + c (channels-last): its group's first value.
template <typename T>
struct DomainGroupShift {
  GroupFirst<T> first;
  int64_t channels;  // per group
  __device__ __forceinline__ acc_t<T> operator()(int64_t domain) const { return first(domain / channels); }
};

// Keeps each domain's total for a second merge.
template <typename State>
struct StoreState {
  State* states;
  __device__ __forceinline__ void operator()(int64_t d, const State& s) const { states[d] = s; }
};

// Forward: group r's statistics, saved, and its channels' coefficients
// out = (x - first) * x_scale + (bias - (mean - first) * x_scale), x_scale = w * rstd.
template <typename T>
struct GroupForwardFinish {
  using A = acc_t<T>;
  GroupFirst<T> first;
  const A* weight;  // null: 1
  const A* bias;    // null: 0
  A eps;
  A* save_mean;
  A* save_rstd;
  A* coefficients;
  int64_t channels;  // per group
  int64_t entries;   // N * C
  __device__ __forceinline__ void operator()(int64_t r, const Moments<A>& m) const {
    const A rstd = inverse_sqrt(m.m2 / m.count + eps);
    const A center = first(r);
    save_mean[r] = center + m.mean;
    save_rstd[r] = rstd;
    const int64_t c0 = r % first.G * channels;
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t c = c0 + j;
      store_forward_coefficients(coefficients, entries, r * channels + j, center, m.mean,
                                 weight ? weight[c] * rstd : rstd, bias ? bias[c] : A(0));
    }
  }
};

// The forward coefficients again, from the saved statistics (the backward
// through an activation recomputes the normalised value).
template <typename A>
struct GroupCoefficientsFromStats {
  const A* mean;
  const A* rstd;
  const A* weight;
  const A* bias;
  A* coefficients;
  int64_t G, channels, entries;
  __device__ __forceinline__ void operator()(int64_t r) const {
    const int64_t c0 = r % G * channels;
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t c = c0 + j;
      store_forward_coefficients(coefficients, entries, r * channels + j, mean[r], A(0),
                                 weight ? weight[c] * rstd[r] : rstd[r], bias ? bias[c] : A(0));
    }
  }
};

// Backward, per (n, c) domain d: keeps sum(dy), sum(dy * (x - mean)) for the
// parameter gradients, and their products with the channel's weight for the
// group sums A = sum(w dy), B = sum(w dy (x - mean)).
template <typename A>
struct ChannelGradSumsFinish {
  const A* weight;  // null: 1
  int64_t C;
  Sums<A>* raw;
  Sums<A>* weighted;
  __device__ __forceinline__ void operator()(int64_t d, const Sums<A>& s) const {
    raw[d] = s;
    const A w = weight ? weight[d % C] : A(1);
    weighted[d] = {w * s.first, w * s.second};
  }
};

// dx's coefficients of group r's channels, with D = C/G * S values a group:
//   dx = rstd * w * dy - rstd * A / D - (x - mean) * rstd^3 * B / D
template <typename A>
struct GroupBackwardFinish {
  const A* weight;
  const A* mean;
  const A* rstd;
  A count;  // D
  A* coefficients;
  int64_t G, channels, entries;
  __device__ __forceinline__ void operator()(int64_t r, const Sums<A>& s) const {
    const A rs = rstd[r];
    const A x_scale = -rs * rs * rs * s.second / count, constant = -rs * s.first / count;
    const int64_t c0 = r % G * channels;
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t e = r * channels + j;
      coefficients[kCenter * entries + e] = mean[r];
      coefficients[kDyScale * entries + e] = (weight ? weight[c0 + j] : A(1)) * rs;
      coefficients[kXScale * entries + e] = x_scale;
      coefficients[kConstant * entries + e] = constant;
    }
  }
};

// Per channel c: dweight = sum_n rstd * sum(dy (x - mean)), dbias = sum_n
// sum(dy), over the samples in order.
template <typename A>
struct GroupParamGrads {
  const Sums<A>* raw;
  const A* rstd;
  int64_t N, C, channels;
  A* grad_weight;  // null: not asked for
  A* grad_bias;    // null: not asked for
  __device__ __forceinline__ void operator()(int64_t c) const {
    A dw = A(0), db = A(0);
    const int64_t G = C / channels;
    for (int64_t n = 0; n < N; ++n) {
      dw += rstd[n * G + c / channels] * raw[n * C + c].second;
      db += raw[n * C + c].first;
    }
    if (grad_weight) grad_weight[c] = dw;
    if (grad_bias) grad_bias[c] = db;
  }
};

}  // namespace bn_ext::cuda
