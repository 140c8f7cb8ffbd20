// msda.cu: multi-scale deformable attention (Deformable DETR's MSDeformAttn core).
//
//   msda_forward<T, Index>               out = sum over levels and points of weight x bilinear sample
//   msda_backward<T, TAcc, Index>        location and attention-weight gradients (fixed-order warp
//                                        reductions); the value gradient by atomics, when asked
//   msda_value_keys<T, Index>            target (image, pixel, head) and weight of every bilinear corner
//                                        (for sorted_gather.cu's deterministic value gradient)
//
// Notation (cudcn/msda_geometry.py): N images, S pixels of all levels, M heads, D channels per
// head, Lq queries, L levels of H_l x W_l pixels starting at pixel s_l, P points. Layouts:
//   value (N, S, M, D); locations (N, Lq, M, L, P, 2) as (x, y); weights (N, Lq, M, L, P);
//   out and grad_output (N, Lq, M*D); levels (L, 3) int64 rows (H_l, W_l, s_l).
// An *item* is (image n, query q, head m), index (n*Lq + q)*M + m: the row of out and
// grad_output, and the first index of its L*P *samples* (level, point) in locations and
// weights. Sample (l, p) of an item reads pixel (x*W_l - 0.5, y*H_l - 0.5) of level l of
// head m of image n: pixel r*W_l + c of it is value[n, s_l + r*W_l + c, m, :].
//
// A group of `group_lanes` lanes (a power of two up to 32, aligned in its warp) per item;
// every loop that holds a shuffle is warp-uniform, so each lane takes part in every one.
// - forward: the samples go in chunks of group_lanes: lane j of the group loads sample
//   chunk + j (the group's loads are consecutive), then shuffles broadcast each sample's
//   (x, y, weight) to the group, so every location and weight is read once per item. Lanes
//   over D in blocks of V = 16 bytes of channels (8 float16 or bfloat16, 4 float32, 2
//   float64), one vector load per corner where D is a multiple of V and the arrays are
//   aligned, else the same blocks element by element (the same sums, bit for bit); the four
//   corners of a block are loaded before any is used (sampling.cuh's gather_taps); sums in
//   float32 (float64 for float64), in the order (level, point, corner).
// - backward: every lane of the group reads the sample itself (one address: a sector per
//   group; no registers held across samples). Lanes over D one channel each, interleaved
//   (lane k of the group takes channels k, k + group_lanes, ...): a warp's value loads and
//   value-gradient atomics touch consecutive channels of one pixel. Each lane sums its
//   channels' corner products, then the group adds the lanes' sums by a butterfly of
//   __shfl_xor_sync (a fixed order: bitwise repeatable, and every lane ends with the same
//   sums); the group's first lane stores them. A point on row or column -1 counts for the
//   slopes (locate's for_slope). The value gradient is a second pass over the channels.
// Both hold to 64 registers (__launch_bounds__: blocks of 256 threads, kernels.BLOCK, 4 of
// them resident: 50% occupancy).
// The deterministic value gradient (msda_value_keys, a stable sort by key on the host side,
// sorted_gather.cu) turns the atomics' scatter into a gather in a fixed order, as
// dcn_col2im_sorted.cu does for deformable convolution.
#include "dcn_common.cuh"
#include "sampling.cuh"

/// Level l of the table: height, width and first pixel.
template <typename Index>
__device__ __forceinline__ void msda_level(const long long* levels, int l, int& height, int& width,
                                           Index& start, DcnCaller = {}) {
  height = static_cast<int>(dcn_load(levels, 3 * l));
  width = static_cast<int>(dcn_load(levels, 3 * l + 1));
  start = static_cast<Index>(dcn_load(levels, 3 * l + 2));
}

/// Location (x, y) and weight a of sample `at` (item * L*P + sample), in the
/// compute type; (x, y) by one load when `pairs` (locations aligned to 2 elements).
template <typename T, typename Acc, typename Index>
__device__ __forceinline__ void msda_sample(const T* locations, const T* weights, Index at, bool pairs,
                                            Acc& x, Acc& y, Acc& a, DcnCaller = {}) {
  if (pairs) {
    const ChannelVector<T, 2> xy = dcn_load(reinterpret_cast<const ChannelVector<T, 2>*>(locations + 2 * at));
    x = to_compute(xy.v[0]);
    y = to_compute(xy.v[1]);
  } else {
    x = to_compute(dcn_load(locations, 2 * at));
    y = to_compute(dcn_load(locations, 2 * at + 1));
  }
  a = to_compute(dcn_load(weights, at));
}

/// The taps of location (x, y) on a level of height x width pixels: pixel
/// coordinates x*W - 0.5, y*H - 0.5 (grid_sample, align_corners=False),
/// each product rounded before the subtraction as NumPy rounds it.
template <typename Acc>
__device__ __forceinline__ Taps<Acc, int> msda_taps(Acc x, Acc y, int height, int width, bool for_slope) {
  return bilinear_taps<Acc, int>(mul_rn(y, Acc(height)) - Acc(0.5), mul_rn(x, Acc(width)) - Acc(0.5),
                                   height, width, for_slope);
}

/// The item's image and head: the offset of value[n, 0, m, 0].
template <typename Index>
__device__ __forceinline__ Index msda_head(Index item, int queries, Index pixels, int heads, int channels) {
  const Index n = item / (Index(queries) * heads);
  const int m = static_cast<int>(item % heads);
  return (n * pixels * heads + m) * channels;
}

/// Output rows of `items` items: out[item, c] for every channel c.
///
/// group_lanes: lanes per item, a power of two up to 32 (blocks are whole warps).
template <typename T, typename Index>
__global__ void __launch_bounds__(256, 4) msda_forward(
    const T* __restrict__ value, const long long* __restrict__ levels, const T* __restrict__ locations,
    const T* __restrict__ weights, Index items, int queries, Index pixels, int heads, int channels,
    int level_count, int points, int group_lanes, T* __restrict__ out) {
  typedef typename ComputeType<T>::type Acc;
  constexpr int V = 16 / sizeof(T);
  const int samples = level_count * points;
  const int lane = dcn_lane();
  const int group_lane = lane % group_lanes;
  const int group_first = lane - group_lane;
  const Index pixel_stride = Index(heads) * channels;
  const bool vector = channels % V == 0 && aligned_for<V>(value) && aligned_for<V>(out);
  const bool pairs = aligned_for<2>(locations);
  const int blocks = (channels + group_lanes * V - 1) / (group_lanes * V);  // per lane; warp-uniform
  DCN_POINT_LOOP(first, items, group_lanes) {
    // No early exit: every lane takes part in the shuffles below.
    const Index item = first + lane / group_lanes;
    const bool active = item < items;
    const Index head = msda_head(item, queries, pixels, heads, channels);
    for (int block = 0; block < blocks; ++block) {
      const int c = (block * group_lanes + group_lane) * V;
      const int count = channels - c < V ? channels - c : V;  // <= 0: this lane has no channels here
      const bool gathers = active && count > 0;
      Acc acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = Acc(0);
      for (int chunk = 0; chunk < samples; chunk += group_lanes) {
        Acc own_x = Acc(0), own_y = Acc(0), own_a = Acc(0);
        if (active && chunk + group_lane < samples)
          msda_sample(locations, weights, item * samples + chunk + group_lane, pairs, own_x, own_y, own_a);
        const int chunk_samples = samples - chunk < group_lanes ? samples - chunk : group_lanes;
        for (int j = 0; j < chunk_samples; ++j) {
          const Acc x = __shfl_sync(0xffffffffu, own_x, group_first + j);
          const Acc y = __shfl_sync(0xffffffffu, own_y, group_first + j);
          const Acc a = __shfl_sync(0xffffffffu, own_a, group_first + j);
          int height, width;
          Index start;
          msda_level(levels, (chunk + j) / points, height, width, start);
          const Taps<Acc, int> taps = msda_taps<Acc>(x, y, height, width, false);
          if (gathers)
            gather_taps<V>(value + head + start * pixel_stride + c, pixel_stride, taps, a, count, vector, acc);
        }
      }
      if (gathers) store_channels<V>(out + item * channels + c, count, vector, acc);
    }
  }
}

/// Gradients of `items` items' locations and weights (every element written)
/// and, when value_gradient, their value gradient added to grad_value by atomics.
///
/// grad_value: (N, S, M, D) in TAcc (float32 for the half types), zero-filled by the caller.
/// group_lanes: lanes per item, a power of two up to 32 (blocks are whole warps).
template <typename T, typename TAcc, typename Index>
__global__ void __launch_bounds__(256, 4) msda_backward(
    const T* __restrict__ grad_output, const T* __restrict__ value, const long long* __restrict__ levels,
    const T* __restrict__ locations, const T* __restrict__ weights, Index items, int queries, Index pixels,
    int heads, int channels, int level_count, int points, int group_lanes, int value_gradient,
    TAcc* __restrict__ grad_value, T* __restrict__ grad_locations, T* __restrict__ grad_weights) {
  typedef typename ComputeType<T>::type Acc;
  const int samples = level_count * points;
  const int lane = dcn_lane();
  const int group_lane = lane % group_lanes;
  const Index pixel_stride = Index(heads) * channels;
  const bool pairs = aligned_for<2>(locations) && aligned_for<2>(grad_locations);
  DCN_POINT_LOOP(first, items, group_lanes) {
    // No early exit: every lane takes part in the shuffles below.
    const Index item = first + lane / group_lanes;
    const bool active = item < items;
    const Index head = msda_head(item, queries, pixels, heads, channels);
    const T* grads = grad_output + item * channels;
    for (int sample = 0; sample < samples; ++sample) {
      // Every lane of the group reads the sample (one address: one sector a group).
      Acc x = Acc(0), y = Acc(0), a = Acc(0);
      if (active) msda_sample(locations, weights, item * samples + sample, pairs, x, y, a);
      int height, width;
      Index start;
      msda_level(levels, sample / points, height, width, start);
      const Taps<Acc, int> taps = msda_taps<Acc>(x, y, height, width, true);
      const Index level = head + start * pixel_stride;
      // This lane's corner products s_q: sums over its channels of grad_output
      // x corner q's value (the point's derivatives are linear in them).
      Acc s[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
      if (active) {
        for (int c = group_lane; c < channels; c += group_lanes) {
          Acc corners[4][1];
          load_taps<1>(value + level + c, pixel_stride, taps, 1, false, corners);
          const Acc g = to_compute(dcn_load(grads, c));
#pragma unroll
          for (int q = 0; q < 4; ++q) s[q] += g * corners[q][0];
        }
      }
      Acc dy, dx, da;
      tap_gradients(taps, s, dy, dx, da);
      // Lanes of a group are aligned to its size, so xor offsets below it stay
      // inside the group; a + b == b + a, so every lane ends with the same sums.
      for (int d = group_lanes / 2; d > 0; d /= 2) {
        dy += __shfl_xor_sync(0xffffffffu, dy, d);
        dx += __shfl_xor_sync(0xffffffffu, dx, d);
        da += __shfl_xor_sync(0xffffffffu, da, d);
      }
      if (!active) continue;
      if (group_lane == 0) {
        // The chain rule of x*W - 0.5 (y*H - 0.5): normalised units.
        const Acc gx = dx * a * Acc(width), gy = dy * a * Acc(height);
        const Index at = item * samples + sample;
        if (pairs) {
          ChannelVector<T, 2> xy;
          xy.v[0] = to_storage<T>(gx);
          xy.v[1] = to_storage<T>(gy);
          dcn_store(reinterpret_cast<ChannelVector<T, 2>*>(grad_locations + 2 * at), xy);
        } else {
          store(grad_locations + 2 * at, gx);
          store(grad_locations + 2 * at + 1, gy);
        }
        store(grad_weights + at, da);
      }
      // The value gradient in a second pass over the channels (grad_output
      // again, from cache), so that the corner products and the atomics'
      // weights are never live together.
      if (!value_gradient) continue;
      Acc scaled[4];  // attention weight x bilinear weight of each corner
#pragma unroll
      for (int q = 0; q < 4; ++q) scaled[q] = a * taps.weight[q];
      for (int c = group_lane; c < channels; c += group_lanes) {
        const Acc g = to_compute(dcn_load(grads, c));
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if ((taps.valid >> q) & 1u)
            dcn_atomic_add(grad_value + level + Index(taps.pixel[q]) * pixel_stride + c,
                           static_cast<TAcc>(scaled[q] * g));
      }
    }
  }
}

/// Keys and weights of the bilinear corners of items [first_item, first_item + items).
///
/// Entry e = ((item - first_item) * L*P + sample) * 4 + corner. Its key is the
/// value element the corner lands on, counted from image first_image =
/// first_item / (Lq*M): ((n - first_image) * S + s_l + pixel) * M + m, or
/// `sentinel` (the chunk's images x S x M) where the corner counts 0; its
/// weight is the attention weight times the bilinear weight (0 for the
/// sentinel). Keys fit Index (the launcher chooses it so).
template <typename T, typename Index>
__global__ void msda_value_keys(const long long* __restrict__ levels, const T* __restrict__ locations,
                                const T* __restrict__ weights, Index first_item, Index items, int queries,
                                Index pixels, int heads, int level_count, int points, Index sentinel,
                                Index* __restrict__ keys, typename ComputeType<T>::type* __restrict__ key_weights) {
  typedef typename ComputeType<T>::type Acc;
  const int samples = level_count * points;
  const Index total = items * samples;
  const Index first_image = first_item / (Index(queries) * heads);
  const bool pairs = aligned_for<2>(locations);
  DCN_GRID_STRIDE_LOOP(index, total) {
    const Index item = first_item + index / samples;
    const int sample = static_cast<int>(index % samples);
    const Index n = item / (Index(queries) * heads);
    const int m = static_cast<int>(item % heads);
    Acc x, y, a;
    msda_sample(locations, weights, item * samples + sample, pairs, x, y, a);
    int height, width;
    Index start;
    msda_level(levels, sample / points, height, width, start);
    const Taps<Acc, int> taps = msda_taps<Acc>(x, y, height, width, false);
    const Index pixel0 = (n - first_image) * pixels + start;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const bool valid = (taps.valid >> q) & 1u;
      dcn_store(keys, index * 4 + q, valid ? (pixel0 + taps.pixel[q]) * heads + m : sentinel);
      dcn_store(key_weights, index * 4 + q, valid ? a * taps.weight[q] : Acc(0));
    }
  }
}
