// sampling.cuh: the bilinear-sampling core that every operator family shares.
//
//   locate(...)                whether a point counts (for its value or its slope), and its top-left corner
//   Corner, corner(...)        one of the four bilinear corners: pixel, validity, weight, derivatives
//   mul_rn(a, b)               a * b rounded once (never fused into a multiply-add)
//   Taps, bilinear_taps(...)   a point's four corners ready to gather: clamped pixels, weights,
//                              fractions, validity bits
//   load_taps<V>(...)          the four corners' values of V consecutive channels, all four loads first
//   gather_taps<V>(...)        acc += scale * bilinear sample of V consecutive channels
//   store_channels<V>(...)     V values rounded to the storage type, one vector store where aligned
//   tap_gradients(...)         d/dy, d/dx and d/d(weight) of a point from its corner products
//
// A point (y, x) is in pixel coordinates of its image (row y, column x; pixel
// (r, c) has its centre at y = r, x = c). Bilinear sampling reads the four
// pixels around it, (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) with
// y0 = floor(y), x0 = floor(x) -- corner q = 0..3 in that order. A corner
// outside the image counts 0; a point with y <= -1, y >= H, x <= -1 or x >= W
// (or a non-finite one) counts 0 as a whole. At an integer coordinate (a kink)
// the derivative is the one-sided one towards +1, also at -1 (where the value
// is 0 but the slope towards row or column 0 is not; locate's for_slope).
// cudcn/backends/numpy/sampling.py states the same as a sparse matrix.
//
// How a front-end uses it: compute the point (y, x) in the compute type (a
// kernel grid plus offsets, a normalised location times the level size, ...);
// `bilinear_taps` once per point (one lane, or every lane of a group that
// shares the point); then per block of channels `gather_taps` (forward:
// weighted sum) or `load_taps` (backward: corner values for the corner
// products s_q, sums over channels of a gradient times corner q's value,
// which `tap_gradients` turns into the point's derivatives).
// The taps hold a valid address for every corner (pixel 0 where a corner
// counts 0), so the four loads carry no condition and are issued together
// before any value is used; a corner that counts 0 is zeroed after the load
// (not multiplied by a zero weight: 0 x inf would be NaN).
#pragma once

#include "dcn_common.cuh"

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

/// a * b rounded once to the type. A product that a subtraction follows
/// (x * W - 0.5) would otherwise be fused into one FMA by NVCC, rounding
/// once where NumPy rounds twice: a point next to a kink could then land on
/// the other side of it.
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;  // the emulator's g++ (x86-64, no -mfma) fuses nothing
#endif
}
__device__ __forceinline__ double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

/// A point's bilinear neighbourhood, ready for gathers that issue the four
/// corners' loads at once. Pixel, the type of a pixel's number in its image:
/// int where every image has fewer than 2^31 pixels (fewer registers; the
/// launcher checks), else long long. Addresses are formed in the caller's
/// index type (load_taps, gather_taps).
template <typename Acc, typename Pixel>
struct Taps {
  Pixel pixel[4];   // y*W + x of corner q; 0 (a valid address) where corner q counts 0
  Acc weight[4];    // bilinear weight of corner q; 0 where it counts 0
  Acc ly, lx;       // fractional parts y - y0, x - x0 (0 where the point does not count)
  unsigned valid;   // bit q: corner q lies inside the image and the point counts
};

/// The taps of point (y, x) in an image of height x width pixels (locate's
/// rule; with `for_slope` a point on row or column -1 counts, for its
/// derivatives). Corners outside the image, and every corner of a point that
/// does not count, read pixel 0 and weigh 0.
template <typename Acc, typename Pixel>
__device__ __forceinline__ Taps<Acc, Pixel> bilinear_taps(Acc y, Acc x, int height, int width,
                                                          bool for_slope = false) {
  int y0 = 0, x0 = 0;
  Acc ly = Acc(0), lx = Acc(0);
  const bool counts = locate(y, x, height, width, y0, x0, ly, lx, for_slope);
  Taps<Acc, Pixel> taps;
  taps.ly = ly;
  taps.lx = lx;
  taps.valid = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const Corner<Acc> c = corner(q, y0, x0, ly, lx, height, width);
    const bool valid = counts && c.valid;
    taps.pixel[q] = valid ? Pixel(c.y) * width + c.x : Pixel(0);
    taps.weight[q] = valid ? c.weight : Acc(0);
    taps.valid |= static_cast<unsigned>(valid) << q;
  }
  return taps;
}

/// values[q][v] = channel v of corner q, for V consecutive channels whose
/// first, in pixel p, is at image[p * pixel_stride]; 0 where corner q counts 0
/// and for v >= count. The four corners' loads come first, unconditionally
/// (every tap's address is valid), then the conversions: the loads are in
/// flight together. `vector`: one V-wide load per corner (then count is V and
/// every corner's address is aligned to V elements); otherwise V scalar
/// loads, those at v >= count not made. Either way the same values.
template <int V, typename T, typename Acc, typename Pixel, typename Index>
__device__ __forceinline__ void load_taps(const T* image, Index pixel_stride, const Taps<Acc, Pixel>& taps,
                                          int count, bool vector, Acc (&values)[4][V], DcnCaller = {}) {
  ChannelVector<T, V> raw[4];
  if (vector) {
#pragma unroll
    for (int q = 0; q < 4; ++q)
      raw[q] = dcn_load(reinterpret_cast<const ChannelVector<T, V>*>(image + Index(taps.pixel[q]) * pixel_stride));
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int v = 0; v < V; ++v)
        raw[q].v[v] = v < count ? dcn_load(image + Index(taps.pixel[q]) * pixel_stride, v) : T();
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int v = 0; v < V; ++v) values[q][v] = (taps.valid >> q) & 1u ? to_compute(raw[q].v[v]) : Acc(0);
}

/// acc[v] += scale * sum over corners q (in order) of weight_q * channel v of
/// corner q, for V consecutive channels (as load_taps reads them). The
/// vector path issues the four corners' loads together; the scalar path
/// (misaligned arrays, or a tail of fewer than V channels) goes corner by
/// corner, holding V values instead of 4 V. The same operations in the same
/// order either way: the same bits.
template <int V, typename T, typename Acc, typename Pixel, typename Index>
__device__ __forceinline__ void gather_taps(const T* image, Index pixel_stride, const Taps<Acc, Pixel>& taps,
                                            Acc scale, int count, bool vector, Acc (&acc)[V], DcnCaller = {}) {
  if (vector) {
    Acc values[4][V];
    load_taps<V>(image, pixel_stride, taps, V, true, values);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const Acc weight = scale * taps.weight[q];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += weight * values[q][v];
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      Acc values[V];
      load_channels<V>(image + Index(taps.pixel[q]) * pixel_stride, count, false, values);
      const bool valid = (taps.valid >> q) & 1u;
      const Acc weight = scale * taps.weight[q];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += weight * (valid ? values[v] : Acc(0));
    }
  }
}

/// p[v] = values[v] rounded to T, for v < count: one V-wide store when
/// `vector` (count is V and p aligned to V elements), else element by element.
template <int V, typename T, typename Acc>
__device__ __forceinline__ void store_channels(T* p, int count, bool vector, const Acc (&values)[V],
                                               DcnCaller = {}) {
  if (vector) {
    ChannelVector<T, V> x;
#pragma unroll
    for (int v = 0; v < V; ++v) x.v[v] = to_storage<T>(values[v]);
    dcn_store(reinterpret_cast<ChannelVector<T, V>*>(p), x);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v < count) store(p + v, values[v]);
  }
}

/// The derivatives of a point from its corner products s[q] (the sum over
/// channels of a gradient times corner q's value, 0 for a corner that counts
/// 0 -- as load_taps gives them): d/dy = sum_q (d weight_q / dy) s_q, d/dx
/// likewise, and d/d(scale) = sum_q weight_q s_q (the derivative by the
/// weight a sample is scaled with), in pixel units:
///   top = (1 - lx) s_0 + lx s_1,   bottom = (1 - lx) s_2 + lx s_3    (rows y0, y0 + 1)
///   d/dy = bottom - top,   d/dx = (1 - ly)(s_1 - s_0) + ly (s_3 - s_2),
///   d/d(scale) = (1 - ly) top + ly bottom.
/// At an integer coordinate, the one-sided derivative towards +1.
template <typename Acc, typename Pixel>
__device__ __forceinline__ void tap_gradients(const Taps<Acc, Pixel>& taps, const Acc (&s)[4], Acc& d_dy,
                                              Acc& d_dx, Acc& d_dscale) {
  const Acc top = (Acc(1) - taps.lx) * s[0] + taps.lx * s[1];
  const Acc bottom = (Acc(1) - taps.lx) * s[2] + taps.lx * s[3];
  d_dy = bottom - top;
  d_dx = (Acc(1) - taps.ly) * (s[1] - s[0]) + taps.ly * (s[3] - s[2]);
  d_dscale = (Acc(1) - taps.ly) * top + taps.ly * bottom;
}
