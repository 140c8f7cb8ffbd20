// dcn_layout.cu: layout changes around the sampling kernels.
//
//   to_channels_last<T, Index>            (n, C, H*W) -> (n, H*W, C)
//   from_channels_last<TAcc, T, Index>    (n, H*W, C) accumulator -> (n, C, H*W) in T
//
// The sampling kernels read and scatter channels-last so that a warp touches
// consecutive channels of one pixel; these two passes cost one read and one
// write of the input each, against kh*kw times that for the columns.
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
