// dcn_im2col.cu: forward sampling of the column buffer.
//
//   deform_im2col<T, TCol, Index>   columns = mask * bilinear(input, sampling point)
//
// A group of `group_lanes` lanes per sampling point (image, output pixel,
// kernel point, offset group), the lanes over the offset group's channels:
// the point's position, corners and weights are computed once per point,
// each lane then moves blocks of consecutive channels (16-byte vectors where
// they fit) from the four corners of the channels-last input to the column
// row. Consecutive points (offset group fastest, then kernel point) fill
// consecutive column rows, so a warp writes contiguous memory.
#include "dcn_common.cuh"
#include "sampling.cuh"

/// Sample the columns of a chunk of images.
///
/// input:       (batch, H, W, C) channels-last
/// offset:      (batch, 2*G*K, Ho, Wo)
/// mask:        (batch, G*K, Ho, Wo), read only when has_mask
/// points:      batch * Ho*Wo * K * G, the sampling points
/// group_lanes: lanes per point, a power of two up to 32 (blocks are whole warps)
/// columns:     (groups, batch, Ho*Wo, K, C/groups); every element is written
///              (zero where the point counts 0)
template <typename T, typename TCol, typename Index>
__global__ void deform_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                              const T* __restrict__ mask, int has_mask, DCN_SHAPE_PARAMS,
                              Index points, int group_lanes, TCol* __restrict__ columns) {
  typedef typename ComputeType<T>::type Acc;
  constexpr int V = ChannelsPerLane<T, TCol>::value;
  const ConvShape s = DCN_SHAPE;
  const int point_channels = s.channels / s.offset_groups;
  const int lane = dcn_lane();
  const bool vector = channel_vectors_fit<V>(s) && aligned_for<V>(input) && aligned_for<V>(columns);
  DCN_POINT_LOOP(first, points, group_lanes) {
    const Index point = first + lane / group_lanes;
    if (point >= points) continue;
    Index n;
    int l, k, g;
    column_point(s, point, n, l, k, g);
    Acc y, x, ly = Acc(0), lx = Acc(0);
    int y0 = 0, x0 = 0;
    sampling_point(s, offset, n, g, k, l, y, x);
    const bool counts = locate(y, x, s.height, s.width, y0, x0, ly, lx);
    Corner<Acc> p[4];  // (valid only when the point counts)
#pragma unroll
    for (int q = 0; q < 4; ++q) p[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
    const Acc m = counts ? mask_value(s, mask, has_mask, n, g, k, l) : Acc(0);
    const T* image = input + n * s.height * s.width * s.channels;

    for (int c = lane % group_lanes * V; c < point_channels; c += group_lanes * V) {
      const int channel = g * point_channels + c;
      const int count = point_channels - c < V ? point_channels - c : V;
      Acc value[V];
#pragma unroll
      for (int v = 0; v < V; ++v) value[v] = Acc(0);
      if (counts) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (!p[q].valid) continue;
          Acc pixel[V];
          load_channels<V>(image + (Index(p[q].y) * s.width + p[q].x) * s.channels + channel, count,
                           vector, pixel);
#pragma unroll
          for (int v = 0; v < V; ++v) value[v] += p[q].weight * pixel[v];
        }
#pragma unroll
        for (int v = 0; v < V; ++v) value[v] *= m;
      }
      store_column_block<V>(s, columns, n, l, k, channel, count, vector, value);
    }
  }
}
