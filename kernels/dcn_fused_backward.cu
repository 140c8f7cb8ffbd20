// dcn_fused_backward.cu: the column-free backward (implicit GEMMs on tensor cores).
//
//   fused_backward_data<T, Op, Index>     offset, mask and input gradients; the column gradients
//                                         (grad_output x W^T) exist only in shared memory
//   fused_backward_weight<T, Op, Index>   weight gradient (or one pixel split's part of it): an
//                                         implicit GEMM that samples the input on the fly
//   fused_weight_split_sum<T, Index>      weight gradient = the splits' parts added in split order
//
// Both multiply with the machinery of kernels/dcn_fused_sampling.cuh: blocks of
// FusedTile::kThreads (4 warps, each 32 x 32 of a 64 x 64 tile), swizzled A and B tiles of
// 64-byte rows with k contiguous in the operand policy Op (FusedF16, FusedBF16, FusedTF32 on
// tensor cores, FusedFMA in float32; a slice of k is FusedLayout<Op>::kDepth deep: 32 values
// in 16-bit types, 16 in 32-bit ones) and warp_tile_product (ldmatrix fragments). Blocks
// stride over work units (any grid gives the same results, atomics aside).
//
// Notation: P = batch * L output pixels (p = n*L + l), Cg = C/groups channels and Og =
// O/groups output channels of a convolution group, Cog = C/G channels of an offset group.
// A slice is a run of channels inside one convolution group and one offset group, so that
// one sampling point per pixel and one group of output channels serve all of it.
//
// fused_backward_data: a unit is (64 output pixels, kernel point k, offset group g). For
// each slice of g's channels (up to 64):
//   1. the column gradients dCol[pixel][c] = sum_o grad_output[pixel][o] * W[o][c][k]: per
//      chunk of kDepth output channels, the A tile holds grad_output (a row per pixel, read
//      along pixels as NCHW stores it: every load of a thread's two chunks issued before any
//      is packed) and the B tile the weights (a row per channel of the slice, from the
//      weight matrix (groups, K*Cg, Og): 16-byte chunks by cp.async where Og fits them). The
//      chunks are pipelined by one: the next chunk's grad_output (into registers) and weights
//      (into the other stage) are in flight while the warps multiply this one, accumulating
//      in float32 registers; then dCol goes over the tiles as float32, each row skewed
//      (column_skew) so that both the warps' fragment stores and the column reads of
//      phase 2 are conflict-free;
//   2. two threads per pixel walk the slice's channels (one the even, one the odd ones, two
//      channels a step), reading the input (NCHW) at the point's four corners -- all eight
//      loads issued before any is used, a corner outside the image from a clamped address
//      and then counted 0: the products dCol * pixel feed the offset and mask sums
//      (registers, kept across slices), and weight * mask * dCol is added to the input
//      gradient with float32 atomics. A warp's lanes are 32 neighbouring pixels of one
//      channel, so their reads and atomics land on neighbouring input pixels.
// After the last slice the pixel's two threads add their sums in a fixed order: the
// offset and mask gradients never depend on the grid or on timing. As in
// deform_col2im_coord, a point on row or column -1 counts for the slopes (locate's
// for_slope); its corner weights, and so its input gradient, are 0.
//
// fused_backward_weight: a unit is (convolution group, slice of up to 64 channels, kernel
// point, 64 output channels, pixel split). For each run of kDepth pixels of its split,
// kDepth threads find the pixels' bilinear taps (bilinear_tap: deform_im2col's value
// semantics), then all sample the slice's columns into the B tile (a row per channel, k =
// pixels; two pixels' four corners each, all loads issued before any is used) and stage
// grad_output into the A tile (a row per output channel, k = pixels, read along pixels),
// and the warps accumulate dW[o][c] = sum_pixel grad_output[pixel][o] * columns[pixel][c].
// One block sums a split's pixels in order: with one split the result is rounded into the
// weight gradient at once, else each split writes its float32 part, kernel point major
// (consecutive channels consecutive), and fused_weight_split_sum adds the parts in split
// order. No atomics: the weight gradient is bitwise repeatable whatever the grid.
//
// cudcn/backends/cuda/fused.py picks the policy (fused_backward.py launches): float16 and
// bfloat16 MMAs, TF32 MMAs for float32 with TF32 on, float32 FMAs otherwise; float64 stays
// on the im2col path.
#include "dcn_fused_sampling.cuh"

/// Shared memory of fused_backward_data: the double-buffered A and B tiles,
/// over which a slice's column gradients go once its products are done: 64
/// rows (pixels) of 64 floats (channels), column c of row r at word
/// r * kColumnStride + column_skew(r) + c.
template <typename Op>
struct FusedDataLayout {
  static constexpr int kColumnStride = 96;  // a multiple of 32 words, room for the skew
  static constexpr int kColumnWords = FusedTile::kPixels * kColumnStride;
  static constexpr int kStagesWords = 2 * FusedLayout<Op>::kStageWords;
  static constexpr int kSharedWords = kStagesWords > kColumnWords ? kStagesWords : kColumnWords;
};

/// Where the column gradients of row `row` start past its first word: a
/// bijection of the row's low 5 bits onto 0..31, so that the 32 rows a warp
/// reads of one column fall in 32 banks, and which puts rows 0-7 (bits 0-2)
/// on the offsets a fragment store's columns (2t + e) leave free (bit 0 and
/// bits 3-4), so that a warp's accumulator stores (8 rows x 4 column pairs)
/// fall in 32 banks too. It is a sum of the row's bit fields, so a lane's
/// 32 stores are one base address plus constants.
__device__ __forceinline__ int column_skew(int row) {
  return (row & 1) + ((row & 6) << 2) + ((row & 24) >> 2);
}

__device__ __forceinline__ int fused_min(int a, int b) { return a < b ? a : b; }

/// The work of fused_backward_data for every unit of this block. kVector:
/// the weight matrix's rows are whole 16-byte chunks (Og % V == 0, aligned),
/// so they move by cp.async (chosen once per launch).
template <bool kVector, typename T, typename Op, typename Index>
__device__ __forceinline__ void fused_backward_data_units(
    DCN_SHARED_PTR(unsigned) tiles, DCN_SHARED_PTR(float) sums, DCN_SHARED_PTR(float) points,
    DCN_SHARED_PTR(Index) output_rows,
    const T* __restrict__ grad_output,
    const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
    const T* __restrict__ matrix, const ConvShape& s, int out_channels, float* __restrict__ grad_input,
    T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
  typedef FusedLayout<Op> Layout;
  typedef FusedDataLayout<Op> DataLayout;
  constexpr int M = FusedTile::kPixels, SLICE = FusedTile::kOutChannels;
  constexpr int DEPTH = Layout::kDepth, V = Layout::kChunkValues;
  constexpr int THREADS = FusedTile::kThreads, PARTS = THREADS / M;  // threads per pixel
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w, G = s.offset_groups;
  const int Cg = s.channels / s.groups, Cog = s.channels / G, Og = out_channels / s.groups;
  const int pixels = s.batch * L;  // the launcher keeps pixel and unit counts below 2^31
  const Index plane_size = Index(s.height) * s.width;
  const int units = (pixels + M - 1) / M * K * G;
  const int t = threadIdx.x, warp = t / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;
  const int m = t % M, part = t / M;  // this thread's pixel (A row), and which of its chunks and channels
  const int row = t / 2, half = t % 2;  // the B-tile row (a channel) and chunks this thread loads
  int stage = 0;

  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int g = unit % G, k = unit / G % K;
    const int first_pixel = unit / G / K * M;
    const int rows = pixels - first_pixel < M ? pixels - first_pixel : M;

    // This thread's pixel and where its grad_output starts; its sampling point goes to
    // shared memory (`points`, read in phase 2), not through the products in registers.
    // (The last unit's readers of `points` and `sums` passed its barriers since.)
    const bool live = m < rows;
    const int n = live ? (first_pixel + m) / L : 0, l = live ? (first_pixel + m) % L : 0;
    // (Read back inside the loops below: shared memory, not a register through them.)
    output_rows[t] = live ? Index(n) * out_channels * L + l : Index(-1);
    if (part == 0) {
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
      points[0 * M + m] = __int_as_float(y0);
      points[1 * M + m] = __int_as_float(x0);
      points[2 * M + m] = ly;
      points[3 * M + m] = lx;
      points[4 * M + m] = mask_m;
      points[5 * M + m] = __int_as_float(int(slope) | int(value) << 1);
    }

    const int first_group = g * Cog / Cg, last_group = ((g + 1) * Cog - 1) / Cg;
    for (int group = first_group; group <= last_group; ++group) {
      int begin, end;
      shared_channels(s, group, g, begin, end);
      for (int c0 = begin; c0 < end; c0 += SLICE) {
        const int count = fused_min(end - c0, SLICE);
        const bool row_live = row < count;
        const bool warp_live = warp_m * FusedTile::kWarpPixels < rows && warp_n * FusedTile::kWarpOutChannels < count;

        // 1. The slice's column gradients, DEPTH output channels at a time.
        auto issue_weights = [&](DCN_SHARED_PTR(unsigned) b_tile, int o0) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int first = o0 + (half + 2 * j) * V;
            const int valid = !row_live ? 0 : Og - first >= V ? V : (Og - first > 0 ? Og - first : 0);
            const T* weights = matrix + (Index(group) * K * Cg + k * Cg + c0 - group * Cg + (row_live ? row : 0)) * Og;
            fill_chunk<kVector>(fused_chunk_at(b_tile, row, half + 2 * j), weights + first, valid, matrix);
          }
          if constexpr (kVector) dcn_cp_async_commit();
        };
        float acc[2][4][4] = {};
        int o0 = 0;
        issue_weights(tiles + stage * Layout::kStageWords + FusedTile::kTileWords, 0);
        for (;;) {
          DCN_SHARED_PTR(unsigned) a_tile = tiles + stage * Layout::kStageWords;
          DCN_SHARED_PTR(unsigned) b_tile = a_tile + FusedTile::kTileWords;
          // This thread's two A chunks: grad_output of its pixel, every load of both (of
          // one, with 64-bit indices, whose addresses take twice the registers) issued
          // before any is used.
          const Index output_row = output_rows[t];
#pragma unroll(sizeof(Index) == 4 ? 2 : 1)
          for (int j = 0; j < 2; ++j) {
            float outputs[V];  // (past the pixels or the output channels: read where valid, dropped)
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const int o = o0 + (part + 2 * j) * V + v;
              const bool valid = output_row >= 0 && o < Og;
              const float value = to_compute(
                  dcn_load(grad_output, (valid ? output_row : Index(0)) + Index(group * Og + (valid ? o : 0)) * L));
              outputs[v] = valid ? value : 0.0f;
            }
            fused_store_chunk(a_tile, m, part + 2 * j, pack_chunk<Op>(outputs));
          }
          if constexpr (kVector) dcn_cp_async_wait<0>();
          __syncthreads();
          o0 += DEPTH;
          const bool more = o0 < Og;
          if (more)  // in flight while the warps multiply
            issue_weights(tiles + (stage ^ 1) * Layout::kStageWords + FusedTile::kTileWords, o0);
          if (warp_live)
            warp_tile_product<Op>(acc, a_tile + warp_m * FusedTile::kWarpPixels * FusedTile::kRowWords,
                                  b_tile + warp_n * FusedTile::kWarpOutChannels * FusedTile::kRowWords);
          stage ^= 1;
          if (!more) break;
        }
        __syncthreads();  // every warp is done with the tiles: the column gradients go over them
        if (warp_live)
          fused_each_product(acc, warp_m, warp_n, [&](int pixel, int channel, float grad) {
            tiles[pixel * DataLayout::kColumnStride + column_skew(pixel) + channel] = __float_as_uint(grad);
          });
        __syncthreads();

        // 2. Offset and mask sums (running in sums[], this thread's slot), and the input gradient.
        const int flags = __float_as_int(points[5 * M + m]);
        if (live && (flags & 1)) {
          const int y0 = __float_as_int(points[0 * M + m]), x0 = __float_as_int(points[1 * M + m]);
          const float ly = points[2 * M + m], lx = points[3 * M + m], mask_m = points[4 * M + m];
          const bool value = flags & 2;
          const bool first = group == first_group && c0 == begin;
          float grad_y = first ? 0.0f : sums[(part * M + m) * 3 + 0];
          float grad_x = first ? 0.0f : sums[(part * M + m) * 3 + 1];
          float grad_m = first ? 0.0f : sums[(part * M + m) * 3 + 2];
          Corner<float> corners[4];
          int at[4];  // the corner's pixel, clamped into the image
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            corners[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
            at[q] = corners[q].valid ? corners[q].y * s.width + corners[q].x : 0;
          }
          const Index image_planes = Index(n) * s.channels + c0;
          // STEP channels a step (c, c + PARTS, ...): their 4 * STEP loads, then their uses.
          // (One with 64-bit indices, whose addresses take twice the registers.)
          constexpr int STEP = sizeof(Index) == 4 ? 2 : 1;
          for (int c = part; c < count; c += STEP * PARTS) {
            Index planes[STEP];
            float pixel[STEP][4];
#pragma unroll
            for (int e = 0; e < STEP; ++e) {
              const int channel = c + e * PARTS < count ? c + e * PARTS : c;
              planes[e] = (image_planes + channel) * plane_size;
#pragma unroll
              for (int q = 0; q < 4; ++q) pixel[e][q] = to_compute(dcn_load(input, planes[e] + at[q]));
            }
#pragma unroll
            for (int e = 0; e < STEP; ++e) {
              const int channel = c + e * PARTS;
              if (channel >= count) break;
              const unsigned word = tiles[m * DataLayout::kColumnStride + column_skew(m) + channel];
              const float grad = __uint_as_float(word);
#pragma unroll
              for (int q = 0; q < 4; ++q) {  // a corner outside the image counts 0 (a select, not a branch)
                const float product = corners[q].valid ? grad * pixel[e][q] : 0.0f;
                grad_y += corners[q].d_dy * product;
                grad_x += corners[q].d_dx * product;
                grad_m += corners[q].weight * product;
                if (value && corners[q].valid)
                  dcn_atomic_add(grad_input + planes[e] + at[q], corners[q].weight * (grad * mask_m));
              }
            }
          }
          sums[(part * M + m) * 3 + 0] = grad_y;
          sums[(part * M + m) * 3 + 1] = grad_x;
          sums[(part * M + m) * 3 + 2] = grad_m;
        }
        __syncthreads();  // the column gradients are consumed before the next tiles go over them
      }
    }

    // The pixel's threads add their sums in a fixed order (past the barrier above; a
    // pixel without slope has none).
    if (part == 0 && live) {
      const float mask_m = points[4 * M + m];
      float total_y = 0.0f, total_x = 0.0f, total_m = 0.0f;
      if (__float_as_int(points[5 * M + m]) & 1) {
        total_y = sums[m * 3 + 0];
        total_x = sums[m * 3 + 1];
        total_m = sums[m * 3 + 2];
#pragma unroll
        for (int j = 1; j < PARTS; ++j) {
          total_y += sums[(j * M + m) * 3 + 0];
          total_x += sums[(j * M + m) * 3 + 1];
          total_m += sums[(j * M + m) * 3 + 2];
        }
      }
      const Index dy_at = ((Index(n) * G + g) * 2 * K + 2 * k) * L + l;
      store(grad_offset + dy_at, total_y * mask_m);
      store(grad_offset + dy_at + L, total_x * mask_m);
      if (has_mask) store(grad_mask + ((Index(n) * G + g) * K + k) * L + l, total_m);
    }
  }
}

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
/// Units: ceil(P / 64) * K * G, below 2^31 with P (counted in int; Index is for
/// element offsets); block FusedTile::kThreads; no dynamic shared memory.
/// (Launch bounds: 4 blocks an SM, at most 128 registers a thread.)
template <typename T, typename Op, typename Index>
__global__ void __launch_bounds__(FusedTile::kThreads, 4)
    fused_backward_data(const T* __restrict__ grad_output, const T* __restrict__ input,
                        const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
                        const T* __restrict__ matrix, DCN_SHAPE_PARAMS, int out_channels,
                        float* __restrict__ grad_input, T* __restrict__ grad_offset,
                        T* __restrict__ grad_mask) {
  constexpr int V = FusedLayout<Op>::kChunkValues;
  DCN_SHARED(unsigned, tiles, FusedDataLayout<Op>::kSharedWords);
  DCN_SHARED(float, sums, 3 * FusedTile::kThreads);  // each thread's offset and mask sums, [part][pixel][3]
  DCN_SHARED(float, points, 6 * FusedTile::kPixels);  // each pixel's y0, x0, ly, lx, mask, flags (bit 0 slope, 1 value)
  DCN_SHARED(Index, output_rows, FusedTile::kThreads);  // where each thread's grad_output row starts; -1: none
  const ConvShape s = DCN_SHAPE;
  if ((out_channels / s.groups) % V == 0 && aligned_for<V>(matrix))
    fused_backward_data_units<true, T, Op, Index>(tiles, sums, points, output_rows, grad_output, input, offset, mask, has_mask, matrix, s,
                                                  out_channels, grad_input, grad_offset, grad_mask);
  else
    fused_backward_data_units<false, T, Op, Index>(tiles, sums, points, output_rows, grad_output, input, offset, mask, has_mask, matrix,
                                                   s, out_channels, grad_input, grad_offset, grad_mask);
}

/// Two consecutive 32-bit words (one 8-byte shared-memory store).
struct alignas(8) FusedWordPair {
  unsigned w[2];
};

/// Weight gradient of the whole batch, or of each pixel split.
///
/// grad_output:        (batch, O, Ho, Wo)
/// input:              (batch, C, H, W)
/// offset:             (batch, 2*G*K, Ho, Wo)
/// mask:               (batch, G*K, Ho, Wo), read only when has_mask
/// segments_per_group: the most offset groups one convolution group overlaps
/// splits:             pixel splits; split s sums pixels [s*split_pixels, (s+1)*split_pixels)
/// grad_weight:        (O, Cg, kh, kw), every element written when splits == 1
/// split_parts:        (splits, K, O, Cg) float32, every element written when splits > 1
/// Units: groups * segments_per_group * ceil(min(Cg, Cog) / 64) * K * ceil(Og / 64) *
/// splits (units past a group's last segment or slice do nothing), below 2^31 with
/// P; block FusedTile::kThreads; no dynamic shared memory.
/// (Launch bounds: 4 blocks an SM, at most 128 registers a thread.)
template <typename T, typename Op, typename Index>
__global__ void __launch_bounds__(FusedTile::kThreads, 4)
    fused_backward_weight(const T* __restrict__ grad_output, const T* __restrict__ input,
                          const T* __restrict__ offset, const T* __restrict__ mask, int has_mask,
                          DCN_SHAPE_PARAMS, int out_channels, int segments_per_group, int splits,
                          int split_pixels, T* __restrict__ grad_weight,
                          float* __restrict__ split_parts) {
  typedef FusedLayout<Op> Layout;
  // A: a row per output channel (FusedTile::kPixels of them), B: a row per channel of the
  // slice (kOutChannels), k: kDepth pixels.
  constexpr int OUTS = FusedTile::kPixels, SLICE = FusedTile::kOutChannels, PK = Layout::kDepth;
  constexpr int THREADS = FusedTile::kThreads, PAIRS = PK / 2, ROW_STEP = THREADS / PAIRS;
  static_assert(OUTS == SLICE, "one loop fills the rows of both tiles");
  DCN_SHARED(unsigned, tiles, Layout::kStageWords);  // one stage: the taps' barrier keeps the MMAs apart
  DCN_SHARED(BilinearTap, taps, PK);
  DCN_SHARED(Index, output_rows, PK);  // where a pixel's grad_output starts; -1 past the split
  DCN_SHARED(Index, input_planes, PK);  // where its image starts in the input

  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w;
  const int Cg = s.channels / s.groups, Cog = s.channels / s.offset_groups, Og = out_channels / s.groups;
  const int pixels = s.batch * L;  // the launcher keeps pixel and unit counts below 2^31
  const Index plane_size = Index(s.height) * s.width;
  const int slices = ((Cg < Cog ? Cg : Cog) + SLICE - 1) / SLICE;
  const int out_tiles = (Og + OUTS - 1) / OUTS;
  const int units = s.groups * segments_per_group * slices * K * out_tiles * splits;
  const int t = threadIdx.x, warp = t / 32;
  const int warp_m = warp % FusedTile::kWarpsM, warp_n = warp / FusedTile::kWarpsM;
  // Pixels 2*pair, 2*pair + 1 of rows first_row + ROW_STEP*j: a 16-bit policy's word, or a
  // 32-bit policy's two words (one 8-byte store).
  const int pair = t % PAIRS, first_row = t / PAIRS;
  DCN_SHARED_PTR(unsigned) a_tile = tiles;
  DCN_SHARED_PTR(unsigned) b_tile = tiles + FusedTile::kTileWords;

  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    int rest = unit;
    const int split = rest % splits;
    rest /= splits;
    const int out_tile = rest % out_tiles;
    rest /= out_tiles;
    const int k = rest % K;
    rest /= K;
    const int slice_index = rest % slices;
    rest /= slices;
    const int segment = rest % segments_per_group;
    const int group = rest / segments_per_group;
    const int g = group * Cg / Cog + segment;
    if (g >= s.offset_groups) continue;  // the whole block skips it
    int begin, end;
    shared_channels(s, group, g, begin, end);
    const int c0 = begin + slice_index * SLICE;
    if (c0 >= end) continue;
    const int count = fused_min(end - c0, SLICE);
    const int o0 = out_tile * OUTS, outs = fused_min(Og - o0, OUTS);
    const int first_pixel = split * split_pixels;
    const int end_pixel = pixels - first_pixel < split_pixels ? pixels : first_pixel + split_pixels;
    const bool warp_live = warp_m * FusedTile::kWarpPixels < outs && warp_n * FusedTile::kWarpOutChannels < count;

    float acc[2][4][4] = {};
    for (int p0 = first_pixel; p0 < end_pixel; p0 += PK) {
      // The last run's products are done (its second barrier) before these taps are written,
      // and these taps before the tiles are refilled.
      if (t < PK) {
        const int p = p0 + t;
        const bool live = p < end_pixel;
        const int n = live ? p / L : 0, l = live ? p % L : 0;
        taps[t] = live ? bilinear_tap(s, offset, mask, has_mask, Index(n), g, k, l) : empty_tap();
        output_rows[t] = live ? Index(n) * out_channels * L + l : Index(-1);
        input_planes[t] = Index(n) * s.channels * plane_size;
      }
      __syncthreads();
      const BilinearTap tap[2] = {taps[2 * pair], taps[2 * pair + 1]};
      const Index output_row[2] = {output_rows[2 * pair], output_rows[2 * pair + 1]};
      const Index plane[2] = {input_planes[2 * pair], input_planes[2 * pair + 1]};
      for (int r = first_row; r < OUTS; r += ROW_STEP) {
        // Row r of A: output channel o0 + r at the two pixels; row r of B: channel c0 + r
        // there. Every load first (clamped addresses), then the sums.
        const int o = r < outs ? o0 + r : o0, c = r < count ? c0 + r : c0;
        float outputs[2], corners[2][4];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          outputs[e] = to_compute(dcn_load(grad_output, (output_row[e] < 0 ? Index(0) : output_row[e]) +
                                                            Index(group * Og + o) * L));
          const T* image = input + plane[e] + Index(c) * plane_size;
#pragma unroll
          for (int q = 0; q < 4; ++q) corners[e][q] = to_compute(dcn_load(image, tap_corner(tap[e], q)));
        }
        float samples[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (output_row[e] < 0 || r >= outs) outputs[e] = 0.0f;
          float sum = 0.0f;
#pragma unroll
          for (int q = 0; q < 4; ++q) sum += tap[e].pixel[q] < 0 ? 0.0f : tap[e].weight[q] * corners[e][q];
          samples[e] = r < count ? sum * tap[e].mask : 0.0f;
        }
        if constexpr (Op::kPerWord == 2) {
          fused_chunk_at(a_tile, r, pair / 4)[pair % 4] = Op::word(outputs[0], outputs[1]);
          fused_chunk_at(b_tile, r, pair / 4)[pair % 4] = Op::word(samples[0], samples[1]);
        } else {
          const FusedWordPair a_words = {{Op::word(outputs[0]), Op::word(outputs[1])}};
          const FusedWordPair b_words = {{Op::word(samples[0]), Op::word(samples[1])}};
          dcn_shared_cast<FusedWordPair>(fused_chunk_at(a_tile, r, pair / 2) + 2 * (pair % 2))[0] = a_words;
          dcn_shared_cast<FusedWordPair>(fused_chunk_at(b_tile, r, pair / 2) + 2 * (pair % 2))[0] = b_words;
        }
      }
      __syncthreads();
      if (warp_live)
        warp_tile_product<Op>(acc, a_tile + warp_m * FusedTile::kWarpPixels * FusedTile::kRowWords,
                              b_tile + warp_n * FusedTile::kWarpOutChannels * FusedTile::kRowWords);
    }

    fused_each_product(acc, warp_m, warp_n, [&](int o, int channel, float sum) {
      if (o >= outs || channel >= count) return;
      const Index oc = Index(group * Og + o0 + o), c = c0 + channel - group * Cg;
      if (splits == 1)
        store(grad_weight + (oc * Cg + c) * K + k, sum);
      else
        dcn_store(split_parts, ((Index(split) * K + k) * out_channels + oc) * Cg + c, sum);
    });
  }
}

/// grad_weight[(oc * Cg + c) * K + k] = the sum over s of split_parts[s][k][oc][c],
/// in split order, rounded to T; size = O*Cg*K, plane = O*Cg.
template <typename T, typename Index>
__global__ void fused_weight_split_sum(const float* __restrict__ split_parts, int splits, Index size,
                                       int kernel_points, T* __restrict__ grad_weight) {
  const Index plane = size / kernel_points;
  DCN_GRID_STRIDE_LOOP(i, size) {
    const Index at = i % kernel_points * plane + i / kernel_points;
    float sum = dcn_load(split_parts, at);
    for (int split = 1; split < splits; ++split) sum += dcn_load(split_parts, split * size + at);
    store(grad_weight + i, sum);
  }
}
