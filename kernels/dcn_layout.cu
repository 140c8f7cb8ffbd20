// dcn_layout.cu: layout changes around the sampling kernels.
//
//   to_channels_last<T, Index>            (n, C, H*W) -> (n, H*W, C)
//   from_channels_last<TAcc, T, Index>    (n, H*W, C) accumulator -> (n, C, H*W) in T
//   layout_copies<TSrc, TDst, Index>      up to three strided copies and a zero fill, one launch
//
// The sampling kernels read and scatter channels-last so that a warp touches
// consecutive channels of one pixel; these passes cost one read and one
// write of the input each, against kh*kw times that for the columns.
// layout_copies does a call's small layout passes together (the input
// channels-last, the weight as a GEMM operand, the bias broadcast into the
// output, grad_output as GEMM rows, zeroing an accumulator; the gradients
// back into their layouts): each separate launch would cost the host as
// much as the whole pass costs the GPU at small sizes.
#include "dcn_common.cuh"

/// dst (n, pixels, channels) = src (n, channels, pixels) transposed; total = n*C*pixels.
template <typename T, typename Index>
__global__ void to_channels_last(const T* __restrict__ src, Index total, int channels,
                                 int pixels, T* __restrict__ dst) {
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index rest = index;
    const int c = static_cast<int>(rest % channels);
    rest /= channels;
    const int p = static_cast<int>(rest % pixels);
    const Index n = rest / pixels;
    dcn_store(dst, index, dcn_load(src, (n * channels + c) * pixels + p));
  }
}

/// dst (n, channels, pixels) = src (n, pixels, channels) transposed and
/// rounded to T; total = n*C*pixels.
template <typename TAcc, typename T, typename Index>
__global__ void from_channels_last(const TAcc* __restrict__ src, Index total, int channels,
                                   int pixels, T* __restrict__ dst) {
  DCN_GRID_STRIDE_LOOP(index, total) {
    Index rest = index;
    const int p = static_cast<int>(rest % pixels);
    rest /= pixels;
    const int c = static_cast<int>(rest % channels);
    const Index n = rest / channels;
    store(dst + index, dcn_load(src, (n * pixels + p) * channels + c));
  }
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
