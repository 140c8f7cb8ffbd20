// dcn_im2col.cu: forward sampling of the column buffer.
//
//   deform_im2col<T, TCol, Index>   columns = mask * bilinear(input, sampling point)
//
// One thread per column element, channel fastest: the column writes and the
// reads of the channels-last input are both coalesced, and the threads of a
// warp share the sampling point (same offset and mask addresses, broadcast).
#include "dcn_common.cuh"

/// Sample the columns of a chunk of images.
///
/// input:   (batch, H, W, C) channels-last
/// offset:  (batch, 2*G*K, Ho, Wo)
/// mask:    (batch, G*K, Ho, Wo), read only when has_mask
/// columns: (groups, batch, Ho*Wo, K, C/groups), total = its size; every
///          element is written (zero where the point counts 0)
template <typename T, typename TCol, typename Index>
__global__ void deform_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                              const T* __restrict__ mask, int has_mask, DCN_SHAPE_PARAMS,
                              Index total, TCol* __restrict__ columns) {
  typedef typename ComputeType<T>::type Acc;
  const ConvShape s = DCN_SHAPE;
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index n;
    int l, k, c, g;
    column_element(s, index, n, l, k, c, g);

    Acc y, x, ly, lx;
    int y0, x0;
    sampling_point(s, offset, n, g, k, l, y, x);
    Acc value = Acc(0);
    if (locate(y, x, s.height, s.width, y0, x0, ly, lx)) {
      const T* image = input + n * s.height * s.width * s.channels;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const Corner<Acc> p = corner(q, y0, x0, ly, lx, s.height, s.width);
        if (p.valid)
          value += p.weight * to_compute(image[(Index(p.y) * s.width + p.x) * s.channels + c]);
      }
      value *= mask_value(s, mask, has_mask, n, g, k, l);
    }
    store(columns + index, value);
  }
}
