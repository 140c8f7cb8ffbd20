// dcn_col2im.cu: input gradient, the adjoint of deform_im2col in its input.
//
//   deform_col2im<T, TCol, TAcc, Index>   grad_input += scatter(mask * weight * columns)
//
// A group of `group_lanes` lanes per sampling point, lanes over the offset
// group's channels, as deform_im2col: the point's corners and weights once
// per point, the column gradients read in blocks of consecutive channels
// (16-byte vectors where they fit), and the atomic adds of a lane group go
// to consecutive channels of one pixel of the channels-last accumulator.
// Half types accumulate in float32 (TAcc); the caller converts back to NCHW.
#include "dcn_common.cuh"
#include "sampling.cuh"

/// Scatter the column gradients of a chunk of images onto its input pixels.
///
/// columns:     (groups, batch, Ho*Wo, K, C/groups)
/// offset:      (batch, 2*G*K, Ho, Wo)
/// mask:        (batch, G*K, Ho, Wo), read only when has_mask
/// points:      batch * Ho*Wo * K * G, the sampling points
/// group_lanes: lanes per point, a power of two up to 32 (blocks are whole warps)
/// grad_input:  (batch, H, W, C) channels-last, zero-filled by the caller
template <typename T, typename TCol, typename TAcc, typename Index>
__global__ void deform_col2im(const TCol* __restrict__ columns, const T* __restrict__ offset,
                              const T* __restrict__ mask, int has_mask, DCN_SHAPE_PARAMS,
                              Index points, int group_lanes, TAcc* __restrict__ grad_input) {
  typedef typename ComputeType<T>::type Acc;
  constexpr int V = ChannelsPerLane<T, TCol>::value;
  const ConvShape s = DCN_SHAPE;
  const int point_channels = s.channels / s.offset_groups;
  const int lane = dcn_lane();
  const bool vector = channel_vectors_fit<V>(s) && aligned_for<V>(columns);
  DCN_POINT_LOOP(first, points, group_lanes) {
    const Index point = first + lane / group_lanes;
    if (point >= points) continue;
    Index n;
    int l, k, g;
    column_point(s, point, n, l, k, g);
    Acc y, x, ly, lx;
    int y0, x0;
    sampling_point(s, offset, n, g, k, l, y, x);
    if (!locate(y, x, s.height, s.width, y0, x0, ly, lx)) continue;
    Corner<Acc> p[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) p[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
    const Acc m = mask_value(s, mask, has_mask, n, g, k, l);
    TAcc* image = grad_input + n * s.height * s.width * s.channels;

    for (int c = lane % group_lanes * V; c < point_channels; c += group_lanes * V) {
      const int channel = g * point_channels + c;
      const int count = point_channels - c < V ? point_channels - c : V;
      Acc grad[V];
      load_column_block<V>(s, columns, n, l, k, channel, count, vector, grad);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (!p[q].valid) continue;
        TAcc* target = image + (Index(p[q].y) * s.width + p[q].x) * s.channels + channel;
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (v < count) dcn_atomic_add(target + v, static_cast<TAcc>(p[q].weight * (grad[v] * m)));
      }
    }
  }
}
