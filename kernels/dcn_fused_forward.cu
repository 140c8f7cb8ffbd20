// dcn_fused_forward.cu: the column-free forward (implicit GEMM on tensor cores).
//
//   deform_fused_forward<T, Op, Index>   out = bias + sum over kernel points and input channels
//                                        of weight x (mask x bilinear sample), no column buffer
//
// A block computes a FusedTile (kernels/dcn_fused_sampling.cuh): 64 output pixels (of the
// flattened batch x Ho*Wo of its launch) by 64 output channels of one convolution group. It
// walks the kernel points, the offset groups its convolution group touches and their
// channels in slices of up to 32. For each slice every thread samples its half of one
// pixel's row into the A tile (the tap -- corners, weights, mask -- computed once per kernel
// point and offset group and kept in registers across that pair's slices) and loads its half
// of one output channel's weights into the B tile; after a barrier each warp multiplies its
// 32 x 32 part, accumulating in float32 registers. The A and B tiles are double-buffered,
// so one barrier per slice suffices: a buffer is refilled two slices after it was read,
// with the barrier of the slice between. The epilogue stages the accumulators in shared
// memory, adds the bias and writes each output channel's pixels as consecutive NCHW
// elements, once.
#include "dcn_fused_sampling.cuh"

/// The output tile in shared memory (after the main loop, over the A and B
/// tiles): a row of kPixels floats per output channel, padded by 4 words so
/// that the accumulator stores of a warp fall in distinct banks.
template <typename Op>
struct FusedForwardLayout {
  static constexpr int kOutRowWords = FusedTile::kPixels + 4;
  static constexpr int kOutWords = FusedTile::kOutChannels * kOutRowWords;
  static constexpr int kStagesWords = 2 * FusedLayout<Op>::kStageWords;
  static constexpr int kSharedWords = kStagesWords > kOutWords ? kStagesWords : kOutWords;
};

/// The forward of a chunk of images.
///
/// input:   (batch, H, W, C) channels-last
/// offset:  (batch, 2*G*K, Ho, Wo); mask (batch, G*K, Ho, Wo), read only when has_mask
/// weight:  (groups, K, O/groups, C/groups), prepared from (O, C/groups, kh, kw)
/// bias:    (O,), read only when has_bias
/// out:     (batch, O, Ho, Wo); every element is written
/// Grid: x = ceil(batch*Ho*Wo / 64) pixel tiles, y = groups * ceil((O/groups) / 64)
/// (the output-channel tiles of each group); block FusedTile::kThreads; no dynamic shared memory.
template <typename T, typename Op, typename Index>
__global__ void __launch_bounds__(FusedTile::kThreads)
    deform_fused_forward(const T* __restrict__ input, const T* __restrict__ offset,
                         const T* __restrict__ mask, int has_mask, const T* __restrict__ weight,
                         const T* __restrict__ bias, int has_bias, DCN_SHAPE_PARAMS,
                         int out_channels, T* __restrict__ out) {
  typedef FusedLayout<Op> Layout;
  typedef FusedForwardLayout<Op> OutLayout;
  constexpr int V = FusedVector<T>::value;
  static_assert(FusedTile::kThreads == 2 * FusedTile::kPixels && FusedTile::kPixels == FusedTile::kOutChannels,
                "each pair of threads fills one A row and one B row");
  static_assert(FusedTile::kHalf % V == 0 && Layout::kSliceWords % 8 == 0,
                "a thread's half row is whole vectors; a slice is whole MMA steps");
  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w;
  const int group_channels = s.channels / s.groups, group_out = out_channels / s.groups;
  const int out_tiles = (group_out + FusedTile::kOutChannels - 1) / FusedTile::kOutChannels;
  const int group = blockIdx.y / out_tiles;
  const int first_out = blockIdx.y % out_tiles * FusedTile::kOutChannels;
  const Index pixels = Index(s.batch) * L;
  const Index first_pixel = Index(blockIdx.x) * FusedTile::kPixels;
  const int warp = threadIdx.x / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;
  const bool vector = channel_vectors_fit<V>(s) && aligned_for<V>(input) && aligned_for<V>(weight);

  DCN_SHARED(unsigned, tiles, OutLayout::kSharedWords);

  // Producer role: row `row` of both tiles, half `part` of its channels.
  const int row = threadIdx.x / 2, part = threadIdx.x % 2;
  const Index p = first_pixel + row;
  const bool live = p < pixels;
  const Index n = live ? p / L : Index(0);
  const int l = live ? static_cast<int>(p % L) : 0;
  const T* image = input + n * s.height * s.width * s.channels;
  const bool out_live = first_out + row < group_out;
  const T* weight_rows = weight + (Index(group) * K * group_out + first_out + row) * group_channels -
                         group * group_channels;  // + k*group_out*group_channels + channel

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

  int first_g, last_g;
  offset_groups_of(s, group, first_g, last_g);
  int stage = 0;
  for (int k = 0; k < K; ++k) {
    for (int g = first_g; g <= last_g; ++g) {
      int begin, end;
      shared_channels(s, group, g, begin, end);
      const BilinearTap<Index> tap =
          live ? bilinear_tap(s, offset, mask, has_mask, n, g, k, l) : empty_tap<Index>();
      for (int channel = begin; channel < end; channel += FusedTile::kChannels) {
        const int count = end - channel < FusedTile::kChannels ? end - channel : FusedTile::kChannels;
        DCN_SHARED_PTR(unsigned) a_tile = tiles + stage * Layout::kStageWords;
        DCN_SHARED_PTR(unsigned) b_tile = a_tile + Layout::kATileWords;
        gather_a_row<Op>(a_tile + row * Layout::kRowWords, part, image, s.channels, tap, channel,
                         count, vector);
        load_b_row<Op>(b_tile + row * Layout::kRowWords, part,
                       weight_rows + Index(k) * group_out * group_channels + channel, out_live, count,
                       vector);
        __syncthreads();
        warp_tile_product<Op>(acc, a_tile + warp_m * FusedTile::kWarpPixels * Layout::kRowWords,
                              b_tile + warp_n * FusedTile::kWarpOutChannels * Layout::kRowWords);
        stage ^= 1;
      }
    }
  }

  // Epilogue: every warp has read its last tiles before they become the output tile.
  __syncthreads();
  fused_each_product(acc, warp_m, warp_n, [&](int pixel, int channel, float value) {
    tiles[channel * OutLayout::kOutRowWords + pixel] = __float_as_uint(value);
  });
  __syncthreads();
  for (int e = threadIdx.x; e < FusedTile::kPixels * FusedTile::kOutChannels; e += FusedTile::kThreads) {
    const int o = e / FusedTile::kPixels, r = e % FusedTile::kPixels;
    const Index q = first_pixel + r;
    const int channel = first_out + o;
    if (q >= pixels || channel >= group_out) continue;
    const unsigned w = tiles[o * OutLayout::kOutRowWords + r];
    float value = __uint_as_float(w);
    const int oc = group * group_out + channel;
    if (has_bias) value += to_compute(dcn_load(bias, oc));
    store(out + (q / L * out_channels + oc) * L + q % L, value);
  }
}
