// dcn_col2im_coord.cu: offset and mask gradients in one pass.
//
//   deform_col2im_coord<T, TCol, Index>   grad_offset, grad_mask from the column gradients
//
// With s_q = sum over the offset group's channels of column gradient times
// corner q's pixel value:
//   d/dy = mask * sum_q d_dy_q * s_q,  d/dx likewise,  d/dmask = sum_q weight_q * s_q.
// One thread per (image, offset group, kernel point, output pixel), output
// pixel fastest so that the gradient writes are coalesced; each thread loops
// over the group's channels and needs no atomics (deterministic). A point on
// row or column -1 contributes its one-sided slope (locate's for_slope).
#include "dcn_common.cuh"

/// Offset and mask gradients of a chunk of images.
///
/// columns:     (groups, batch, Ho*Wo, K, C/groups) column gradients
/// input:       (batch, H, W, C) channels-last
/// offset:      (batch, 2*G*K, Ho, Wo)
/// mask:        (batch, G*K, Ho, Wo), read only when has_mask
/// total:       batch * G * K * Ho * Wo
/// grad_offset: (batch, 2*G*K, Ho, Wo), every element written
/// grad_mask:   (batch, G*K, Ho, Wo), written only when has_mask
template <typename T, typename TCol, typename Index>
__global__ void deform_col2im_coord(const TCol* __restrict__ columns,
                                    const T* __restrict__ input,
                                    const T* __restrict__ offset,
                                    const T* __restrict__ mask, int has_mask,
                                    DCN_SHAPE_PARAMS, Index total,
                                    T* __restrict__ grad_offset,
                                    T* __restrict__ grad_mask) {
  typedef typename ComputeType<T>::type Acc;
  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  const int group_channels = s.channels / s.groups;
  const int offset_group_channels = s.channels / s.offset_groups;
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index n;
    int g, k, l;
    point_element(s, index, n, g, k, l);
    // index == ((n*G + g)*K + k)*L + l: the mask gradient's own position.
    const Index dy_at = ((n * s.offset_groups + g) * 2 * K + 2 * k) * L + l;

    Acc y, x, ly, lx;
    int y0, x0;
    sampling_point(s, offset, n, g, k, l, y, x);
    Acc grad_y = Acc(0), grad_x = Acc(0), grad_m = Acc(0);
    if (locate(y, x, s.height, s.width, y0, x0, ly, lx, /*for_slope=*/true)) {
      Corner<Acc> p[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) p[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
      const T* image = input + n * s.height * s.width * s.channels;
      const int first = g * offset_group_channels;
      for (int c = first; c < first + offset_group_channels; ++c) {
        // Offset groups and convolution groups split the channels independently.
        const int conv_group = c / group_channels;
        const Acc grad = to_compute(
            columns[(((Index(conv_group) * s.batch + n) * L + l) * K + k) * group_channels +
                    c % group_channels]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (!p[q].valid) continue;
          const Acc v =
              grad * to_compute(image[(Index(p[q].y) * s.width + p[q].x) * s.channels + c]);
          grad_y += p[q].d_dy * v;
          grad_x += p[q].d_dx * v;
          grad_m += p[q].weight * v;
        }
      }
    }
    const Acc m = mask_value(s, mask, has_mask, n, g, k, l);
    store(grad_offset + dy_at, grad_y * m);
    store(grad_offset + dy_at + L, grad_x * m);
    if (has_mask) store(grad_mask + index, grad_m);
  }
}
