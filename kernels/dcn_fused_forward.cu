// dcn_fused_forward.cu: the column-free forward (implicit GEMM on tensor cores).
//
//   deform_fused_forward<T, Op, Index>   out = bias + sum over kernel points and input channels
//                                        of weight x (mask x bilinear sample), no column buffer
//
// A block computes a FusedTile (kernels/dcn_fused_sampling.cuh): 64 output pixels (of the
// flattened batch x Ho*Wo of its launch) by 64 output channels of one convolution group. It
// walks the kernel points, the offset groups its convolution group touches and their
// channels in slices of FusedLayout<Op>::kDepth (32 in 16-bit types, 16 in 32-bit ones). Each
// thread owns one A row (a pixel) and one B row (an output channel), and half of each row's
// chunks. Per slice, pipelined by one:
//   1. issue: the raw input values of the slice's chunks at the four corners of the pixel's
//      tap (computed once per kernel point and offset group; a corner outside the image
//      reads nothing and lands as zeros) go to the thread's own part of a staging area, and
//      the weights of its B chunks straight into the B tile of the next stage, by cp.async
//      (16-byte chunks; sm_80 and newer -- a plain copy before) when the channels fit
//      16-byte vectors and the arrays are aligned, else element by element;
//   2. blend: once its copies have landed (cp.async.wait_group; the staging area is the
//      thread's own, so no barrier), each thread forms weight x corner, summed over the
//      corners in order, times the mask, and stores its A chunks (16-byte stores);
//   3. after the barrier the next slice is issued, and the warps multiply this one (each a
//      32 x 32 part, ldmatrix fragments, float32 accumulators) while those copies fly.
// The A and B tiles are double-buffered, so one barrier per slice suffices: a stage is
// refilled one slice after it was read, past the barrier between. The epilogue stages the
// accumulators in shared memory, adds the bias and writes each output channel's pixels as
// consecutive NCHW elements, once.
#include "dcn_fused_sampling.cuh"

/// Shared memory of the forward: two stages (A and B tiles) and the staging
/// area of the raw corner values (4 corners x 2 chunks x 128 threads x 16
/// bytes, a thread's chunks 16 bytes apart from its neighbours', so that a
/// quarter-warp's accesses fill 128 contiguous bytes); after the main loop,
/// over them, the output tile: a row of kPixels floats per output channel,
/// padded by 4 words so that the accumulator stores of a warp fall in
/// distinct banks.
template <typename Op>
struct FusedForwardLayout {
  static constexpr int kStagesWords = 2 * FusedLayout<Op>::kStageWords;
  static constexpr int kRawWords = 4 * 2 * FusedTile::kThreads * 4;
  static constexpr int kOutRowWords = FusedTile::kPixels + 4;
  static constexpr int kOutWords = FusedTile::kOutChannels * kOutRowWords;
  static constexpr int kMainWords = kStagesWords + kRawWords;
  static constexpr int kSharedWords = kMainWords > kOutWords ? kMainWords : kOutWords;
};

/// The main loop of deform_fused_forward: acc += this block's products over
/// every slice. kVector: the channels fit 16-byte chunks and input and
/// weight are aligned (chosen once per launch), so chunks move by cp.async.
template <bool kVector, typename T, typename Op, typename Index>
__device__ __forceinline__ void fused_forward_main(DCN_SHARED_PTR(unsigned) tiles, const T* __restrict__ input,
                                                   const T* __restrict__ offset, const T* __restrict__ mask,
                                                   int has_mask, const T* __restrict__ weight, const ConvShape& s,
                                                   int out_channels, float (&acc)[2][4][4]) {
  typedef FusedLayout<Op> Layout;
  constexpr int V = Layout::kChunkValues, DEPTH = Layout::kDepth, THREADS = FusedTile::kThreads;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w;
  const int group_channels = s.channels / s.groups, group_out = out_channels / s.groups;
  const int out_tiles = (group_out + FusedTile::kOutChannels - 1) / FusedTile::kOutChannels;
  const int group = blockIdx.y / out_tiles;
  const int first_out = blockIdx.y % out_tiles * FusedTile::kOutChannels;
  const int pixels = s.batch * L;  // the launcher keeps pixel counts below 2^31
  const int first_pixel = blockIdx.x * FusedTile::kPixels;
  const int t = threadIdx.x, warp = t / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;

  // Producer role: row `row` of both tiles, chunks part and part + 2 of it.
  const int row = t / 2, part = t % 2;
  const int p = first_pixel + row;
  const bool live = p < pixels;
  const int n = live ? p / L : 0, l = live ? p % L : 0;
  const T* image = input + Index(n) * s.height * s.width * s.channels;
  const bool out_live = first_out + row < group_out;
  // + k*group_out*group_channels + channel: that output channel's weights of a slice
  const T* weight_row = weight + (Index(group) * K * group_out + (out_live ? first_out + row : 0)) * group_channels -
                        group * group_channels;
  DCN_SHARED_PTR(unsigned) raw = tiles + 2 * Layout::kStageWords;

  // The slice being issued: kernel point k, offset group g, channels [channel, channel + count).
  int first_g, last_g;
  offset_groups_of(s, group, first_g, last_g);
  int k = 0, g = first_g, channel, end;
  shared_channels(s, group, g, channel, end);
  BilinearTap tap = live ? bilinear_tap(s, offset, mask, has_mask, n, g, k, l) : empty_tap();

  auto issue = [&](DCN_SHARED_PTR(unsigned) b_tile) {
    const int count = end - channel < DEPTH ? end - channel : DEPTH;
    // (The element-wise path loads one chunk at one corner at a time: registers.)
#pragma unroll(kVector ? 2 : 1)
    for (int j = 0; j < 2; ++j) {
      const int c = part + 2 * j, first = c * V;
      const int valid = count - first >= V ? V : (count - first > 0 ? count - first : 0);
      const T* at = image + channel + first;
#pragma unroll(kVector ? 4 : 1)
      for (int q = 0; q < 4; ++q)
        fill_chunk<kVector>(raw + ((q * 2 + j) * THREADS + t) * 4, at + Index(tap_corner(tap, q)) * s.channels,
                            tap_pixel(tap, q) < 0 ? 0 : valid, image);
      fill_chunk<kVector>(fused_chunk_at(b_tile, row, c),
                          weight_row + Index(k) * group_out * group_channels + channel + first, out_live ? valid : 0,
                          weight);
    }
    if constexpr (kVector) dcn_cp_async_commit();
  };

  int stage = 0;
  issue(tiles + FusedTile::kTileWords);
  for (;;) {
    DCN_SHARED_PTR(unsigned) a_tile = tiles + stage * Layout::kStageWords;
    DCN_SHARED_PTR(unsigned) b_tile = a_tile + FusedTile::kTileWords;
    // Blend: this thread's A chunks from its own staged corners.
    if constexpr (kVector) dcn_cp_async_wait<0>();
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      DcnChunk corners[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) corners[q] = dcn_shared_cast<DcnChunk>(raw + ((q * 2 + j) * THREADS + t) * 4)[0];
      float values[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float sum = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) sum += tap.weight[q] * chunk_value<T>(corners[q], v);
        values[v] = sum * tap.mask;
      }
      fused_store_chunk(a_tile, row, part + 2 * j, pack_chunk<Op>(values));
    }
    __syncthreads();

    // The next slice: its copies fly while the warps multiply this one.
    channel += DEPTH;
    bool more = true;
    if (channel >= end) {
      if (++g > last_g) {
        g = first_g;
        more = ++k < K;
      }
      if (more) {
        shared_channels(s, group, g, channel, end);
        tap = live ? bilinear_tap(s, offset, mask, has_mask, n, g, k, l) : empty_tap();
      }
    }
    if (more) issue(tiles + (stage ^ 1) * Layout::kStageWords + FusedTile::kTileWords);
    warp_tile_product<Op>(acc, a_tile + warp_m * FusedTile::kWarpPixels * FusedTile::kRowWords,
                          b_tile + warp_n * FusedTile::kWarpOutChannels * FusedTile::kRowWords);
    if (!more) break;
    stage ^= 1;
  }
}

/// The forward of a chunk of images.
///
/// input:   (batch, H, W, C) channels-last
/// offset:  (batch, 2*G*K, Ho, Wo); mask (batch, G*K, Ho, Wo), read only when has_mask
/// weight:  (groups, K, O/groups, C/groups), prepared from (O, C/groups, kh, kw)
/// bias:    (O,), read only when has_bias
/// out:     (batch, O, Ho, Wo); every element is written
/// Grid: x = ceil(batch*Ho*Wo / 64) pixel tiles, y = groups * ceil((O/groups) / 64)
/// (the output-channel tiles of each group); block FusedTile::kThreads; no dynamic shared memory.
/// batch*Ho*Wo < 2^31 (pixels are counted in int; Index is for element offsets).
/// (Launch bounds: 4 blocks an SM, at most 128 registers a thread.)
template <typename T, typename Op, typename Index>
__global__ void __launch_bounds__(FusedTile::kThreads, 4)
    deform_fused_forward(const T* __restrict__ input, const T* __restrict__ offset,
                         const T* __restrict__ mask, int has_mask, const T* __restrict__ weight,
                         const T* __restrict__ bias, int has_bias, DCN_SHAPE_PARAMS,
                         int out_channels, T* __restrict__ out) {
  typedef FusedForwardLayout<Op> OutLayout;
  constexpr int V = FusedLayout<Op>::kChunkValues;
  static_assert(FusedTile::kThreads == 2 * FusedTile::kPixels && FusedTile::kPixels == FusedTile::kOutChannels,
                "each pair of threads fills one A row and one B row");
  static_assert(V * sizeof(T) == 16, "a chunk is 16 bytes of the input type");
  const ConvShape s = DCN_SHAPE;
  const int L = s.out_h * s.out_w, group_out = out_channels / s.groups;
  const int out_tiles = (group_out + FusedTile::kOutChannels - 1) / FusedTile::kOutChannels;
  const int group = blockIdx.y / out_tiles;
  const int first_out = blockIdx.y % out_tiles * FusedTile::kOutChannels;
  const int pixels = s.batch * L;
  const int first_pixel = blockIdx.x * FusedTile::kPixels;
  const int warp = threadIdx.x / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;

  DCN_SHARED(unsigned, tiles, OutLayout::kSharedWords);
  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;
  if (channel_vectors_fit<V>(s) && aligned_for<V>(input) && aligned_for<V>(weight))
    fused_forward_main<true, T, Op, Index>(tiles, input, offset, mask, has_mask, weight, s, out_channels, acc);
  else
    fused_forward_main<false, T, Op, Index>(tiles, input, offset, mask, has_mask, weight, s, out_channels, acc);

  // Epilogue: every warp has read its last tiles before they become the output tile.
  __syncthreads();
  fused_each_product(acc, warp_m, warp_n, [&](int pixel, int channel, float value) {
    tiles[channel * OutLayout::kOutRowWords + pixel] = __float_as_uint(value);
  });
  __syncthreads();
  for (int e = threadIdx.x; e < FusedTile::kPixels * FusedTile::kOutChannels; e += FusedTile::kThreads) {
    const int o = e / FusedTile::kPixels, r = e % FusedTile::kPixels;
    const int q = first_pixel + r;
    const int channel = first_out + o;
    if (q >= pixels || channel >= group_out) continue;
    const unsigned w = tiles[o * OutLayout::kOutRowWords + r];
    float value = __uint_as_float(w);
    const int oc = group * group_out + channel;
    if (has_bias) value += to_compute(dcn_load(bias, oc));
    store(out + (Index(q / L) * out_channels + oc) * L + q % L, value);
  }
}
