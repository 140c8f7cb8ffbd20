// dcn_col2im_sorted.cu: the input gradient without atomics, bitwise repeatable.
//
//   deform_col2im_keys<T, Index>                  target pixel (an Index) and weight of every bilinear corner
//   deform_col2im_gather<T, TCol, TAcc, Index>    grad_input = sum over a pixel's corners, in sorted order
//
// deform_col2im adds with float atomics, whose order (and so the rounding)
// changes from run to run. Here the scatter becomes a gather:
//   1. deform_col2im_keys writes, for every (image, offset group, kernel
//      point, output pixel, corner) -- entry e -- the key of the input pixel
//      the corner lands on, (image * G + offset group) * H*W + pixel, or the
//      sentinel batch * G * H*W when it counts zero, and its weight
//      (bilinear weight times mask). Keys have the launch's index type,
//      32 bits whenever the chunk's keys and entries fit them, so that the
//      radix sort runs half the passes of 64-bit keys;
//   2. the caller sorts the entries by key with a stable sort (so entries of
//      one pixel stay in the order of e) and finds where each key's segment
//      starts (searchsorted);
//   3. deform_col2im_gather: one thread per (image, pixel, channel) sums its
//      segment in that order, weight times column gradient.
// A stable sort's result does not depend on how it is computed, so every
// sum has one fixed order. Offset, mask and weight gradients need none of
// this: they never use atomics (dcn_col2im_coord.cu, cuBLAS GEMMs).
#include "dcn_common.cuh"
#include "sampling.cuh"

/// Keys and weights of the bilinear corners of a chunk of images.
///
/// offset:  (batch, 2*G*K, Ho, Wo)
/// mask:    (batch, G*K, Ho, Wo), read only when has_mask
/// total:   batch * G * K * Ho*Wo; thread index ((n*G + g)*K + k)*L + l
/// keys:    (total * 4,) entry e = index * 4 + corner; every key <= the sentinel fits Index
/// weights: (total * 4,) in the compute type; 0 where the key is the sentinel
template <typename T, typename Index>
__global__ void deform_col2im_keys(const T* __restrict__ offset, const T* __restrict__ mask,
                                   int has_mask, DCN_SHAPE_PARAMS, Index total,
                                   Index* __restrict__ keys,
                                   typename ComputeType<T>::type* __restrict__ weights) {
  typedef typename ComputeType<T>::type Acc;
  const ConvShape s = DCN_SHAPE;
  const Index pixels = static_cast<Index>(s.height) * s.width;
  const Index sentinel = static_cast<Index>(s.batch) * s.offset_groups * pixels;
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index n;
    int g, k, l;
    point_element(s, index, n, g, k, l);
    const Index segment = (n * s.offset_groups + g) * pixels;

    Acc y, x, ly, lx;
    int y0 = 0, x0 = 0;
    sampling_point(s, offset, n, g, k, l, y, x);
    const bool counts = locate(y, x, s.height, s.width, y0, x0, ly, lx);
    const Acc m = counts ? mask_value(s, mask, has_mask, n, g, k, l) : Acc(0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const Index e = index * 4 + q;
      dcn_store(keys, e, sentinel);
      dcn_store(weights, e, Acc(0));
      if (!counts) continue;
      const Corner<Acc> p = corner(q, y0, x0, ly, lx, s.height, s.width);
      if (!p.valid) continue;
      dcn_store(keys, e, segment + static_cast<Index>(p.y) * s.width + p.x);
      dcn_store(weights, e, p.weight * m);
    }
  }
}

/// Input gradient of a chunk of images from the sorted entries.
///
/// columns:    (groups, batch, Ho*Wo, K, C/groups) column gradients
/// order:      (batch*G*K*Ho*Wo*4,) entries sorted stably by key
/// starts:     (batch*G*H*W + 1,) where each key's run begins in order
/// weights:    (batch*G*K*Ho*Wo*4,) from deform_col2im_keys
/// total:      batch * H*W * C
/// grad_input: (batch, H, W, C) channels-last, every element written
template <typename T, typename TCol, typename TAcc, typename Index>
__global__ void deform_col2im_gather(const TCol* __restrict__ columns,
                                     const long long* __restrict__ order,
                                     const long long* __restrict__ starts,
                                     const typename ComputeType<T>::type* __restrict__ weights,
                                     DCN_SHAPE_PARAMS, Index total,
                                     TAcc* __restrict__ grad_input) {
  typedef typename ComputeType<T>::type Acc;
  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  const int pixels = s.height * s.width;
  const int group_channels = s.channels / s.groups;
  const int offset_group_channels = s.channels / s.offset_groups;
  // Channel fastest: the threads of a warp share one segment (same pixel and
  // offset group) and read consecutive channels of each column row.
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index rest = index;
    const int c = static_cast<int>(rest % s.channels);
    rest /= s.channels;
    const int pixel = static_cast<int>(rest % pixels);
    const Index n = rest / pixels;
    const int g = c / offset_group_channels;
    const int conv_group = c / group_channels;
    const long long key = (static_cast<long long>(n) * s.offset_groups + g) * pixels + pixel;
    const TCol* group_columns = columns + (Index(conv_group) * s.batch + n) * L * K * group_channels;
    Acc sum = Acc(0);
    for (long long at = dcn_load(starts, key); at < dcn_load(starts, key + 1); ++at) {
      const long long e = dcn_load(order, at);
      const long long point = e >> 2;  // ((n*G + g)*K + k)*L + l
      const int l = static_cast<int>(point % L);
      const int k = static_cast<int>((point / L) % K);
      sum += dcn_load(weights, e) *
             to_compute(dcn_load(group_columns, (Index(l) * K + k) * group_channels + c % group_channels));
    }
    store(grad_input + index, sum);
  }
}
