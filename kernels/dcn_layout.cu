// dcn_layout.cu: layout changes around the sampling kernels.
//
//   layout_value<TOut>(v)                 a source element as the destination stores it
//   LayoutCopy<Index>                     one copy: a destination of four axes, read through source strides
//   copy_tile, copy_chunk, copy_unit      one unit of a copy: a 32 x 32 tile through shared memory, or
//                                         1024 destination elements in order
//   to_channels_last<T, Index>            (n, C, H*W) -> (n, H*W, C)
//   from_channels_last<TAcc, T, Index>    (n, H*W, C) accumulator -> (n, C, H*W) in T
//   layout_copies<TSrc, TDst, Index>      up to three copies and a zero fill in one launch
//
// The sampling kernels read and scatter channels-last so that a warp touches
// consecutive channels of one pixel; these passes cost one read and one
// write of the input each, against kh*kw times that for the columns. A
// transpose read or written element by element in the order of the other
// side touches a sector per lane on one side; here a 32 x 32 tile passes
// through shared memory, so that a warp reads a tile row along the source's
// contiguous axis and writes one along the destination's.
//
// layout_copies does a call's small layout passes together (the input
// channels-last, the weight as a GEMM operand, the bias broadcast into the
// output, grad_output as GEMM rows, zeroing an accumulator; the gradients
// back into their layouts): each separate launch would cost the host as
// much as the whole pass costs the GPU at small sizes. Each copy goes its
// own way within the launch -- through tiles where it transposes, in
// destination order where it does not (a plain copy, a conversion, a
// broadcast) -- and the launch's blocks share out the units of all of them.
#include "dcn_common.cuh"

/// Rows and columns of a tile.
constexpr int kLayoutTile = 32;
/// Destination elements of one unit of a copy that needs no tile.
constexpr int kLayoutChunk = kLayoutTile * kLayoutTile;

/// Elements of a tile row in shared memory: 32 and enough to make the row an
/// odd number of 4-byte words (33 of 4 or 8 bytes, 34 of 2), so that the 32
/// elements of a tile column fall in 32 different banks (for 8 bytes, 16
/// lanes of a half-warp in 32).
template <typename TTile>
struct LayoutTileRow {
  static constexpr int value = kLayoutTile + (sizeof(TTile) == 2 ? 2 : 1);
};

template <typename A, typename B>
struct LayoutSame {
  static constexpr bool value = false;
};
template <typename A>
struct LayoutSame<A, A> {
  static constexpr bool value = true;
};

/// A source element as the destination stores it: its bits when the types
/// agree, else rounded from the compute type to TOut.
template <typename TOut, typename TTile>
__device__ __forceinline__ TOut layout_value(const TTile& value) {
  if constexpr (LayoutSame<TTile, TOut>::value) {
    return value;
  } else {
    return to_storage<TOut>(value);
  }
}

/// One copy. The destination element at position (a, b, c, d) -- an address
/// a*to_a + b*to_b + c*to_c + d: d is the destination's contiguous axis -- is
/// the source element a*from_a + b*from_b + c*from_c + d*from_d. The launcher
/// (launchers.arrangement) orders the axes for the walk:
/// - tiled: c is the source's contiguous axis (from_c = 1); a tile takes 32
///   consecutive (b, c) positions -- consecutive in the source too where
///   from_b = size_c -- by 32 consecutive d. A unit is a tile.
/// - not tiled: (a, b, c, d) is the destination's own order (to_* its
///   strides), walked in order; a unit is kLayoutChunk elements.
/// A copy of nothing has size_a = 0.
template <typename Index>
struct LayoutCopy {
  int tiled;
  int size_a, size_b, size_c, size_d;
  Index from_a, from_b, from_c, from_d;
  Index to_a, to_b, to_c;

  /// Positions (b, c) of a tile row.
  __device__ __forceinline__ Index run() const { return Index(size_b) * size_c; }
  __device__ __forceinline__ Index run_tiles() const { return (run() + kLayoutTile - 1) / kLayoutTile; }
  __device__ __forceinline__ int d_tiles() const { return (size_d + kLayoutTile - 1) / kLayoutTile; }
  __device__ __forceinline__ Index size() const { return Index(size_a) * run() * size_d; }
  __device__ __forceinline__ Index units() const {
    return tiled ? Index(size_a) * run_tiles() * d_tiles() : (size() + kLayoutChunk - 1) / kLayoutChunk;
  }
};

/// Tile `unit` of a tiled copy, through a shared tile of the source's type.
/// All threads of the block call it (two barriers); 1-D blocks of whole warps.
template <typename TTile, typename TOut, typename Index>
__device__ __forceinline__ void copy_tile(const LayoutCopy<Index>& copy, const TTile* __restrict__ src,
                                          TOut* __restrict__ dst, Index unit) {
  constexpr int kRow = LayoutTileRow<TTile>::value;
  DCN_SHARED(TTile, tile, kLayoutTile * kRow);
  const int lane = dcn_lane();
  const int warp = static_cast<int>(threadIdx.x) / 32, warps = static_cast<int>(blockDim.x) / 32;
  const Index run = copy.run(), run_tiles = copy.run_tiles();
  const Index first = unit % run_tiles * kLayoutTile;  // the tile's first (b, c) position
  const Index rest = unit / run_tiles;
  const int d0 = static_cast<int>(rest % copy.d_tiles()) * kLayoutTile;
  const Index a = rest / copy.d_tiles();
  // (b0, c0) of the first position; that of first + j is j further along c,
  // carried into b in 32-bit arithmetic (the one wide division is per tile).
  const Index b0 = first / copy.size_c;
  const int c0 = static_cast<int>(first - b0 * copy.size_c);
  // Lane j reads position first + j of each tile row: consecutive in the source.
  const int mine = c0 + lane, mine_carry = mine / copy.size_c;
  const Index source =
      a * copy.from_a + (b0 + mine_carry) * copy.from_b + Index(mine - mine_carry * copy.size_c) * copy.from_c;
  for (int r = warp; r < kLayoutTile; r += warps)
    if (first + lane < run && d0 + r < copy.size_d)
      tile[r * kRow + lane] = dcn_load(src, source + Index(d0 + r) * copy.from_d);
  __syncthreads();
  // Lane i writes element d0 + i of a tile column: consecutive in the destination.
  for (int c = warp; c < kLayoutTile; c += warps) {
    if (first + c < run && d0 + lane < copy.size_d) {
      const TTile value = tile[lane * kRow + c];
      const int position = c0 + c, carry = position / copy.size_c;
      const Index target =
          a * copy.to_a + (b0 + carry) * copy.to_b + Index(position - carry * copy.size_c) * copy.to_c;
      dcn_store(dst, target + d0 + lane, layout_value<TOut>(value));
    }
  }
  __syncthreads();  // the tile is read before the next unit overwrites it
}

/// Chunk `unit` of a copy walked in destination order: thread t copies
/// elements t, t + blockDim.x, ... of the chunk, so a warp writes
/// consecutive elements (and reads them through the source strides).
template <typename TSrc, typename TDst, typename Index>
__device__ __forceinline__ void copy_chunk(const LayoutCopy<Index>& copy, const TSrc* __restrict__ src,
                                           TDst* __restrict__ dst, Index unit) {
  const Index start = unit * kLayoutChunk;
  const int count = copy.size() - start < kLayoutChunk ? static_cast<int>(copy.size() - start) : kLayoutChunk;
  // The chunk's first position, by wide divisions once; a thread's elements
  // are carried on from it in 32-bit arithmetic (each axis's size plus the
  // chunk fits: launchers.copy_plan).
  const Index ab = start / copy.size_d / copy.size_c;
  const Index a0 = ab / copy.size_b;
  const int b0 = static_cast<int>(ab - a0 * copy.size_b);
  const int c0 = static_cast<int>(start / copy.size_d - ab * copy.size_c);
  const int d0 = static_cast<int>(start % copy.size_d);
  for (int k = threadIdx.x; k < count; k += blockDim.x, dcn_reconverge()) {
    int d = d0 + k;
    int c = c0 + d / copy.size_d;
    d %= copy.size_d;
    int b = b0 + c / copy.size_c;
    c %= copy.size_c;
    const Index a = a0 + b / copy.size_b;
    b %= copy.size_b;
    const TSrc value = dcn_load(src, a * copy.from_a + b * copy.from_b + c * copy.from_c + d * copy.from_d);
    dcn_store(dst, a * copy.to_a + b * copy.to_b + c * copy.to_c + d, layout_value<TDst>(value));
  }
}

/// Unit `unit` of a copy, its way (block-uniform: every thread of the block
/// calls it with the same unit).
template <typename TSrc, typename TDst, typename Index>
__device__ __forceinline__ void copy_unit(const LayoutCopy<Index>& copy, const TSrc* __restrict__ src,
                                          TDst* __restrict__ dst, Index unit, DcnCaller = {}) {
  if (copy.tiled) {
    copy_tile(copy, src, dst, unit);
  } else {
    copy_chunk(copy, src, dst, unit);
  }
}

/// A batched transpose dst[i][col][row] = src[i][row][col] (i < batch), as a
/// copy: tiled unless a row or column is single (then it is a plain copy).
template <typename Index>
__device__ __forceinline__ LayoutCopy<Index> transpose_copy(Index total, int rows, int cols) {
  const Index matrix = Index(rows) * cols;
  const int batch = static_cast<int>(total / matrix);
  return LayoutCopy<Index>{rows > 1 && cols > 1, 1, batch, cols, rows, 0, matrix, 1, cols, 0, matrix, rows};
}

/// dst (n, pixels, channels) = src (n, channels, pixels) transposed; total = n*C*pixels.
template <typename T, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS)
    to_channels_last(const T* __restrict__ src, Index total, int channels, int pixels, T* __restrict__ dst) {
  const LayoutCopy<Index> copy = transpose_copy(total, channels, pixels);
  const Index units = copy.units();
  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) copy_unit(copy, src, dst, unit);
}

/// dst (n, channels, pixels) = src (n, pixels, channels) transposed and
/// rounded to T; total = n*C*pixels.
template <typename TAcc, typename T, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS)
    from_channels_last(const TAcc* __restrict__ src, Index total, int channels, int pixels, T* __restrict__ dst) {
  const LayoutCopy<Index> copy = transpose_copy(total, pixels, channels);
  const Index units = copy.units();
  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) copy_unit(copy, src, dst, unit);
}

// Copy j's arguments: whether it is tiled, its sizes and its strides (LayoutCopy's fields).
#define DCN_COPY_PARAMS(j)                                                                              \
  int tiled##j, int size##j##_a, int size##j##_b, int size##j##_c, int size##j##_d, Index from##j##_a, \
      Index from##j##_b, Index from##j##_c, Index from##j##_d, Index to##j##_a, Index to##j##_b, Index to##j##_c
#define DCN_COPY(j)                                                                                              \
  LayoutCopy<Index> {                                                                                          \
    tiled##j, size##j##_a, size##j##_b, size##j##_c, size##j##_d, from##j##_a, from##j##_b, from##j##_c,       \
        from##j##_d, to##j##_a, to##j##_b, to##j##_c                                                           \
  }

/// Three copies dst_j = src_j (see LayoutCopy; a copy of nothing is skipped,
/// its pointers unread), then zero_words 32-bit words of `zero` set to 0 (an
/// accumulator of any float type). The units of all of them, in that order,
/// are shared out over the grid: a block takes one unit at a time, its
/// threads together (the tiles' barriers are reached by all).
template <typename TSrc, typename TDst, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS)
    layout_copies(const TSrc* __restrict__ src0, TDst* __restrict__ dst0, const TSrc* __restrict__ src1,
                  TDst* __restrict__ dst1, const TSrc* __restrict__ src2, TDst* __restrict__ dst2,
                  unsigned int* __restrict__ zero, DCN_COPY_PARAMS(0), DCN_COPY_PARAMS(1), DCN_COPY_PARAMS(2),
                  Index zero_words) {
  const LayoutCopy<Index> copy0 = DCN_COPY(0), copy1 = DCN_COPY(1), copy2 = DCN_COPY(2);
  const Index end0 = copy0.units();
  const Index end1 = end0 + copy1.units();
  const Index end2 = end1 + copy2.units();
  const Index units = end2 + (zero_words + kLayoutChunk - 1) / kLayoutChunk;
  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) {
    if (unit < end0) {
      copy_unit(copy0, src0, dst0, unit);
    } else if (unit < end1) {
      copy_unit(copy1, src1, dst1, unit - end0);
    } else if (unit < end2) {
      copy_unit(copy2, src2, dst2, unit - end1);
    } else {
      const Index start = (unit - end2) * kLayoutChunk;
      const Index end = start + kLayoutChunk < zero_words ? start + kLayoutChunk : zero_words;
      for (Index i = start + Index(threadIdx.x); i < end; i += Index(blockDim.x), dcn_reconverge())
        dcn_store(zero, i, 0u);
    }
  }
}
