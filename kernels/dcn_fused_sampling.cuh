// dcn_fused_sampling.cuh: what the column-free (implicit GEMM) kernels share.
//
//   FusedTile                      the block tile: 64 output pixels x 64 output channels of one
//                                  convolution group, 128 threads (2 x 2 warps of 32 x 32),
//                                  32 input channels of one kernel point per slice
//   FusedF16, FusedBF16, FusedTF32, FusedFMA, FusedHalf<E>, fused_mma16(...)
//                                  operand policies: how a slice's channels pack into 32-bit
//                                  words of shared memory, and which multiply-add consumes them
//   FusedLayout<Op>                sizes of the word tiles of one policy (rows padded by 4 words)
//   offset_groups_of(...)          the offset groups whose channels a convolution group uses
//   shared_channels(...)           the channels a convolution group shares with one offset group
//   BilinearTap, bilinear_tap(...), empty_tap()
//                                  where (image, output pixel, kernel point, offset group) samples:
//                                  four corners (pixel in the image), bilinear weights and the mask
//   sample_channels<V>(...)        mask x bilinear sample of V consecutive channels at a tap
//   gather_a_row<Op>(...)          a thread's half of one A-tile row: samples x mask of a slice
//   store_row_words<Op>(...)       values -> words of a tile row, zero past `count`
//   load_b_row<Op>(...)            a thread's half of one B-tile row: consecutive values (weights)
//   warp_tile_product<Op>(...)     acc += A B for the calling warp's 32 x 32 part of the tile
//   fused_each_product(...)        f(row, column, value) over the calling warp's part of a product
//
// Tiles. A slice is `count` <= 32 consecutive input channels of one kernel point, all of one
// offset group and one convolution group (so that one tap serves the whole slice). The A
// tile holds, for each of the 64 pixels of the block (a row each), the slice's samples x mask;
// the B tile holds, for each of the 64 output channels (a row each), the weights of the same
// channels. Both are rows of 32-bit words, k (the channel) contiguous: two channels a word for
// float16 and bfloat16 (the lower channel in the low half, as mma.sync wants its pairs), one for
// tf32 and float32. Channels past `count` are zero in both tiles (zero in one alone would let
// 0 x NaN into the sum), and so are rows past the last pixel or output channel.
//
// Rows are padded from 16 (32) to 20 (36) words: the eight rows a fragment load touches then
// fall in distinct banks, and so do the rows of the scalar (FMA) policy's loads.
#pragma once

#include "dcn_common.cuh"
#include "dcn_mma.cuh"
#include "sampling.cuh"

/// The block tile of the column-free kernels.
struct FusedTile {
  static constexpr int kThreads = 128;          // 4 warps
  static constexpr int kWarpsM = 2;             // warps along the pixels
  static constexpr int kWarpsN = 2;             // warps along the output channels
  static constexpr int kWarpPixels = 32;        // each warp: 2 MMA tiles of 16 rows ...
  static constexpr int kWarpOutChannels = 32;   // ... by 4 of 8 columns
  static constexpr int kPixels = kWarpsM * kWarpPixels;                // 64 (BM)
  static constexpr int kOutChannels = kWarpsN * kWarpOutChannels;      // 64 (BN)
  static constexpr int kChannels = 32;          // input channels per slice (BK)
  static constexpr int kHalf = kChannels / 2;   // channels of a slice row per producer thread
  static constexpr int kPadWords = 4;
};

/// mma.m16n8k16 in the type of the tag: float16 (sm_75 and newer) or bfloat16 (sm_80 and newer).
__device__ __forceinline__ void fused_mma16(dcn_half, float (&acc)[4], const unsigned (&a)[4],
                                            const unsigned (&b)[2]) {
  dcn_mma_m16n8k16_f16(acc, a, b, acc);
}
__device__ __forceinline__ void fused_mma16(dcn_bfloat16, float (&acc)[4], const unsigned (&a)[4],
                                            const unsigned (&b)[2]) {
  dcn_mma_m16n8k16_bf16(acc, a, b, acc);
}

/// 16-bit operands (E: dcn_half or dcn_bfloat16), two channels a word,
/// mma.m16n8k16 with float32 accumulation.
template <typename E>
struct FusedHalf {
  typedef E Element;
  static constexpr bool kTensorCores = true;
  static constexpr int kPerWord = 2;  // channels per 32-bit word
  __device__ static __forceinline__ unsigned word(float low, float high) {
    return dcn_pack_half2(to_storage<E>(low).bits, to_storage<E>(high).bits);
  }
  __device__ static __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    fused_mma16(E(), acc, a, b);
  }
};
typedef FusedHalf<dcn_half> FusedF16;
typedef FusedHalf<dcn_bfloat16> FusedBF16;

/// float32 operands rounded to tf32 once, as they enter shared memory; mma.m16n8k8 (sm_80 and newer).
struct FusedTF32 {
  typedef float Element;
  static constexpr bool kTensorCores = true;
  static constexpr int kPerWord = 1;
  __device__ static __forceinline__ unsigned word(float v) { return dcn_to_tf32(v); }
  __device__ static __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    dcn_mma_m16n8k8_tf32(acc, a, b, acc);
  }
};

/// float32 operands, scalar fused multiply-adds in the MMA's accumulator layout (any GPU).
struct FusedFMA {
  typedef float Element;
  static constexpr bool kTensorCores = false;
  static constexpr int kPerWord = 1;
  __device__ static __forceinline__ unsigned word(float v) { return __float_as_uint(v); }
};

/// Word tiles of policy Op: A (kPixels rows) then B (kOutChannels rows), rows of kRowWords.
template <typename Op>
struct FusedLayout {
  static constexpr int kSliceWords = FusedTile::kChannels / Op::kPerWord;  // 16 or 32
  static constexpr int kRowWords = kSliceWords + FusedTile::kPadWords;
  static constexpr int kATileWords = FusedTile::kPixels * kRowWords;
  static constexpr int kBTileWords = FusedTile::kOutChannels * kRowWords;
  static constexpr int kStageWords = kATileWords + kBTileWords;  // one A and one B tile
};

/// The offset groups [first, last] whose channels convolution group `group` uses.
__device__ __forceinline__ void offset_groups_of(const ConvShape& s, int group, int& first, int& last) {
  const int group_channels = s.channels / s.groups, point_channels = s.channels / s.offset_groups;
  first = group * group_channels / point_channels;
  last = ((group + 1) * group_channels - 1) / point_channels;
}

/// The input channels [begin, end) that convolution group `group` shares with offset group g.
__device__ __forceinline__ void shared_channels(const ConvShape& s, int group, int g, int& begin, int& end) {
  const int group_channels = s.channels / s.groups, point_channels = s.channels / s.offset_groups;
  const int group_begin = group * group_channels, point_begin = g * point_channels;
  begin = group_begin > point_begin ? group_begin : point_begin;
  end = group_begin + group_channels < point_begin + point_channels ? group_begin + group_channels
                                                                    : point_begin + point_channels;
}

/// One sampling point's bilinear neighbourhood, ready to gather channels from.
template <typename Index>
struct BilinearTap {
  Index pixel[4];   // y*W + x of corner q (order of corner()) in its image; -1: outside (counts 0)
  float weight[4];  // bilinear weight of corner q (0 where outside)
  float mask;       // modulation (1 without a mask); 0 where the point does not count
};

/// A tap that samples nothing (rows past the last pixel of a tile).
template <typename Index>
__device__ __forceinline__ BilinearTap<Index> empty_tap() {
  BilinearTap<Index> tap;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    tap.pixel[q] = -1;
    tap.weight[q] = 0.0f;
  }
  tap.mask = 0.0f;
  return tap;
}

/// The tap of kernel point k of output pixel l of image n in offset group g
/// (torchvision's value semantics: a point with y <= -1, y >= H, x <= -1 or
/// x >= W, or a NaN or huge offset, counts 0 and reads nothing; the mask is
/// read only where the point counts).
template <typename T, typename Index>
__device__ __forceinline__ BilinearTap<Index> bilinear_tap(const ConvShape& s, const T* offset,
                                                           const T* mask, int has_mask, Index n,
                                                           int g, int k, int l, DcnCaller = {}) {
  BilinearTap<Index> tap = empty_tap<Index>();
  float y, x, ly, lx;
  int y0, x0;
  sampling_point(s, offset, n, g, k, l, y, x);
  if (!locate(y, x, s.height, s.width, y0, x0, ly, lx)) return tap;
  tap.mask = mask_value(s, mask, has_mask, n, g, k, l);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const Corner<float> c = corner(q, y0, x0, ly, lx, s.height, s.width);
    if (c.valid) {
      tap.pixel[q] = Index(c.y) * s.width + c.x;
      tap.weight[q] = c.weight;
    }
  }
  return tap;
}

/// values[v] = mask x bilinear sample of channel `channel` + v at `tap`, for
/// v < count (0 beyond), from a channels-last image (H*W, channels): the
/// corners' weighted sum first, then the mask, as deform_im2col computes a
/// column. One vector load per corner when `vector` (count is V then).
template <int V, typename T, typename Index>
__device__ __forceinline__ void sample_channels(const T* image, int channels, const BilinearTap<Index>& tap,
                                                int channel, int count, bool vector, float (&values)[V],
                                                DcnCaller = {}) {
#pragma unroll
  for (int v = 0; v < V; ++v) values[v] = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (tap.pixel[q] < 0) continue;
    float pixel[V];
    load_channels<V>(image + tap.pixel[q] * channels + channel, count, vector, pixel);
#pragma unroll
    for (int v = 0; v < V; ++v) values[v] += tap.weight[q] * pixel[v];
  }
#pragma unroll
  for (int v = 0; v < V; ++v) values[v] *= tap.mask;
}

/// Words of a tile row for V channel values starting at channel `first` of
/// the slice (a multiple of V), rounded to the policy's operand type.
template <typename Op, int V>
__device__ __forceinline__ void store_row_words(DCN_SHARED_PTR(unsigned) row, int first, const float (&values)[V],
                                                DcnCaller = {}) {
#pragma unroll
  for (int w = 0; w < V / Op::kPerWord; ++w) {
    if constexpr (Op::kPerWord == 2)
      row[first / 2 + w] = Op::word(values[2 * w], values[2 * w + 1]);
    else
      row[first + w] = Op::word(values[w]);
  }
}

/// Channels of the 16-byte blocks the producers move: 8 float16 or bfloat16, 4 float32.
template <typename T>
struct FusedVector {
  static constexpr int value = ChannelsPerLane<T, T>::value;
};

/// A thread's half (`part` 0 or 1: channels [16*part, 16*part + 16) of the
/// slice) of one A-tile row: samples x mask of channels channel + c, c < count,
/// at `tap`, zero for c >= count. image: the pixel's image, channels-last
/// (H*W, C); `vector`: 16-byte loads (channel blocks fit and the input is
/// aligned; see channel_vectors_fit).
template <typename Op, typename T, typename Index>
__device__ __forceinline__ void gather_a_row(DCN_SHARED_PTR(unsigned) row, int part, const T* image,
                                             int channels, const BilinearTap<Index>& tap, int channel,
                                             int count, bool vector, DcnCaller = {}) {
  constexpr int V = FusedVector<T>::value;
#pragma unroll
  for (int j = 0; j < FusedTile::kHalf; j += V) {
    const int c = part * FusedTile::kHalf + j;
    const int valid = count - c >= V ? V : (count - c > 0 ? count - c : 0);
    float values[V];
    if (valid > 0) {
      sample_channels<V>(image, channels, tap, channel + c, valid, vector && valid == V, values);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) values[v] = 0.0f;
    }
    store_row_words<Op>(row, c, values);
  }
}

/// A thread's half (`part`) of one B-tile row: weights of channels channel + c
/// (c < count; 0 beyond, and everywhere when !valid) for one output channel.
/// weights: that output channel's row of the prepared weight at the slice's
/// first channel.
template <typename Op, typename T>
__device__ __forceinline__ void load_b_row(DCN_SHARED_PTR(unsigned) row, int part, const T* weights,
                                           bool valid, int count, bool vector, DcnCaller = {}) {
  constexpr int V = FusedVector<T>::value;
#pragma unroll
  for (int j = 0; j < FusedTile::kHalf; j += V) {
    const int c = part * FusedTile::kHalf + j;
    const int n = !valid ? 0 : count - c >= V ? V : (count - c > 0 ? count - c : 0);
    float values[V];
    load_channels<V>(weights + c, n, vector && n == V, values);
    store_row_words<Op>(row, c, values);
  }
}

/// acc[mi][ni] += A[rows 16 mi .. 16 mi + 15] x B[rows 8 ni .. 8 ni + 7]^T over
/// one slice, for the calling warp (all 32 lanes, converged). a and b point at
/// the warp's first A row and first B row. acc[mi][ni] is the 16 x 8 MMA
/// accumulator (dcn_mma_c_coord) for either policy kind: the tensor-core
/// policies run one MMA per 8 words of k, FusedFMA the same products by
/// scalar FMAs in k order.
template <typename Op>
__device__ __forceinline__ void warp_tile_product(float (&acc)[2][4][4], DCN_SHARED_PTR(unsigned) a,
                                                  DCN_SHARED_PTR(unsigned) b, DcnCaller = {}) {
  constexpr int ld = FusedLayout<Op>::kRowWords;
  const int lane = dcn_lane();
  if constexpr (Op::kTensorCores) {
    // Fragment element -> (row, k): register r holds A elements 2r, 2r+1 (one
    // word) for 16-bit types, element r for tf32; likewise B.
#pragma unroll
    for (int step = 0; step < FusedLayout<Op>::kSliceWords; step += 8) {
      unsigned fa[2][4], fb[4][2];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int row, col;
        if constexpr (Op::kPerWord == 2)
          dcn_mma_a16_coord(lane, 2 * r, row, col);
        else
          dcn_mma_a8_tf32_coord(lane, r, row, col);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) fa[mi][r] = a[(mi * 16 + row) * ld + step + col / Op::kPerWord];
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        int k, col;
        if constexpr (Op::kPerWord == 2)
          dcn_mma_b16_coord(lane, 2 * r, k, col);
        else
          dcn_mma_b8_tf32_coord(lane, r, k, col);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) fb[ni][r] = b[(ni * 8 + col) * ld + step + k / Op::kPerWord];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) Op::mma(acc[mi][ni], fa[mi], fb[ni]);
    }
  } else {
    int rows[2], cols[2];  // this lane's accumulator rows (i = 0, 2) and columns (i = 0, 1)
    dcn_mma_c_coord(lane, 0, rows[0], cols[0]);
    dcn_mma_c_coord(lane, 3, rows[1], cols[1]);
#pragma unroll 4
    for (int k = 0; k < FusedLayout<Op>::kSliceWords; ++k) {
      float av[2][2], bv[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const unsigned w = a[(mi * 16 + rows[h]) * ld + k];
          av[mi][h] = __uint_as_float(w);
        }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const unsigned w = b[(ni * 8 + cols[e]) * ld + k];
          bv[ni][e] = __uint_as_float(w);
        }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mi][ni][i] += av[mi][i >> 1] * bv[ni][i & 1];
    }
  }
}

/// f(row, column, value) for each element of the calling warp's part of the
/// tile product (acc as warp_tile_product leaves it): row among the A
/// tile's rows, column among the B tile's.
template <typename F>
__device__ __forceinline__ void fused_each_product(const float (&acc)[2][4][4], int warp_m, int warp_n, F&& f) {
  const int lane = dcn_lane();
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int r, c;
        dcn_mma_c_coord(lane, i, r, c);
        f(warp_m * FusedTile::kWarpPixels + mi * 16 + r, warp_n * FusedTile::kWarpOutChannels + ni * 8 + c,
          acc[mi][ni][i]);
      }
}
