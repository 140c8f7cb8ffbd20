// dcn_fused_backward.cu: the column-free backward (implicit GEMMs on tensor cores).
//
//   fused_backward_data<T, Op, Index>     offset, mask and input gradients; the column gradients
//                                         (grad_output x W^T) exist only in shared memory
//   fused_backward_weight<T, Op, Index>   weight gradient (or one pixel split's part of it): an
//                                         implicit GEMM that samples the input on the fly
//   fused_weight_split_sum<T, Index>      weight gradient = the splits' parts added in split order
//
// Both multiply with the machinery of kernels/dcn_fused_sampling.cuh: blocks of
// FusedTile::kThreads (4 warps, each 32 x 32 of a 64 x 64 tile), A and B tiles of 32-bit
// words with k contiguous in the operand policy Op (FusedF16, FusedBF16, FusedTF32 on tensor
// cores, FusedFMA in float32) and warp_tile_product. Blocks stride over
// work units (any grid gives the same results, atomics aside).
//
// Notation: P = batch * L output pixels (p = n*L + l), Cg = C/groups channels and Og =
// O/groups output channels of a convolution group, Cog = C/G channels of an offset group.
// A slice is a run of channels inside one convolution group and one offset group, so that
// one sampling point per pixel and one group of output channels serve all of it.
//
// fused_backward_data: a unit is (64 output pixels, kernel point k, offset group g). For
// each slice of g's channels (up to 64):
//   1. the column gradients dCol[pixel][c] = sum_o grad_output[pixel][o] * W[o][c][k]: per
//      chunk of 32 output channels, the A tile holds grad_output (a row per pixel, read
//      along pixels as NCHW stores it) and the B tile the weights (a row per channel of the
//      slice, from the weight matrix (groups, K*Cg, Og)); the warps accumulate in float32
//      registers, then store dCol as float32 over the tiles;
//   2. two threads per pixel walk the slice's channels (one the even, one the odd ones),
//      reading the input (NCHW) at the point's four corners: the products dCol * pixel
//      feed the offset and mask sums (registers, kept across slices), and
//      weight * mask * dCol is added to the input gradient with float32 atomics. A warp's
//      lanes are 32 neighbouring pixels of one channel, so their reads and atomics land on
//      neighbouring input pixels.
// After the last slice the pixel's two threads add their sums in a fixed order: the
// offset and mask gradients never depend on the grid or on timing. As in
// deform_col2im_coord, a point on row or column -1 counts for the slopes (locate's
// for_slope); its corner weights, and so its input gradient, are 0.
//
// fused_backward_weight: a unit is (convolution group, slice of up to 64 channels, kernel
// point, 64 output channels, pixel split). For each run of 32 pixels of its split, 32
// threads find the pixels' bilinear taps (bilinear_tap: deform_im2col's value semantics),
// then all sample the slice's columns into the B tile (a row per channel, k = pixels) and
// stage grad_output into the A tile (a row per output channel, k = pixels, read along
// pixels), and the warps accumulate dW[o][c] = sum_pixel grad_output[pixel][o] *
// columns[pixel][c]. One block sums a split's pixels in order: with one split the result
// is rounded into the weight gradient at once, else each split writes its float32 part and
// fused_weight_split_sum adds the parts in split order. No atomics: the weight gradient
// is bitwise repeatable whatever the grid.
//
// cudcn/backends/cuda/fused.py picks the policy (fused_backward.py launches): float16 and
// bfloat16 MMAs, TF32 MMAs for float32 with TF32 on, float32 FMAs otherwise; float64 stays
// on the im2col path.
#include "dcn_fused_sampling.cuh"

/// Shared memory of fused_backward_data: the double-buffered A and B tiles,
/// over which a slice's column gradients go once its products are done: a
/// row of floats per pixel, an odd number of words long, so that the 32
/// pixels a warp reads of one channel fall in distinct banks.
template <typename Op>
struct FusedDataLayout {
  static constexpr int kColumnStride = FusedTile::kOutChannels + 1;
  static constexpr int kColumnWords = FusedTile::kPixels * kColumnStride;
  static constexpr int kStagesWords = 2 * FusedLayout<Op>::kStageWords;
  static constexpr int kSharedWords = kStagesWords > kColumnWords ? kStagesWords : kColumnWords;
};

__device__ __forceinline__ int fused_min(int a, int b) { return a < b ? a : b; }

/// Offset, mask and input gradients of a chunk of images, the column
/// gradients computed on chip.
///
/// grad_output: (batch, O, Ho, Wo)
/// input:       (batch, C, H, W)
/// offset:      (batch, 2*G*K, Ho, Wo)
/// mask:        (batch, G*K, Ho, Wo), read only when has_mask
/// matrix:      (groups, K*Cg, Og): row k*Cg + c holds W[group*Og + o][c][k] at o
/// grad_input:  (batch, C, H, W) float32, zero-filled by the caller; the input
///              gradient is added to it
/// grad_offset: (batch, 2*G*K, Ho, Wo), every element written
/// grad_mask:   (batch, G*K, Ho, Wo), written only when has_mask
/// Units: ceil(P / 64) * K * G; block FusedTile::kThreads; no dynamic shared memory.
/// (Launch bounds with one block: ptxas otherwise squeezes some
/// instantiations into 128 registers with spills.)
template <typename T, typename Op, typename Index>
__global__ void __launch_bounds__(FusedTile::kThreads, 1)
    fused_backward_data(const T* __restrict__ grad_output, const T* __restrict__ input,
                        const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
                        const T* __restrict__ matrix, DCN_SHAPE_PARAMS, int out_channels,
                        float* __restrict__ grad_input, T* __restrict__ grad_offset,
                        T* __restrict__ grad_mask) {
  typedef FusedLayout<Op> Layout;
  typedef FusedDataLayout<Op> DataLayout;
  constexpr int M = FusedTile::kPixels, SLICE = FusedTile::kOutChannels, CHUNK = FusedTile::kChannels;
  constexpr int THREADS = FusedTile::kThreads, PARTS = THREADS / M;  // threads per pixel
  constexpr int V = FusedVector<T>::value;
  DCN_SHARED(unsigned, tiles, DataLayout::kSharedWords);
  DCN_SHARED(float, sums, 3 * THREADS);  // each thread's offset and mask sums, [part][pixel][3]

  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w, G = s.offset_groups;
  const int Cg = s.channels / s.groups, Cog = s.channels / G, Og = out_channels / s.groups;
  const Index pixels = Index(s.batch) * L;
  const Index plane_size = Index(s.height) * s.width;
  const Index units = (pixels + M - 1) / M * K * G;
  const int t = threadIdx.x, warp = t / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;
  const int m = t % M, part = t / M;  // this thread's pixel, and which of its channels it takes
  const int row = t / 2, half = t % 2;  // the B-tile row (a channel) and half this thread loads
  const bool vector = Og % V == 0 && aligned_for<V>(matrix);
  int stage = 0;

  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int g = static_cast<int>(unit % G);
    const int k = static_cast<int>(unit / G % K);
    const Index first_pixel = unit / G / K * M;
    const int rows = pixels - first_pixel < M ? static_cast<int>(pixels - first_pixel) : M;

    // This thread's pixel: where its grad_output starts, its sampling point, the corners
    // and their derivatives.
    const bool live = m < rows;
    const Index n = live ? (first_pixel + m) / L : Index(0);
    const int l = live ? static_cast<int>((first_pixel + m) % L) : 0;
    const Index output_row = live ? n * out_channels * L + l : Index(-1);
    float y = 0.0f, x = 0.0f, ly = 0.0f, lx = 0.0f, mask_m = 0.0f;
    int y0 = 0, x0 = 0;
    bool slope = false;
    if (live) {
      sampling_point(s, offset, n, g, k, l, y, x);
      slope = locate(y, x, s.height, s.width, y0, x0, ly, lx, /*for_slope=*/true);
      mask_m = mask_value(s, mask, has_mask, n, g, k, l);
    }
    // On row or column -1 every corner weight is 0: no input gradient to add.
    const bool value = slope && y > -1.0f && x > -1.0f;

    float grad_y = 0.0f, grad_x = 0.0f, grad_m = 0.0f;
    const int last_group = ((g + 1) * Cog - 1) / Cg;
    for (int group = g * Cog / Cg; group <= last_group; ++group) {
      int begin, end;
      shared_channels(s, group, g, begin, end);
      for (int c0 = begin; c0 < end; c0 += SLICE) {
        const int count = fused_min(end - c0, SLICE);
        const bool row_live = row < count;
        const T* weights = matrix + (Index(group) * K * Cg + k * Cg + c0 - group * Cg + (row_live ? row : 0)) * Og;

        // 1. The slice's column gradients, 32 output channels at a time.
        float acc[2][4][4] = {};
        for (int o0 = 0; o0 < Og; o0 += CHUNK) {
          DCN_SHARED_PTR(unsigned) a_tile = tiles + stage * Layout::kStageWords;
          DCN_SHARED_PTR(unsigned) b_tile = a_tile + Layout::kATileWords;
#pragma unroll
          for (int j = 0; j < FusedTile::kHalf; j += 2) {  // half `part` of this pixel's A row, a word at a time
            float outputs[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int o = o0 + part * FusedTile::kHalf + j + e;
              outputs[e] = live && o < Og ? to_compute(dcn_load(grad_output, output_row + Index(group * Og + o) * L))
                                          : 0.0f;
            }
            store_row_words<Op>(a_tile + m * Layout::kRowWords, part * FusedTile::kHalf + j, outputs);
          }
          load_b_row<Op>(b_tile + row * Layout::kRowWords, half, weights + o0, row_live, Og - o0, vector);
          __syncthreads();
          if (warp_m * FusedTile::kWarpPixels < rows && warp_n * FusedTile::kWarpOutChannels < count)
            warp_tile_product<Op>(acc, a_tile + warp_m * FusedTile::kWarpPixels * Layout::kRowWords,
                                  b_tile + warp_n * FusedTile::kWarpOutChannels * Layout::kRowWords);
          stage ^= 1;
        }
        __syncthreads();  // every warp is done with the tiles: the column gradients go over them
        if (warp_m * FusedTile::kWarpPixels < rows && warp_n * FusedTile::kWarpOutChannels < count)
          fused_each_product(acc, warp_m, warp_n, [&](int pixel, int channel, float grad) {
            tiles[pixel * DataLayout::kColumnStride + channel] = __float_as_uint(grad);
          });
        __syncthreads();

        // 2. Offset and mask sums, and the input gradient.
        if (live && slope) {
          // (Formed here, not kept in registers through the products.)
          Corner<float> corners[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) corners[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
          for (int c = part; c < count; c += PARTS) {
            const unsigned word = tiles[m * DataLayout::kColumnStride + c];
            const float grad = __uint_as_float(word);
            const Index plane = (n * s.channels + c0 + c) * plane_size;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (!corners[q].valid) continue;
              const Index at = plane + Index(corners[q].y) * s.width + corners[q].x;
              const float product = grad * to_compute(dcn_load(input, at));
              grad_y += corners[q].d_dy * product;
              grad_x += corners[q].d_dx * product;
              grad_m += corners[q].weight * product;
              if (value) dcn_atomic_add(grad_input + at, corners[q].weight * (grad * mask_m));
            }
          }
        }
        __syncthreads();  // the column gradients are consumed before the next tiles go over them
      }
    }

    // The pixel's threads add their sums in a fixed order.
    sums[(part * M + m) * 3 + 0] = grad_y;
    sums[(part * M + m) * 3 + 1] = grad_x;
    sums[(part * M + m) * 3 + 2] = grad_m;
    __syncthreads();
    if (part == 0 && live) {
      float total_y = sums[m * 3 + 0], total_x = sums[m * 3 + 1], total_m = sums[m * 3 + 2];
#pragma unroll
      for (int j = 1; j < PARTS; ++j) {
        total_y += sums[(j * M + m) * 3 + 0];
        total_x += sums[(j * M + m) * 3 + 1];
        total_m += sums[(j * M + m) * 3 + 2];
      }
      const Index dy_at = ((n * G + g) * 2 * K + 2 * k) * L + l;
      store(grad_offset + dy_at, total_y * mask_m);
      store(grad_offset + dy_at + L, total_x * mask_m);
      if (has_mask) store(grad_mask + ((n * G + g) * K + k) * Index(L) + l, total_m);
    }
  }
}

/// Weight gradient of the whole batch, or of each pixel split.
///
/// grad_output:        (batch, O, Ho, Wo)
/// input:              (batch, C, H, W)
/// offset:             (batch, 2*G*K, Ho, Wo)
/// mask:               (batch, G*K, Ho, Wo), read only when has_mask
/// segments_per_group: the most offset groups one convolution group overlaps
/// splits:             pixel splits; split s sums pixels [s*split_pixels, (s+1)*split_pixels)
/// grad_weight:        (O, Cg, kh, kw), every element written when splits == 1
/// split_parts:        (splits, O*Cg*K) float32, every element written when splits > 1
/// Units: groups * segments_per_group * ceil(min(Cg, Cog) / 64) * K * ceil(Og / 64) *
/// splits (units past a group's last segment or slice do nothing); block
/// FusedTile::kThreads; no dynamic shared memory.
template <typename T, typename Op, typename Index>
__global__ void __launch_bounds__(FusedTile::kThreads)
    fused_backward_weight(const T* __restrict__ grad_output, const T* __restrict__ input,
                          const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
                          DCN_SHAPE_PARAMS, int out_channels, int segments_per_group, int splits,
                          Index split_pixels, T* __restrict__ grad_weight,
                          float* __restrict__ split_parts) {
  typedef FusedLayout<Op> Layout;
  // A: a row per output channel (FusedTile::kPixels of them), B: a row per channel of the
  // slice (kOutChannels), k: kChannels pixels.
  constexpr int OUTS = FusedTile::kPixels, SLICE = FusedTile::kOutChannels, PK = FusedTile::kChannels;
  constexpr int THREADS = FusedTile::kThreads, PAIRS = PK / 2;
  static_assert(OUTS == SLICE, "one loop fills the rows of both tiles");
  DCN_SHARED(unsigned, tiles, Layout::kStageWords);  // one stage: the taps' barrier keeps the MMAs apart
  DCN_SHARED(BilinearTap<Index>, taps, PK);
  DCN_SHARED(Index, output_rows, PK);  // where a pixel's grad_output starts; -1 past the split
  DCN_SHARED(Index, input_planes, PK);  // where its image starts in the input

  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w;
  const int Cg = s.channels / s.groups, Cog = s.channels / s.offset_groups, Og = out_channels / s.groups;
  const Index pixels = Index(s.batch) * L;
  const Index plane_size = Index(s.height) * s.width;
  const Index weight_size = Index(out_channels) * Cg * K;
  const int slices = ((Cg < Cog ? Cg : Cog) + SLICE - 1) / SLICE;
  const int out_tiles = (Og + OUTS - 1) / OUTS;
  const Index units = Index(s.groups) * segments_per_group * slices * K * out_tiles * splits;
  const int t = threadIdx.x, warp = t / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;
  const int pair = t % PAIRS, first_row = t / PAIRS;  // pixels 2*pair, 2*pair + 1 of rows first_row + 8j
  DCN_SHARED_PTR(unsigned) a_tile = tiles;
  DCN_SHARED_PTR(unsigned) b_tile = tiles + Layout::kATileWords;

  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) {
    Index rest = unit;
    const int split = static_cast<int>(rest % splits);
    rest /= splits;
    const int out_tile = static_cast<int>(rest % out_tiles);
    rest /= out_tiles;
    const int k = static_cast<int>(rest % K);
    rest /= K;
    const int slice_index = static_cast<int>(rest % slices);
    rest /= slices;
    const int segment = static_cast<int>(rest % segments_per_group);
    const int group = static_cast<int>(rest / segments_per_group);
    const int g = group * Cg / Cog + segment;
    if (g >= s.offset_groups) continue;  // the whole block skips it
    int begin, end;
    shared_channels(s, group, g, begin, end);
    const int c0 = begin + slice_index * SLICE;
    if (c0 >= end) continue;
    const int count = fused_min(end - c0, SLICE);
    const int o0 = out_tile * OUTS, outs = fused_min(Og - o0, OUTS);
    const Index first_pixel = Index(split) * split_pixels;
    const Index end_pixel = pixels - first_pixel < split_pixels ? pixels : first_pixel + split_pixels;

    float acc[2][4][4] = {};
    for (Index p0 = first_pixel; p0 < end_pixel; p0 += PK) {
      // The last run's products are done (its second barrier) before these taps are written,
      // and these taps before the tiles are refilled.
      if (t < PK) {
        const Index p = p0 + t;
        const bool live = p < end_pixel;
        const Index n = live ? p / L : Index(0);
        const int l = live ? static_cast<int>(p % L) : 0;
        taps[t] = live ? bilinear_tap(s, offset, mask, has_mask, n, g, k, l) : empty_tap<Index>();
        output_rows[t] = live ? n * out_channels * L + l : Index(-1);
        input_planes[t] = n * s.channels * plane_size;
      }
      __syncthreads();
      const BilinearTap<Index> tap[2] = {taps[2 * pair], taps[2 * pair + 1]};
      const Index output_row[2] = {output_rows[2 * pair], output_rows[2 * pair + 1]};
      const Index plane[2] = {input_planes[2 * pair], input_planes[2 * pair + 1]};
      for (int r = first_row; r < OUTS; r += THREADS / PAIRS) {
        // Row r of A: output channel o0 + r at the two pixels; row r of B: channel c0 + r there.
        float outputs[2], samples[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          outputs[e] = output_row[e] >= 0 && r < outs
                           ? to_compute(dcn_load(grad_output, output_row[e] + Index(group * Og + o0 + r) * L))
                           : 0.0f;
          samples[e] = 0.0f;
          if (r < count) {
            const T* image = input + plane[e] + Index(c0 + r) * plane_size;
#pragma unroll
            for (int q = 0; q < 4; ++q)
              if (tap[e].pixel[q] >= 0)
                samples[e] += tap[e].weight[q] * to_compute(dcn_load(image, tap[e].pixel[q]));
            samples[e] *= tap[e].mask;
          }
        }
        store_row_words<Op>(a_tile + r * Layout::kRowWords, 2 * pair, outputs);
        store_row_words<Op>(b_tile + r * Layout::kRowWords, 2 * pair, samples);
      }
      __syncthreads();
      if (warp_m * FusedTile::kWarpPixels < outs && warp_n * FusedTile::kWarpOutChannels < count)
        warp_tile_product<Op>(acc, a_tile + warp_m * FusedTile::kWarpPixels * Layout::kRowWords,
                              b_tile + warp_n * FusedTile::kWarpOutChannels * Layout::kRowWords);
    }

    fused_each_product(acc, warp_m, warp_n, [&](int o, int channel, float sum) {
      if (o >= outs || channel >= count) return;
      const Index at = (Index(group * Og + o0 + o) * Cg + (c0 + channel - group * Cg)) * K + k;
      if (splits == 1)
        store(grad_weight + at, sum);
      else
        dcn_store(split_parts, split * weight_size + at, sum);
    });
  }
}

/// grad_weight[i] = the sum over s of split_parts[s][i], in split order,
/// rounded to T; size = O*Cg*K.
template <typename T, typename Index>
__global__ void fused_weight_split_sum(const float* __restrict__ split_parts, int splits, Index size,
                                       T* __restrict__ grad_weight) {
  DCN_GRID_STRIDE_LOOP(i, size) {
    float sum = dcn_load(split_parts, i);
    for (int split = 1; split < splits; ++split) sum += dcn_load(split_parts, split * size + i);
    store(grad_weight + i, sum);
  }
}
