// dcn_common.cuh: what every deformable-convolution kernel shares.
//
//   dcn_half, dcn_bfloat16     2-byte storage types (bit patterns of IEEE half / bfloat16)
//   ComputeType<T>::type       float for float16, bfloat16 and float32; double for float64
//   to_compute(v)              storage value -> compute type
//   store(p, v)                compute value -> *p, rounded to nearest even
//   dcn_floor(v)               floor in float or double
//   ConvShape, DCN_SHAPE_*     the geometry of one launch, passed as plain int arguments
//   DCN_GRID_STRIDE_LOOP       grid-stride loop over [0, total) in the index type
//   column_element(...)        (n, l, k, c, g) of a column-buffer element
//   point_element(...)         (n, g, k, l) of a sampling point
//   sampling_point(...)        where kernel point k of output pixel l samples
//   mask_value(...)            its modulation (1 without a mask)
//   locate(...)                whether the point counts (for its value or its slope), and its top-left corner
//   corner(...)                one of the four bilinear corners: pixel, weight, derivatives
//
// No CUDA header is included, on purpose: NVRTC then compiles these kernels
// with no include path at all (`python -m cudcn compile` works on any machine
// with NVRTC), and the host-emulation harness compiles the very same text with
// g++ under a small shim (tests/emulation/emulate.h).
#pragma once

/// IEEE binary16, as its bit pattern (NumPy float16 has the same layout).
struct dcn_half {
  unsigned short bits;
};

/// bfloat16 (the top half of a float32), as its bit pattern (ml_dtypes layout).
struct dcn_bfloat16 {
  unsigned short bits;
};

/// The type a kernel computes in: half types are widened to float.
template <typename T>
struct ComputeType {
  typedef float type;
};
template <>
struct ComputeType<double> {
  typedef double type;
};

/// Storage -> compute type.
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(dcn_bfloat16 v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}
__device__ __forceinline__ float to_compute(dcn_half v) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#else
  return dcn_host_half_to_float(v.bits);  // provided by the emulation shim
#endif
}

/// Compute type -> storage, rounding to nearest even.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(dcn_bfloat16* p, float v) {
  const unsigned int u = __float_as_uint(v);
  // Rounding a NaN's bits could carry into the exponent and make infinity.
  p->bits = (u & 0x7fffffffu) > 0x7f800000u
                ? static_cast<unsigned short>((u >> 16) | 0x0040u)
                : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ void store(dcn_half* p, float v) {
#ifdef __CUDA_ARCH__
  unsigned short bits;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
  p->bits = bits;
#else
  p->bits = dcn_host_float_to_half(v);  // provided by the emulation shim
#endif
}

/// floor in the compute type.
__device__ __forceinline__ float dcn_floor(float v) { return floorf(v); }
__device__ __forceinline__ double dcn_floor(double v) { return floor(v); }

/// Geometry of one launch. `batch` is the number of images in this launch
/// (a chunk of the call's batch); `groups` is the number of convolution groups
/// in the column layout (groups, batch, Ho*Wo, kh*kw, C/groups).
struct ConvShape {
  int batch, channels, height, width;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int out_h, out_w, offset_groups, groups;
};

// Shapes travel as kernel arguments (never pasted into the source, so that
// one compiled kernel serves every shape); the launcher passes them in this
// order.
#define DCN_SHAPE_PARAMS                                                       \
  int batch, int channels, int height, int width, int kernel_h, int kernel_w, \
      int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,  \
      int out_h, int out_w, int offset_groups, int groups
#define DCN_SHAPE                                                              \
  ConvShape {                                                                  \
    batch, channels, height, width, kernel_h, kernel_w, stride_h, stride_w,    \
        pad_h, pad_w, dil_h, dil_w, out_h, out_w, offset_groups, groups        \
  }

// The grid is capped, so one thread handles several elements. The launcher
// picks Index = int only when total plus one grid's worth of threads stays
// below 2^31, so the increment cannot overflow.
#define DCN_GRID_STRIDE_LOOP(i, total)                                          \
  for (Index i = Index(blockIdx.x) * Index(blockDim.x) + Index(threadIdx.x);   \
       i < (total); i += Index(blockDim.x) * Index(gridDim.x))

/// The element `index` of the column layout (groups, batch, Ho*Wo, K, C/groups):
/// image n, output pixel l, kernel point k, input channel c, offset group g.
template <typename Index>
__device__ __forceinline__ void column_element(const ConvShape& s, Index index, Index& n,
                                               int& l, int& k, int& c, int& g) {
  const int group_channels = s.channels / s.groups;
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  const int cg = static_cast<int>(index % group_channels);
  index /= group_channels;
  k = static_cast<int>(index % K);
  index /= K;
  l = static_cast<int>(index % L);
  index /= L;
  n = index % s.batch;
  c = static_cast<int>(index / s.batch) * group_channels + cg;
  g = c / (s.channels / s.offset_groups);
}

/// The sampling point `index` of the layout (batch, G, K, Ho*Wo) (that of the
/// mask): image n, offset group g, kernel point k, output pixel l.
template <typename Index>
__device__ __forceinline__ void point_element(const ConvShape& s, Index index, Index& n,
                                              int& g, int& k, int& l) {
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  l = static_cast<int>(index % L);
  index /= L;
  k = static_cast<int>(index % K);
  index /= K;
  g = static_cast<int>(index % s.offset_groups);
  n = index / s.offset_groups;
}

/// Sampling point (y, x) of kernel point k of output pixel l of image n in
/// offset group g: the regular grid position plus the learned offset.
/// offset is (batch, 2*G*K, Ho, Wo); channel g*2K + 2k is the row shift.
template <typename T, typename Index, typename Acc>
__device__ __forceinline__ void sampling_point(const ConvShape& s, const T* offset,
                                               Index n, int g, int k, int l, Acc& y,
                                               Acc& x) {
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  const int i = k / s.kernel_w, j = k % s.kernel_w;
  const int h = l / s.out_w, w = l % s.out_w;
  const Index at = ((n * s.offset_groups + g) * 2 * K + 2 * k) * L + l;
  y = Acc(h * s.stride_h - s.pad_h + i * s.dil_h) + to_compute(offset[at]);
  x = Acc(w * s.stride_w - s.pad_w + j * s.dil_w) + to_compute(offset[at + L]);
}

/// Modulation of kernel point k of output pixel l of image n in offset group
/// g; mask is (batch, G*K, Ho, Wo) and is not read when has_mask is 0.
template <typename T, typename Index>
__device__ __forceinline__ typename ComputeType<T>::type mask_value(
    const ConvShape& s, const T* mask, int has_mask, Index n, int g, int k, int l) {
  typedef typename ComputeType<T>::type Acc;
  if (!has_mask) return Acc(1);
  const int K = s.kernel_h * s.kernel_w;
  return to_compute(mask[((n * s.offset_groups + g) * K + k) * Index(s.out_h * s.out_w) + l]);
}

/// Whether the point (y, x) counts at all (-1 < y < H and -1 < x < W); if so,
/// its top-left corner (y0, x0) and fractional parts (ly, lx).
///
/// With `for_slope`, whether it counts for the derivatives: -1 <= y < H and
/// -1 <= x < W. On row (column) -1 the value is 0 but the one-sided slope
/// towards row (column) 0 is not, as in torchvision: there every corner
/// weight is 0 and only the derivatives of the row (column) 0 corners remain.
template <typename Acc>
__device__ __forceinline__ bool locate(Acc y, Acc x, int height, int width, int& y0,
                                       int& x0, Acc& ly, Acc& lx, bool for_slope = false) {
  // Tested on the float before any conversion: NaN fails every comparison, and
  // a huge or infinite value never reaches the float-to-int conversion (which
  // would be undefined).
  const bool above = for_slope ? (y >= Acc(-1) && x >= Acc(-1)) : (y > Acc(-1) && x > Acc(-1));
  if (!(above && y < Acc(height) && x < Acc(width))) return false;
  const Acc fy = dcn_floor(y), fx = dcn_floor(x);
  y0 = static_cast<int>(fy);
  x0 = static_cast<int>(fx);
  ly = y - fy;
  lx = x - fx;
  return true;
}

/// One corner of the bilinear neighbourhood.
template <typename Acc>
struct Corner {
  int y, x;     // pixel
  bool valid;   // inside the image (outside pixels count 0)
  Acc weight;   // bilinear weight
  Acc d_dy;     // d weight / d y
  Acc d_dx;     // d weight / d x
};

/// Corner c of the neighbourhood of (y0 + ly, x0 + lx), in the order
/// (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
template <typename Acc>
__device__ __forceinline__ Corner<Acc> corner(int c, int y0, int x0, Acc ly, Acc lx,
                                              int height, int width) {
  const int down = c >> 1, right = c & 1;
  Corner<Acc> r;
  r.y = y0 + down;
  r.x = x0 + right;
  r.valid = r.y >= 0 && r.y < height && r.x >= 0 && r.x < width;
  const Acc wy = down ? ly : Acc(1) - ly;
  const Acc wx = right ? lx : Acc(1) - lx;
  r.weight = wy * wx;
  r.d_dy = down ? wx : -wx;
  r.d_dx = right ? wy : -wy;
  return r;
}
