// dcn_fused_sampling.cuh: what the column-free (implicit GEMM) kernels share.
//
//   FusedTile                      the block tile: 64 rows of A (output pixels) x 64 rows of B
//                                  (output channels) of one convolution group, 128 threads (2 x 2
//                                  warps of 32 x 32), a slice of 64 bytes of k per tile row
//   FusedF16, FusedBF16, FusedTF32, FusedFMA, FusedHalf<E>, fused_mma16(...)
//                                  operand policies: how values pack into 32-bit words of shared
//                                  memory, and which multiply-add consumes them
//   FusedLayout<Op>                the slice depth (k values per tile row) and tile sizes of a policy
//   fused_chunk(row, c), fused_chunk_at(tile, row, c), fused_store_chunk(tile, row, c, value)
//                                  where chunk c (16 bytes) of a tile row lies: the swizzle
//   chunk_value<T>(chunk, v), pack_chunk<Op>(values), load_chunk<T>(p, count)
//                                  16-byte chunks of V values: read, built, loaded element-wise
//   fill_chunk<kVector>(dst, p, valid, fallback)
//                                  a chunk of consecutive values into shared memory: cp.async, or
//                                  element loads and a store
//   offset_groups_of(...)          the offset groups whose channels a convolution group uses
//   shared_channels(...)           the channels a convolution group shares with one offset group
//   BilinearTap, bilinear_tap(...), empty_tap(), tap_pixel(...), tap_corner(...)
//                                  where (image, output pixel, kernel point, offset group) samples:
//                                  four corners (pixel in the image), bilinear weights and the mask
//   warp_tile_product<Op>(...)     acc += A B for the calling warp's 32 x 32 part of the tile
//   fused_each_product(...)        f(row, column, value) over the calling warp's part of a product
//
// Tiles. A tile is 64 rows of 16 words (64 bytes): the k values of one slice, k contiguous,
// two values a word for float16 and bfloat16 (the lower k in the low half, as mma.sync wants
// its pairs), one for tf32 and float32. So a slice is 32 values deep in 16-bit types and 16 in
// 32-bit ones (FusedLayout<Op>::kDepth), and a row is four 16-byte chunks of V = kDepth / 4
// values. Values past a slice's `count` are zero in both tiles (zero in one alone would let 0 x
// NaN into the sum), and so are rows past the last pixel or output channel.
//
// Swizzle. Chunk c of row r sits at chunk fused_chunk(r, c) = c ^ (2 * r1 + r2) of its row (r1,
// r2: bits 1 and 2 of r); two rows fill a 128-byte line of the 32 banks. Then
//   - the 8 rows of one ldmatrix matrix (8 consecutive rows from a multiple of 8, one chunk)
//     fall in 8 distinct 16-byte bank groups: fragment loads are conflict-free;
//   - a producer's 16-byte stores (quarter-warp phases of 8 lanes: 4 consecutive rows from a
//     multiple of 4, chunks 2j and 2j + 1 of each) fall in 8 distinct groups too, and so do 8
//     consecutive rows' stores of one chunk;
//   - the scalar (FMA) policy's loads (rows g and 2t + e of a fragment, one word) are distinct.
// Producer threads own a row each and half its chunks (part p: chunks p and p + 2), so that
// the two threads of a row read neighbouring 16 bytes of global memory in each request: one
// 32-byte sector, not two halves.
//
// Fragments come from ldmatrix.x4 (kernels/dcn_mma.cuh): for 16-bit types the m16n8k16
// layouts, for tf32 the m16n8k8 ones (a lane's two 16-bit elements of a row are one 32-bit
// word), 8 words of k (two chunks) per MMA step; tf32 operands are stored as float32 and
// rounded (cvt.rna) as fragments are loaded.
#pragma once

#include "dcn_common.cuh"
#include "dcn_mma.cuh"
#include "sampling.cuh"

/// The block tile of the column-free kernels.
struct FusedTile {
  static constexpr int kThreads = 128;          // 4 warps
  static constexpr int kWarpsM = 2;             // warps along the A rows (pixels)
  static constexpr int kWarpsN = 2;             // warps along the B rows (output channels)
  static constexpr int kWarpPixels = 32;        // each warp: 2 MMA tiles of 16 rows ...
  static constexpr int kWarpOutChannels = 32;   // ... by 4 of 8 columns
  static constexpr int kPixels = kWarpsM * kWarpPixels;                // 64 (BM)
  static constexpr int kOutChannels = kWarpsN * kWarpOutChannels;      // 64 (BN)
  static constexpr int kRowWords = 16;          // a tile row: 64 bytes of k
  static constexpr int kRowChunks = 4;          // of 16 bytes
  static constexpr int kTileWords = 64 * kRowWords;  // A or B: 64 rows
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

/// 16-bit operands (E: dcn_half or dcn_bfloat16), two values a word,
/// mma.m16n8k16 with float32 accumulation.
template <typename E>
struct FusedHalf {
  typedef E Element;
  static constexpr bool kTensorCores = true;
  static constexpr int kPerWord = 2;  // values per 32-bit word
  __device__ static __forceinline__ unsigned word(float low, float high) {
    return dcn_pack_half2(to_storage<E>(low).bits, to_storage<E>(high).bits);
  }
  __device__ static __forceinline__ void fragment(unsigned (&)[4]) {}  // as stored
  __device__ static __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    fused_mma16(E(), acc, a, b);
  }
};
typedef FusedHalf<dcn_half> FusedF16;
typedef FusedHalf<dcn_bfloat16> FusedBF16;

/// float32 operands, stored as float32 and rounded to tf32 (dcn_to_tf32) as
/// fragments are loaded; mma.m16n8k8 (sm_80 and newer).
struct FusedTF32 {
  typedef float Element;
  static constexpr bool kTensorCores = true;
  static constexpr int kPerWord = 1;
  __device__ static __forceinline__ unsigned word(float v) { return __float_as_uint(v); }
  __device__ static __forceinline__ void fragment(unsigned (&r)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = dcn_to_tf32(__uint_as_float(r[i]));
  }
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

/// Sizes of policy Op's tiles: a slice is kDepth values of k (a row of 64
/// bytes), a chunk kChunkValues of them; a stage is one A and one B tile.
template <typename Op>
struct FusedLayout {
  static constexpr int kDepth = FusedTile::kRowWords * Op::kPerWord;  // 32 or 16
  static constexpr int kChunkValues = kDepth / FusedTile::kRowChunks;   // 8 or 4: 16 bytes
  static constexpr int kStageWords = 2 * FusedTile::kTileWords;
};

/// Where chunk c of tile row `row` lies in its row (the swizzle of the header comment).
__device__ __forceinline__ int fused_chunk(int row, int c) {
  return c ^ ((((row >> 1) & 1) << 1) | ((row >> 2) & 1));
}

/// The first word of chunk c of row `row` of a tile.
__device__ __forceinline__ DCN_SHARED_PTR(unsigned) fused_chunk_at(DCN_SHARED_PTR(unsigned) tile, int row, int c) {
  return tile + row * FusedTile::kRowWords + 4 * fused_chunk(row, c);
}

/// Chunk c of row `row` of a tile = value (one 16-byte store).
__device__ __forceinline__ void fused_store_chunk(DCN_SHARED_PTR(unsigned) tile, int row, int c,
                                                  const DcnChunk& value, DcnCaller = {}) {
  dcn_shared_cast<DcnChunk>(fused_chunk_at(tile, row, c))[0] = value;
}

/// Value v of a chunk of T elements (their bit patterns, in memory order), as a float.
template <typename T>
__device__ __forceinline__ float chunk_value(const DcnChunk& chunk, int v) {
  if constexpr (sizeof(T) == 2) {
    T e;
    e.bits = static_cast<unsigned short>(chunk.w[v / 2] >> (16 * (v % 2)));
    return to_compute(e);
  } else {
    return __uint_as_float(chunk.w[v]);
  }
}

/// A chunk of policy Op's words from kChunkValues values.
template <typename Op>
__device__ __forceinline__ DcnChunk pack_chunk(const float (&values)[FusedLayout<Op>::kChunkValues]) {
  DcnChunk chunk;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (Op::kPerWord == 2)
      chunk.w[w] = Op::word(values[2 * w], values[2 * w + 1]);
    else
      chunk.w[w] = Op::word(values[w]);
  }
  return chunk;
}

/// The 16 bytes of T elements p[0 .. 16/sizeof(T)), those at or past `count`
/// zero, loaded element by element without a branch (a value past `count`
/// is read from p[0], or from `fallback` when count is 0, and dropped): every
/// load issued before the chunk is assembled.
template <typename T>
__device__ __forceinline__ DcnChunk load_chunk(const T* p, int count, const T* fallback, DcnCaller = {}) {
  constexpr int V = 16 / sizeof(T);
  const T* from = count > 0 ? p : fallback;
  T e[V];
#pragma unroll
  for (int v = 0; v < V; ++v) e[v] = dcn_load(from, v < count ? v : 0);
  DcnChunk chunk;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (sizeof(T) == 2)
      chunk.w[w] = dcn_pack_half2(2 * w < count ? e[2 * w].bits : 0, 2 * w + 1 < count ? e[2 * w + 1].bits : 0);
    else
      chunk.w[w] = w < count ? __float_as_uint(e[w]) : 0u;
  }
  return chunk;
}

/// dst (16 bytes of shared memory) = the T elements p[0 .. 16/sizeof(T)), the
/// first `valid` of them (zeros after). kVector: `valid` is all or none and p
/// is 16-byte aligned: one cp.async (complete at the caller's
/// dcn_cp_async_wait). Else element loads and a 16-byte store, complete at
/// once. `fallback`, any aligned address, stands for p when none is valid.
template <bool kVector, typename T>
__device__ __forceinline__ void fill_chunk(DCN_SHARED_PTR(unsigned) dst, const T* p, int valid, const T* fallback,
                                           DcnCaller = {}) {
  if constexpr (kVector)
    dcn_cp_async_16(dst, valid > 0 ? p : fallback, valid > 0);
  else
    dcn_shared_cast<DcnChunk>(dst)[0] = load_chunk(p, valid, fallback);
}

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
struct BilinearTap {
  int pixel[4];     // y*W + x of corner q (order of corner()) in its image (H*W fits an int); -1: outside
  float weight[4];  // bilinear weight of corner q (0 where outside)
  float mask;       // modulation (1 without a mask); 0 where the point does not count
};

/// A tap that samples nothing (rows past the last pixel of a tile).
__device__ __forceinline__ BilinearTap empty_tap() {
  BilinearTap tap;
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
__device__ __forceinline__ BilinearTap bilinear_tap(const ConvShape& s, const T* offset, const T* mask,
                                                    int has_mask, Index n, int g, int k, int l, DcnCaller = {}) {
  BilinearTap tap = empty_tap();
  float y, x, ly, lx;
  int y0, x0;
  sampling_point(s, offset, n, g, k, l, y, x);
  if (!locate(y, x, s.height, s.width, y0, x0, ly, lx)) return tap;
  tap.mask = mask_value(s, mask, has_mask, n, g, k, l);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const Corner<float> c = corner(q, y0, x0, ly, lx, s.height, s.width);
    if (c.valid) {
      tap.pixel[q] = c.y * s.width + c.x;
      tap.weight[q] = c.weight;
    }
  }
  return tap;
}

/// Corner q's pixel, -1 outside the image (selects, not an indexed array:
/// q may be a loop counter without the tap going to local memory).
__device__ __forceinline__ int tap_pixel(const BilinearTap& tap, int q) {
  return q == 0 ? tap.pixel[0] : q == 1 ? tap.pixel[1] : q == 2 ? tap.pixel[2] : tap.pixel[3];
}

/// Corner q's pixel clamped into the image (pixel 0 for a corner outside it,
/// whose weight is 0 and whose value the caller replaces by 0): an address
/// every corner may read, so that all four loads issue before any is used.
__device__ __forceinline__ int tap_corner(const BilinearTap& tap, int q) {
  const int pixel = tap_pixel(tap, q);
  return pixel < 0 ? 0 : pixel;
}

/// acc[mi][ni] += A[rows 16 mi .. 16 mi + 15] x B[rows 8 ni .. 8 ni + 7]^T over
/// one slice, for the calling warp (all 32 lanes, converged). a and b point at
/// the warp's first A row and first B row (a multiple of 8 rows into their
/// tiles). acc[mi][ni] is the 16 x 8 MMA accumulator (dcn_mma_c_coord) for
/// either policy kind: the tensor-core policies load fragments by ldmatrix
/// and run one MMA per 8 words of k, FusedFMA the same products by scalar
/// FMAs in k order.
template <typename Op>
__device__ __forceinline__ void warp_tile_product(float (&acc)[2][4][4], DCN_SHARED_PTR(unsigned) a,
                                                  DCN_SHARED_PTR(unsigned) b, DcnCaller = {}) {
  const int lane = dcn_lane();
  if constexpr (Op::kTensorCores) {
    // The row and chunk whose address this lane gives: A matrices (rows 0-7 | 8-15) x (chunk
    // 0 | 1) of a step are fragment registers 0-3; B matrices (chunk 0 | 1) x (rows 0-7 |
    // 8-15) are registers 0-1 of two 8-row column blocks.
    const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_chunk = lane >> 4;
    const int b_row = (lane & 7) + 8 * (lane >> 4), b_chunk = (lane >> 3) & 1;
#pragma unroll 1
    for (int step = 0; step < FusedTile::kRowChunks / 2; ++step) {
      unsigned fa[2][4], fb[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        dcn_ldmatrix_x4(fa[mi], fused_chunk_at(a, 16 * mi + a_row, 2 * step + a_chunk));
        Op::fragment(fa[mi]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        unsigned r[4];
        dcn_ldmatrix_x4(r, fused_chunk_at(b, 16 * nj + b_row, 2 * step + b_chunk));
        Op::fragment(r);
        fb[2 * nj][0] = r[0];
        fb[2 * nj][1] = r[1];
        fb[2 * nj + 1][0] = r[2];
        fb[2 * nj + 1][1] = r[3];
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
#pragma unroll 2
    for (int k = 0; k < FusedTile::kRowWords; ++k) {
      float av[2][2], bv[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const unsigned w = fused_chunk_at(a, mi * 16 + rows[h], k / 4)[k % 4];
          av[mi][h] = __uint_as_float(w);
        }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const unsigned w = fused_chunk_at(b, ni * 8 + cols[e], k / 4)[k % 4];
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
