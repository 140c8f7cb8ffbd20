// dcnv3.cu: DCNv3 (InternImage) and DCNv4 (FlashInternImage): depthwise deformable sampling
// summed over the kernel points, no weight, no im2col buffer.
//
//   dcnv3_softmax_stats<T, Index>      with softmax: each item's largest mask value and exp sum
//   dcnv3_forward<T, Index>            out = sum over points of mask x bilinear sample, per group
//   dcnv3_backward<T, TAcc, Index>     offset and mask gradients (fixed-order warp reductions);
//                                      the input gradient by atomics, when asked
//   dcnv3_softmax_backward<T, TAcc, Index>   with softmax: the mask gradient through its Jacobian
//   dcnv3_input_keys<T, Index>         target (image, pixel, group) and weight of every bilinear corner
//                                      (for sorted_gather.cu's deterministic input gradient)
//
// Notation (cudcn/dcnv3_geometry.py, InternImage's): N images of H x W pixels, G groups of D
// channels (C = G*D), kernel kh x kw, P points (kh*kw, less the centre with remove_center),
// output Ho x Wo. Layouts, channels-last: input (N, H, W, C); out and grad_output (N, Ho, Wo, C).
// An *item* is (image n, output pixel q = (n*Ho + h)*Wo + w, group g), index q*G + g: the
// row out[item*D ...] of D channels. Its P (x, y) offsets start at element
// offset_first + q*offset_pixel_stride + g*offset_group_stride of `offset`, its P mask values
// likewise in `mask` (Dcnv3Shape's layouts): DCNv3's two arrays, or DCNv4's packed
// offset_mask passed as both, read where they lie (no unpacking copy). Point p is kernel
// column i, row j, w-major (k = i*kh + j over the full grid, p = k less one past the removed
// centre); it samples pixel
//   x = (w*stride_w - pad_w + c_w) + (i*dil_w - c_w + dx) * offset_scale   (y likewise with j, h)
// of image n, channels g*D ...; c_w = dil_w*(kw - 1)/2. With `softmax` (DCNv3's module's
// softmax, fused) each item's P mask values m_p become exp(m_p - max) / sum exp(m_q - max).
//
// A group of group_lanes = channel_lanes x point_lanes lanes (powers of two, at most 32, the
// group aligned in its warp, channel lane fastest) per item; every loop that holds a shuffle
// is warp-uniform, so each lane takes part in every one. Point lane l takes points l,
// l + point_lanes, ...: several lanes per item where the items alone would leave the GPU idle
// (the launcher chooses point_lanes from the size of the call, never from the grid).
// - forward: every channel lane of a point reads the point's offsets and mask itself (one
//   address: one sector a point lane; each offset and mask value once per item and channel
//   block) and keeps its location and mask in registers over the lane's channels. Channel
//   lanes over D in blocks of V = 16 bytes (8 float16 or bfloat16, 4 float32, 2 float64),
//   one vector load per corner where D is a multiple of V and the arrays are aligned, else
//   the same blocks element by element (the same sums, bit for bit); the four corner loads
//   of a block are issued before any is used (sampling.cuh's gather_taps); sums in float32
//   (float64 for float64), each lane's in point order, then the point lanes' added by a
//   butterfly of __shfl_xor_sync (a fixed order).
// - backward: every channel lane of a point reads its offsets and mask itself (one address:
//   one sector per point lane). Channel lanes over D one channel each, interleaved (lane k
//   takes channels k, k + channel_lanes, ...): a warp's input loads and input-gradient atomics
//   touch consecutive channels of one pixel. Each lane sums its channels' corner products;
//   the channel lanes add theirs by a butterfly of __shfl_xor_sync (fixed order: bitwise
//   repeatable), and channel lane 0 stores the point's offset (times mask and offset_scale)
//   and mask gradients. A point on row or column -1 counts for the slopes (locate's
//   for_slope). The input gradient is a second pass over the channels (grad_output again,
//   from cache), by atomics into a float32 (float64) accumulator.
// - softmax (DCNv3's module's, fused: no softmaxed copy of the mask): dcnv3_softmax_stats
//   first writes each item's largest mask value and exp sum (8 or 16 bytes an item), which
//   the kernels read with each point's mask value (not held in registers across the points:
//   the 64-register budget); the backward leaves the gradient by the softmaxed mask in a
//   float32 (float64) scratch laid out as the mask, and dcnv3_softmax_backward applies the
//   Jacobian, s_p (d_p - sum_q s_q d_q).
// Both hold to 64 registers (__launch_bounds__: blocks of 256 threads, kernels.BLOCK, 4 of
// them resident: 50% occupancy).
// The deterministic input gradient (dcnv3_input_keys, a stable sort by key on the host side,
// sorted_gather.cu) turns the atomics' scatter into a gather in a fixed order.
#include "dcn_common.cuh"
#include "sampling.cuh"

/// The geometry of a DCNv3/DCNv4 launch, passed as plain int arguments in this order
/// (DCNV3_SHAPE_PARAMS; cudcn/backends/cuda/dcnv3.py's shape_args).
struct Dcnv3Shape {
  int height, width, group, channels;  // H, W, G, D
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h, out_w;
  int points;  // P
  int centre;  // the full grid's point k that remove_center drops; kh*kw when none is
  int offset_first, offset_pixel_stride, offset_group_stride;
  int mask_first, mask_pixel_stride, mask_group_stride;
};

#define DCNV3_SHAPE_PARAMS                                                                           \
  int height, int width, int group, int channels, int kernel_h, int kernel_w, int stride_h,         \
      int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int out_h, int out_w, int points,   \
      int centre, int offset_first, int offset_pixel_stride, int offset_group_stride, int mask_first, \
      int mask_pixel_stride, int mask_group_stride
#define DCNV3_SHAPE                                                                                  \
  Dcnv3Shape {                                                                                       \
    height, width, group, channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h,    \
        dil_w, out_h, out_w, points, centre, offset_first, offset_pixel_stride, offset_group_stride, \
        mask_first, mask_pixel_stride, mask_group_stride                                             \
  }

/// Where an item's data lie.
template <typename Index>
struct Dcnv3Item {
  Index image;    // input[n, 0, 0, g*D]: its image's pixel 0, its group's first channel
  Index offsets;  // its first offset (x of point 0) in `offset`
  Index masks;    // its first mask value in `mask`
  int ref_y, ref_x;  // the reference point (the window's centre) in the image, padding removed
  int image_number;  // n
};

/// The item's image, offsets, mask and reference point.
template <typename Index>
__device__ __forceinline__ Dcnv3Item<Index> dcnv3_item(const Dcnv3Shape& s, Index item) {
  const Index q = item / s.group;
  const int g = static_cast<int>(item % s.group);
  const int w = static_cast<int>(q % s.out_w);
  const int h = static_cast<int>(q / s.out_w % s.out_h);
  const Index n = q / (Index(s.out_h) * s.out_w);
  Dcnv3Item<Index> r;
  r.image = n * s.height * s.width * (Index(s.group) * s.channels) + Index(g) * s.channels;
  r.offsets = s.offset_first + q * s.offset_pixel_stride + Index(g) * s.offset_group_stride;
  r.masks = s.mask_first + q * s.mask_pixel_stride + Index(g) * s.mask_group_stride;
  r.ref_y = h * s.stride_h - s.pad_h + s.dil_h * (s.kernel_h - 1) / 2;
  r.ref_x = w * s.stride_w - s.pad_w + s.dil_w * (s.kernel_w - 1) / 2;
  r.image_number = static_cast<int>(n);
  return r;
}

/// exp in the compute type.
__device__ __forceinline__ float dcnv3_exp(float v) { return expf(v); }
__device__ __forceinline__ double dcnv3_exp(double v) { return exp(v); }

/// The softmax of an item's mask: its largest value and sum_p exp(m_p - largest), in
/// point order (a NaN makes both NaN, as NumPy's max and sum do).
template <typename T, typename Acc, typename Index>
__device__ __forceinline__ void dcnv3_softmax(const Dcnv3Shape& s, const T* mask, Index masks, Acc& largest,
                                              Acc& total, DcnCaller = {}) {
  largest = to_compute(dcn_load(mask, masks));
  for (int p = 1; p < s.points; ++p) {
    const Acc m = to_compute(dcn_load(mask, masks + p));
    largest = (m > largest || m != m) ? m : largest;
  }
  total = Acc(0);
  for (int p = 0; p < s.points; ++p) total += dcnv3_exp(to_compute(dcn_load(mask, masks + p)) - largest);
}

/// Mask value m of an item softmaxed, exp(m - largest) / total, with the item's
/// (largest, total) from stats (dcnv3_softmax_stats).
template <typename Acc, typename Index>
__device__ __forceinline__ Acc dcnv3_soft(const Acc* stats, Index item, Acc m, DcnCaller = {}) {
  const ChannelVector<Acc, 2> st = dcn_load(reinterpret_cast<const ChannelVector<Acc, 2>*>(stats + 2 * item));
  return dcnv3_exp(m - st.v[0]) / st.v[1];
}

/// Point p of item `item`: its location (y, x) in the image and its mask value
/// (softmaxed when `softmax`, by the item's stats). (x, y) by one load when `pairs` (the
/// offsets' layout and array aligned to 2 elements). Each product rounded before the
/// addition that follows, as NumPy rounds it.
template <typename T, typename Acc, typename Index>
__device__ __forceinline__ void dcnv3_point(const Dcnv3Shape& s, const T* offset, const T* mask,
                                            const Dcnv3Item<Index>& it, Index item, int p, bool pairs,
                                            Acc offset_scale, bool softmax, const Acc* stats, Acc& y, Acc& x,
                                            Acc& m, DcnCaller = {}) {
  const int k = p + (p >= s.centre);  // the full grid's point: one past a removed centre
  const int i = k / s.kernel_h, j = k % s.kernel_h;  // kernel column (outer) and row: w-major
  Acc dx, dy;
  if (pairs) {
    const ChannelVector<T, 2> xy = dcn_load(reinterpret_cast<const ChannelVector<T, 2>*>(offset + it.offsets + 2 * p));
    dx = to_compute(xy.v[0]);
    dy = to_compute(xy.v[1]);
  } else {
    dx = to_compute(dcn_load(offset, it.offsets + 2 * p));
    dy = to_compute(dcn_load(offset, it.offsets + 2 * p + 1));
  }
  const int c_h = s.dil_h * (s.kernel_h - 1) / 2, c_w = s.dil_w * (s.kernel_w - 1) / 2;
  x = mul_rn(dx + Acc(i * s.dil_w - c_w), offset_scale) + Acc(it.ref_x);
  y = mul_rn(dy + Acc(j * s.dil_h - c_h), offset_scale) + Acc(it.ref_y);
  m = to_compute(dcn_load(mask, it.masks + p));
  if (softmax) m = dcnv3_soft(stats, item, m);
}

/// Whether the (x, y) pairs of every point can be read as one 2-element vector.
template <typename T>
__device__ __forceinline__ bool dcnv3_pairs(const Dcnv3Shape& s, const T* offset) {
  return (s.offset_first | s.offset_pixel_stride | s.offset_group_stride) % 2 == 0 && aligned_for<2>(offset);
}

/// A lane's place in its item's group of channel_lanes x point_lanes lanes (channel lane fastest).
struct Dcnv3Lane {
  int group_lanes;  // lanes per item
  int item;         // which of its warp's items (in a step of DCN_POINT_LOOP) is this lane's
  int channel;      // its channel lane
  int point;        // its point lane
};

__device__ __forceinline__ Dcnv3Lane dcnv3_lane(int channel_lanes, int point_lanes) {
  const int lane = dcn_lane();
  Dcnv3Lane r;
  r.group_lanes = channel_lanes * point_lanes;
  r.item = lane / r.group_lanes;
  r.channel = lane % r.group_lanes % channel_lanes;
  r.point = lane % r.group_lanes / channel_lanes;
  return r;
}

/// The softmax's (largest, total) of each of `items` items (dcnv3_softmax), into stats
/// (items, 2) in the compute type: what dcnv3_soft reads.
template <typename T, typename Index>
__global__ void dcnv3_softmax_stats(const T* __restrict__ mask, DCNV3_SHAPE_PARAMS, Index items,
                                    typename ComputeType<T>::type* __restrict__ stats) {
  typedef typename ComputeType<T>::type Acc;
  const Dcnv3Shape s = DCNV3_SHAPE;
  DCN_GRID_STRIDE_LOOP(item, items) {
    Acc largest, total;
    dcnv3_softmax(s, mask, dcnv3_item(s, item).masks, largest, total);
    dcn_store(stats, 2 * item, largest);
    dcn_store(stats, 2 * item + 1, total);
  }
}

/// Output rows of `items` items: out[item, c] for every channel c.
///
/// channel_lanes x point_lanes lanes per item, powers of two, their product at most 32
/// (blocks are whole warps). softmax: DCNv3's softmax of the mask, fused (stats from
/// dcnv3_softmax_stats; not read otherwise).
template <typename T, typename Index>
__global__ void __launch_bounds__(256, 4) dcnv3_forward(
    const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask, DCNV3_SHAPE_PARAMS,
    typename ComputeType<T>::type offset_scale, Index items, int channel_lanes, int point_lanes, int softmax,
    const typename ComputeType<T>::type* __restrict__ stats, T* __restrict__ out) {
  typedef typename ComputeType<T>::type Acc;
  constexpr int V = 16 / sizeof(T);
  const Dcnv3Shape s = DCNV3_SHAPE;
  const Dcnv3Lane lane = dcnv3_lane(channel_lanes, point_lanes);
  const int pixel_stride = s.group * s.channels;  // C < 2^31 (the launcher checks)
  const bool vector = s.channels % V == 0 && aligned_for<V>(input) && aligned_for<V>(out);
  const bool pairs = dcnv3_pairs(s, offset);
  const int blocks = (s.channels + channel_lanes * V - 1) / (channel_lanes * V);  // per lane; warp-uniform
  DCN_POINT_LOOP(first, items, lane.group_lanes) {
    // No early exit: every lane takes part in the shuffles below.
    const Index item = first + lane.item;
    const bool active = item < items;
    const Dcnv3Item<Index> it = dcnv3_item(s, active ? item : Index(0));
    for (int block = 0; block < blocks; ++block) {
      const int c = (block * channel_lanes + lane.channel) * V;
      const int count = s.channels - c < V ? s.channels - c : V;  // <= 0: this lane has no channels here
      const bool gathers = active && count > 0;
      Acc acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = Acc(0);
      // Point lane l takes points l, l + point_lanes, ...; every channel lane of
      // the point reads its offsets and mask (one address: one sector a point lane).
      for (int p = lane.point; gathers && p < s.points; p += point_lanes) {
        Acc y, x, m;
        dcnv3_point(s, offset, mask, it, item, p, pairs, offset_scale, softmax, stats, y, x, m);
        const Taps<Acc, int> taps = bilinear_taps<Acc, int>(y, x, s.height, s.width);
        gather_taps<V>(input + it.image + c, pixel_stride, taps, m, count, vector, acc);
      }
      // The point lanes' sums: lanes xor'd above the channel lanes stay in the group;
      // a + b == b + a, so every point lane ends with the same sums.
      for (int d = lane.group_lanes / 2; d >= channel_lanes; d /= 2) {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += __shfl_xor_sync(0xffffffffu, acc[v], d);
      }
      if (gathers && lane.point == 0) store_channels<V>(out + item * s.channels + c, count, vector, acc);
    }
  }
}

/// The bilinear weight of corner q of the taps, from their fractions: for a corner that
/// counts, taps.weight[q] bit for bit (recomputed where holding the four would cost registers).
template <typename Acc, typename Pixel>
__device__ __forceinline__ Acc dcnv3_tap_weight(const Taps<Acc, Pixel>& taps, int q) {
  return (q >> 1 ? taps.ly : Acc(1) - taps.ly) * (q & 1 ? taps.lx : Acc(1) - taps.lx);
}

/// Gradients of `items` items' offsets and mask (each of their elements written; with
/// softmax the gradient by the softmaxed mask, into scratch, for dcnv3_softmax_backward)
/// and, when input_gradient, their input gradient added to grad_input by atomics.
///
/// grad_input:   (N, H, W, C) in TAcc (float32 for the half types), zero-filled by the caller
/// grad_offset, grad_mask: laid out as offset and mask (for DCNv4 the same array)
/// stats:        with softmax, dcnv3_softmax_stats's
/// scratch:      with softmax, laid out as DCNv3's mask (N, Ho, Wo, G*P), in TAcc
/// channel_lanes x point_lanes lanes per item, as for the forward.
template <typename T, typename TAcc, typename Index>
__global__ void __launch_bounds__(256, 4) dcnv3_backward(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ offset,
    const T* __restrict__ mask, DCNV3_SHAPE_PARAMS, typename ComputeType<T>::type offset_scale, Index items,
    int channel_lanes, int point_lanes, int softmax, const typename ComputeType<T>::type* __restrict__ stats,
    int input_gradient, TAcc* __restrict__ grad_input, T* grad_offset, T* grad_mask, TAcc* __restrict__ scratch) {
  typedef typename ComputeType<T>::type Acc;
  const Dcnv3Shape s = DCNV3_SHAPE;
  const Dcnv3Lane lane = dcnv3_lane(channel_lanes, point_lanes);
  const int pixel_stride = s.group * s.channels;  // C < 2^31 (the launcher checks)
  const bool pairs = dcnv3_pairs(s, offset) && aligned_for<2>(grad_offset);
  const int rounds = (s.points + point_lanes - 1) / point_lanes;  // warp-uniform
  DCN_POINT_LOOP(first, items, lane.group_lanes) {
    // No early exit: every lane takes part in the shuffles below.
    const Index item = first + lane.item;
    const bool active = item < items;
    const Dcnv3Item<Index> it = dcnv3_item(s, active ? item : Index(0));
    for (int round = 0; round < rounds; ++round) {
      const int p = round * point_lanes + lane.point;
      const bool has = active && p < s.points;
      // Every channel lane of the point reads it (one address: one sector a point lane).
      Acc y = Acc(0), x = Acc(0), m = Acc(0);
      if (has) dcnv3_point(s, offset, mask, it, item, p, pairs, offset_scale, softmax, stats, y, x, m);
      const Taps<Acc, int> taps = bilinear_taps<Acc, int>(y, x, s.height, s.width, true);
      // This lane's corner products s_q: sums over its channels of grad_output x corner q's value.
      Acc products[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
      if (has) {
        for (int c = lane.channel; c < s.channels; c += channel_lanes) {
          const Acc g = to_compute(dcn_load(grad_output, item * s.channels + c));
          // load_taps<1>'s four unconditional loads, written out: so NVRTC keeps
          // float64 with 64-bit indices within 64 registers.
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const Acc v = to_compute(dcn_load(input, it.image + c + Index(taps.pixel[q]) * pixel_stride));
            products[q] += g * ((taps.valid >> q) & 1u ? v : Acc(0));
          }
        }
      }
      Acc dy, dx, dm;
      tap_gradients(taps, products, dy, dx, dm);
      // Channel lanes are the low bits of the group lane: xor offsets below
      // channel_lanes stay with the point; every channel lane ends with the same sums.
      for (int d = channel_lanes / 2; d > 0; d /= 2) {
        dy += __shfl_xor_sync(0xffffffffu, dy, d);
        dx += __shfl_xor_sync(0xffffffffu, dx, d);
        dm += __shfl_xor_sync(0xffffffffu, dm, d);
      }
      if (!has) continue;
      if (lane.channel == 0) {
        // The chain rule of the point formula: d x / d dx = offset_scale.
        const Acc gx = dx * m * offset_scale, gy = dy * m * offset_scale;
        const Index at = it.offsets + 2 * p;
        if (pairs) {
          ChannelVector<T, 2> xy;
          xy.v[0] = to_storage<T>(gx);
          xy.v[1] = to_storage<T>(gy);
          dcn_store(reinterpret_cast<ChannelVector<T, 2>*>(grad_offset + at), xy);
        } else {
          store(grad_offset + at, gx);
          store(grad_offset + at + 1, gy);
        }
        if (softmax)
          dcn_store(scratch, it.masks + p, static_cast<TAcc>(dm));
        else
          store(grad_mask + it.masks + p, dm);
      }
      // The input gradient in a second pass over the channels (grad_output
      // again, from cache), so that the corner products and the atomics'
      // weights are never live together.
      if (!input_gradient) continue;
      for (int c = lane.channel; c < s.channels; c += channel_lanes) {
        const Acc g = to_compute(dcn_load(grad_output, item * s.channels + c));
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if ((taps.valid >> q) & 1u)
            dcn_atomic_add(grad_input + it.image + Index(taps.pixel[q]) * pixel_stride + c,
                           static_cast<TAcc>(m * dcnv3_tap_weight(taps, q) * g));
      }
    }
  }
}

/// The softmax's Jacobian: grad_mask[p] = s_p (d_p - sum_q s_q d_q) for each of `items`
/// items, with s the softmaxed mask (stats) and d the gradient by it (scratch, from
/// dcnv3_backward, laid out as the mask); the sum in point order.
template <typename T, typename TAcc, typename Index>
__global__ void dcnv3_softmax_backward(const T* __restrict__ mask, DCNV3_SHAPE_PARAMS, Index items,
                                       const typename ComputeType<T>::type* __restrict__ stats,
                                       const TAcc* __restrict__ scratch, T* __restrict__ grad_mask) {
  typedef typename ComputeType<T>::type Acc;
  const Dcnv3Shape s = DCNV3_SHAPE;
  DCN_GRID_STRIDE_LOOP(item, items) {
    const Index masks = dcnv3_item(s, item).masks;
    Acc weighted = Acc(0);
    for (int p = 0; p < s.points; ++p)
      weighted += dcnv3_soft(stats, item, to_compute(dcn_load(mask, masks + p))) *
                  Acc(dcn_load(scratch, masks + p));
    for (int p = 0; p < s.points; ++p) {
      const Acc soft = dcnv3_soft(stats, item, to_compute(dcn_load(mask, masks + p)));
      store(grad_mask + masks + p, soft * (Acc(dcn_load(scratch, masks + p)) - weighted));
    }
  }
}

/// Keys and weights of the bilinear corners of items [first_item, first_item + items).
///
/// Entry e = ((item - first_item) * P + p) * 4 + corner. Its key is the input element
/// (its D channels) the corner lands on, counted from image first_image =
/// first_item / (Ho*Wo*G): ((n - first_image) * H*W + pixel) * G + g, or `sentinel`
/// (the chunk's images x H*W x G) where the corner counts 0; its weight is the mask
/// (softmaxed when `softmax`, by stats) times the bilinear weight (0 for the sentinel).
/// Keys fit Index (the launcher chooses it so).
template <typename T, typename Index>
__global__ void dcnv3_input_keys(const T* __restrict__ offset, const T* __restrict__ mask, DCNV3_SHAPE_PARAMS,
                                 typename ComputeType<T>::type offset_scale, Index first_item, Index items,
                                 int softmax, const typename ComputeType<T>::type* __restrict__ stats,
                                 Index sentinel, Index* __restrict__ keys,
                                 typename ComputeType<T>::type* __restrict__ key_weights) {
  typedef typename ComputeType<T>::type Acc;
  const Dcnv3Shape s = DCNV3_SHAPE;
  const Index total = items * s.points;
  const Index first_image = first_item / (Index(s.out_h) * s.out_w * s.group);
  const bool pairs = dcnv3_pairs(s, offset);
  DCN_GRID_STRIDE_LOOP(index, total) {
    const Index item = first_item + index / s.points;
    const int p = static_cast<int>(index % s.points);
    const Dcnv3Item<Index> it = dcnv3_item(s, item);
    Acc y, x, m;
    dcnv3_point(s, offset, mask, it, item, p, pairs, offset_scale, softmax, stats, y, x, m);
    const Taps<Acc, int> taps = bilinear_taps<Acc, int>(y, x, s.height, s.width);
    const Index pixel0 = (it.image_number - first_image) * s.height * Index(s.width);
    const int g = static_cast<int>(item % s.group);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const bool valid = (taps.valid >> q) & 1u;
      dcn_store(keys, index * 4 + q, valid ? (pixel0 + taps.pixel[q]) * s.group + g : sentinel);
      dcn_store(key_weights, index * 4 + q, valid ? m * taps.weight[q] : Acc(0));
    }
  }
}
