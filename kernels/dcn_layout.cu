// dcn_layout.cu: layout changes around the sampling kernels.
//
//   layout_value<TOut>(v)                 a source element as the destination stores it
//   transpose_tiles<TTile, TOut, Index>   batched (rows, cols) -> (cols, rows) through shared-memory tiles
//   to_channels_last<T, Index>            (n, C, H*W) -> (n, H*W, C)
//   from_channels_last<TAcc, T, Index>    (n, H*W, C) accumulator -> (n, C, H*W) in T
//   layout_copies<TSrc, TDst, Index>      up to three strided copies and a zero fill, one launch
//
// The sampling kernels read and scatter channels-last so that a warp touches
// consecutive channels of one pixel; these two passes cost one read and one
// write of the input each, against kh*kw times that for the columns. A
// transpose read or written element by element in the order of the other
// side touches a sector per lane on one side; here a 32 x 32 tile passes
// through shared memory, so that a warp reads a tile row along the source's
// contiguous axis and writes one along the destination's.
#include "dcn_common.cuh"

/// Rows and columns of a tile.
constexpr int kLayoutTile = 32;

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

/// dst[b][j][i] = layout_value<TOut>(src[b][i][j]) for b < batch, i < rows, j < cols:
/// tile by tile, each block a tile at a time (grid stride), each warp a row
/// of it at a time; the tile holds the source's type. A single row or
/// column is copied element by element instead (it is its own transpose).
/// Needs 1-D blocks of whole warps; any grid.
template <typename TTile, typename TOut, typename Index>
__device__ __forceinline__ void transpose_tiles(const TTile* __restrict__ src, Index batch, int rows, int cols,
                                                TOut* __restrict__ dst) {
  const Index matrix = Index(rows) * cols;
  if (rows == 1 || cols == 1) {
    DCN_GRID_STRIDE_LOOP(i, batch * matrix) dcn_store(dst, i, layout_value<TOut>(dcn_load(src, i)));
    return;
  }
  constexpr int kRow = LayoutTileRow<TTile>::value;
  DCN_SHARED(TTile, tile, kLayoutTile * kRow);
  const int lane = dcn_lane();
  const int warp = static_cast<int>(threadIdx.x) / 32, warps = static_cast<int>(blockDim.x) / 32;
  const int row_tiles = (rows + kLayoutTile - 1) / kLayoutTile;
  const int col_tiles = (cols + kLayoutTile - 1) / kLayoutTile;
  const Index tiles = batch * row_tiles * col_tiles;
  // The same count of steps for every thread of a block: the barriers below are reached by all.
  for (Index t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int col0 = static_cast<int>(t % col_tiles) * kLayoutTile;
    const int row0 = static_cast<int>(t / col_tiles % row_tiles) * kLayoutTile;
    const Index b = t / col_tiles / row_tiles;
    // Lane j reads element j of a tile row: consecutive in the source.
    for (int r = warp; r < kLayoutTile; r += warps)
      if (row0 + r < rows && col0 + lane < cols)
        tile[r * kRow + lane] = dcn_load(src, b * matrix + Index(row0 + r) * cols + col0 + lane);
    __syncthreads();
    // Lane i writes element i of a tile column, a row of the destination:
    // consecutive there.
    for (int c = warp; c < kLayoutTile; c += warps)
      if (col0 + c < cols && row0 + lane < rows) {
        const TTile value = tile[lane * kRow + c];
        dcn_store(dst, b * matrix + Index(col0 + c) * rows + row0 + lane, layout_value<TOut>(value));
      }
    __syncthreads();  // the tile is read before the next one overwrites it
  }
}

/// dst (n, pixels, channels) = src (n, channels, pixels) transposed; total = n*C*pixels.
template <typename T, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS)
    to_channels_last(const T* __restrict__ src, Index total, int channels, int pixels, T* __restrict__ dst) {
  transpose_tiles(src, total / (Index(channels) * pixels), channels, pixels, dst);
}

/// dst (n, channels, pixels) = src (n, pixels, channels) transposed and
/// rounded to T; total = n*C*pixels.
template <typename TAcc, typename T, typename Index>
__global__ void __launch_bounds__(DCN_BLOCK_THREADS)
    from_channels_last(const TAcc* __restrict__ src, Index total, int channels, int pixels, T* __restrict__ dst) {
  transpose_tiles(src, total / (Index(channels) * pixels), pixels, channels, dst);
}

/// dst[i] = src viewed through (sizes, strides), converted to TDst: dst is
/// contiguous with shape (*, size1, size2, size3), and its element (a, b, c, d)
/// is src[a*stride0 + b*stride1 + c*stride2 + d*stride3].
template <typename TSrc, typename TDst, typename Index>
__device__ __forceinline__ void copy_through_view(const TSrc* src, TDst* dst, Index i, int size1, int size2,
                                                  int size3, Index stride0, Index stride1, Index stride2,
                                                  Index stride3) {
  Index rest = i;
  const Index d = rest % size3;
  rest /= size3;
  const Index c = rest % size2;
  rest /= size2;
  const Index b = rest % size1;
  const Index a = rest / size1;
  store(dst + i, to_compute(dcn_load(src, a * stride0 + b * stride1 + c * stride2 + d * stride3)));
}

// The view of copy j: its element count, then sizes 1-3 and strides 0-3.
#define DCN_VIEW_PARAMS(j)                                                          \
  Index total##j, int size##j##_1, int size##j##_2, int size##j##_3, Index stride##j##_0, \
      Index stride##j##_1, Index stride##j##_2, Index stride##j##_3
#define DCN_VIEW_ARGS(j) \
  size##j##_1, size##j##_2, size##j##_3, stride##j##_0, stride##j##_1, stride##j##_2, stride##j##_3

/// Three copies dst_j = src_j through its view (see copy_through_view; a
/// copy with total 0 is skipped, its pointers unread), then zero_words
/// 32-bit words of `zero` set to 0 (an accumulator of any float type):
/// one grid-stride loop over the concatenation.
template <typename TSrc, typename TDst, typename Index>
__global__ void layout_copies(const TSrc* __restrict__ src0, TDst* __restrict__ dst0,
                              const TSrc* __restrict__ src1, TDst* __restrict__ dst1,
                              const TSrc* __restrict__ src2, TDst* __restrict__ dst2,
                              unsigned int* __restrict__ zero, DCN_VIEW_PARAMS(0), DCN_VIEW_PARAMS(1),
                              DCN_VIEW_PARAMS(2), Index zero_words) {
  const Index end0 = total0;
  const Index end1 = end0 + total1;
  const Index end2 = end1 + total2;
  DCN_GRID_STRIDE_LOOP(index, end2 + zero_words) {
    if (index < end0) {
      copy_through_view(src0, dst0, index, DCN_VIEW_ARGS(0));
    } else if (index < end1) {
      copy_through_view(src1, dst1, index - end0, DCN_VIEW_ARGS(1));
    } else if (index < end2) {
      copy_through_view(src2, dst2, index - end1, DCN_VIEW_ARGS(2));
    } else {
      dcn_store(zero, index - end2, 0u);
    }
  }
}
