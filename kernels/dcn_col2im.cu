// dcn_col2im.cu: input gradient, the adjoint of deform_im2col in its input.
//
//   AtomicChannels<TAcc>                  channels a lane adds per atomic: 4 floats on sm_90, else 1
//   scatter_block<W>(...)                 one lane's W channels of a point onto its four corners
//   deform_col2im<T, TCol, TAcc, Index>   grad_input += scatter(mask * weight * columns)
//
// A group of `group_lanes` lanes per sampling point, as in deform_im2col: the
// point's corners and weights once per point, then the lanes over the offset
// group's channels. The atomics are what this kernel spends (four per channel
// and point, against one column read), so the lanes are laid out for them:
// lane j of a group takes the blocks j, j + group_lanes, ... of W consecutive
// channels, and one warp-wide atomic adds to consecutive addresses of a
// pixel of the channels-last accumulator -- for float32, 32 lanes x 4 bytes
// in 4 sectors, the fewest there can be (a lane owning V consecutive channels
// instead scattered each request over 16 sectors). On sm_90, W = 4 floats
// added by one vector red (16 sectors for 512 bytes: the same sectors per
// byte, a quarter of the instructions); before sm_90, or where blocks of 4
// would straddle a group or an array is unaligned, W = 1.
// Half types accumulate in float32 (TAcc); the caller converts back to NCHW.
#include "dcn_common.cuh"
#include "sampling.cuh"

/// Channels one lane adds per atomic: a float4 vector red where there is one
/// (DCN_VECTOR_RED), else one (float64 always: there is no vector red of it).
template <typename TAcc>
struct AtomicChannels {
  static constexpr int value = 1;
};
template <>
struct AtomicChannels<float> {
  static constexpr int value = DCN_VECTOR_RED ? 4 : 1;
};

/// Add mask * weight_q * column gradient of channels [channel, channel + W)
/// of point (n, l, k) to each valid corner q of `image` (H, W, C), W at once.
/// W > 1: columns and image are aligned for W-vectors.
template <int W, typename TCol, typename TAcc, typename Index, typename Acc>
__device__ __forceinline__ void scatter_block(const ConvShape& s, const TCol* columns, TAcc* image, Index n,
                                              int l, int k, int channel, const Corner<Acc> (&p)[4], Acc m,
                                              DcnCaller = {}) {
  Acc grad[W];
  load_column_block<W>(s, columns, n, l, k, channel, W, true, grad);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (!p[q].valid) continue;
    TAcc* target = image + (Index(p[q].y) * s.width + p[q].x) * s.channels + channel;
    ChannelVector<TAcc, W> add;
#pragma unroll
    for (int v = 0; v < W; ++v) add.v[v] = static_cast<TAcc>(p[q].weight * (grad[v] * m));
    if constexpr (W == 1) {
      dcn_atomic_add(target, add.v[0]);
    } else {
      dcn_atomic_add(reinterpret_cast<ChannelVector<TAcc, W>*>(target), add);
    }
  }
}

/// Scatter the column gradients of a chunk of images onto its input pixels.
///
/// columns:     (groups, batch, Ho*Wo, K, C/groups)
/// offset:      (batch, 2*G*K, Ho, Wo)
/// mask:        (batch, G*K, Ho, Wo), read only when has_mask
/// points:      batch * Ho*Wo * K * G, the sampling points
/// group_lanes: lanes per point, a power of two up to 32 (blocks are whole warps)
/// grad_input:  (batch, H, W, C) channels-last, zero-filled by the caller
///
/// Launch bounds: 4 blocks of DCN_BLOCK_THREADS (half an SM's warps) fit
/// every instantiation in 64 registers without spilling.
template <typename T, typename TCol, typename TAcc, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS, 4)
    deform_col2im(const TCol* __restrict__ columns, const T* __restrict__ offset, const T* __restrict__ mask,
                  int has_mask, DCN_SHAPE_PARAMS, Index points, int group_lanes, TAcc* __restrict__ grad_input) {
  typedef typename ComputeType<T>::type Acc;
  constexpr int A = AtomicChannels<TAcc>::value;
  const ConvShape s = DCN_SHAPE;
  const int point_channels = s.channels / s.offset_groups;
  const int lane = dcn_lane();
  const bool vector = A > 1 && channel_vectors_fit<A>(s) && aligned_for<A>(columns) && aligned_for<A>(grad_input);
  const int block = vector ? A : 1;  // channels a lane takes at a time
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

    for (int c = lane % group_lanes * block; c < point_channels; c += group_lanes * block) {
      if constexpr (A > 1) {
        if (vector) {
          scatter_block<A>(s, columns, image, n, l, k, g * point_channels + c, p, m);
          continue;
        }
      }
      scatter_block<1>(s, columns, image, n, l, k, g * point_channels + c, p, m);
    }
  }
}
