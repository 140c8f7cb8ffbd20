// dcn_col2im.cu: input gradient, the adjoint of deform_im2col in its input.
//
//   deform_col2im<T, TCol, TAcc, Index>   grad_input += scatter(mask * weight * columns)
//
// One thread per column element, channel fastest, so that the atomic adds of
// a warp go to consecutive addresses of the channels-last accumulator. Half
// types accumulate in float32 (TAcc); the caller converts back to NCHW.
#include "dcn_common.cuh"

/// Scatter the column gradients of a chunk of images onto its input pixels.
///
/// columns:    (groups, batch, Ho*Wo, K, C/groups), total = its size
/// offset:     (batch, 2*G*K, Ho, Wo)
/// mask:       (batch, G*K, Ho, Wo), read only when has_mask
/// grad_input: (batch, H, W, C) channels-last, zero-filled by the caller
template <typename T, typename TCol, typename TAcc, typename Index>
__global__ void deform_col2im(const TCol* __restrict__ columns, const T* __restrict__ offset,
                              const T* __restrict__ mask, int has_mask, DCN_SHAPE_PARAMS,
                              Index total, TAcc* __restrict__ grad_input) {
  typedef typename ComputeType<T>::type Acc;
  const ConvShape s = DCN_SHAPE;
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index n;
    int l, k, c, g;
    column_element(s, index, n, l, k, c, g);

    Acc y, x, ly, lx;
    int y0, x0;
    sampling_point(s, offset, n, g, k, l, y, x);
    if (!locate(y, x, s.height, s.width, y0, x0, ly, lx)) continue;
    const Acc grad = to_compute(columns[index]) * mask_value(s, mask, has_mask, n, g, k, l);
    TAcc* image = grad_input + n * s.height * s.width * s.channels;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const Corner<Acc> p = corner(q, y0, x0, ly, lx, s.height, s.width);
      if (p.valid)
        atomicAdd(image + (Index(p.y) * s.width + p.x) * s.channels + c,
                  static_cast<TAcc>(p.weight * grad));
    }
  }
}
