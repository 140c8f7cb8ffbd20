// dcn_col2im_coord.cu: offset and mask gradients in one pass.
//
//   deform_col2im_coord<T, TCol, Index>   grad_offset, grad_mask from the column gradients
//
// With s_q = sum over the offset group's channels of column gradient times
// corner q's pixel value:
//   d/dy = mask * sum_q d_dy_q * s_q,  d/dx likewise,  d/dmask = sum_q weight_q * s_q.
// A group of `group_lanes` lanes per sampling point, lanes over the offset
// group's channels (column rows and input pixels read in blocks of
// consecutive channels, 16-byte vectors where they fit); each lane sums s_q
// over its channels and applies the corner weights and slopes once, then the
// group adds the lanes' three sums by a butterfly of __shfl_xor_sync in a
// fixed order. No atomics: deterministic. A point on
// row or column -1 contributes its one-sided slope (locate's for_slope).
#include "dcn_common.cuh"
#include "sampling.cuh"

/// Offset and mask gradients of a chunk of images.
///
/// columns:     (groups, batch, Ho*Wo, K, C/groups) column gradients
/// input:       (batch, H, W, C) channels-last
/// offset:      (batch, 2*G*K, Ho, Wo)
/// mask:        (batch, G*K, Ho, Wo), read only when has_mask
/// points:      batch * Ho*Wo * K * G, the sampling points
/// group_lanes: lanes per point, a power of two up to 32 (blocks are whole warps)
/// grad_offset: (batch, 2*G*K, Ho, Wo), every element written
/// grad_mask:   (batch, G*K, Ho, Wo), written only when has_mask
///
/// Launch bounds: 4 blocks of DCN_BLOCK_THREADS (half an SM's warps), so
/// at most 64 registers a thread; summing s_q in the channel loop and
/// applying the corner weights after it keeps every instantiation within
/// that without spilling (summing the three gradients in the loop, float64
/// with 64-bit indices took 72 registers: 3 blocks).
template <typename T, typename TCol, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS, 4) deform_col2im_coord(const TCol* __restrict__ columns,
                                    const T* __restrict__ input,
                                    const T* __restrict__ offset,
                                    const T* __restrict__ mask, int has_mask,
                                    DCN_SHAPE_PARAMS, Index points, int group_lanes,
                                    T* __restrict__ grad_offset,
                                    T* __restrict__ grad_mask) {
  typedef typename ComputeType<T>::type Acc;
  constexpr int V = ChannelsPerLane<T, TCol>::value;
  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  const int point_channels = s.channels / s.offset_groups;
  const int lane = dcn_lane();
  const bool vector = channel_vectors_fit<V>(s) && aligned_for<V>(input) && aligned_for<V>(columns);
  DCN_POINT_LOOP(first, points, group_lanes) {
    // No early exit: every lane takes part in the shuffles below.
    const Index point = first + lane / group_lanes;
    const bool active = point < points;
    Index n = 0;
    int l = 0, k = 0, g = 0;
    Acc grad_y = Acc(0), grad_x = Acc(0), grad_m = Acc(0);
    if (active) {
      column_point(s, point, n, l, k, g);
      Acc y, x, ly, lx;
      int y0, x0;
      sampling_point(s, offset, n, g, k, l, y, x);
      if (locate(y, x, s.height, s.width, y0, x0, ly, lx, /*for_slope=*/true)) {
        Corner<Acc> p[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) p[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
        const T* image = input + n * s.height * s.width * s.channels;
        // s_q over this lane's channels: one product a channel and corner
        // (the weights and slopes apply once, below, and need no registers
        // while the loop runs).
        Acc sum[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
        for (int c = lane % group_lanes * V; c < point_channels; c += group_lanes * V) {
          const int channel = g * point_channels + c;
          const int count = point_channels - c < V ? point_channels - c : V;
          Acc grad[V];
          load_column_block<V>(s, columns, n, l, k, channel, count, vector, grad);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (!p[q].valid) continue;
            Acc pixel[V];
            load_channels<V>(image + (Index(p[q].y) * s.width + p[q].x) * s.channels + channel,
                             count, vector, pixel);
#pragma unroll
            for (int v = 0; v < V; ++v) sum[q] += grad[v] * pixel[v];
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          grad_y += p[q].d_dy * sum[q];
          grad_x += p[q].d_dx * sum[q];
          grad_m += p[q].weight * sum[q];
        }
      }
    }
    // Lanes of a group are aligned to the group size, so xor offsets below it
    // stay inside the group; a + b == b + a, so every lane ends with the same sum.
    for (int d = group_lanes / 2; d > 0; d /= 2) {
      grad_y += __shfl_xor_sync(0xffffffffu, grad_y, d);
      grad_x += __shfl_xor_sync(0xffffffffu, grad_x, d);
      grad_m += __shfl_xor_sync(0xffffffffu, grad_m, d);
    }
    if (!active || lane % group_lanes != 0) continue;
    const Acc m = mask_value(s, mask, has_mask, n, g, k, l);
    const Index dy_at = ((n * s.offset_groups + g) * 2 * K + 2 * k) * L + l;
    store(grad_offset + dy_at, grad_y * m);
    store(grad_offset + dy_at + L, grad_x * m);
    if (has_mask) store(grad_mask + ((n * s.offset_groups + g) * K + k) * Index(L) + l, grad_m);
  }
}
