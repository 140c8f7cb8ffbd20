// dcn_fused_backward.cu: the column-free backward on tensor cores.
//
//   fused_backward_data<T, Index>      offset, mask and input gradients; the column gradients
//                                      (grad_output x W^T) exist only in shared memory
//   fused_backward_weight<T, Index>    weight gradient (or one pixel split's part of it): an
//                                      implicit GEMM that samples the input on the fly
//   fused_weight_split_sum<T, Index>   weight gradient = the splits' parts added in split order
//
// Notation: P = batch * L output pixels (image-major, p = n*L + l), Cg = C/groups
// channels and Og = O/groups output channels of a convolution group, Cog = C/G
// channels of an offset group. A *slice* is a run of channels inside one
// convolution group and one offset group, so that one grad_output tile and one
// sampling point per pixel serve all of it.
//
// fused_backward_data: a block of 4 warps takes units (a tile of 64 output
// pixels, one kernel point k, one offset group g), blocks striding over the
// units. For each slice of g's channels (up to 32):
//   1. column gradients dCol[pixel][c] = sum_o grad_output[pixel][o] * W[o][c][k]
//      on tensor cores: grad_output rows (A, 64 x 32 output channels at a time)
//      and weight rows (B, from the weight matrix (groups, K*Cg, Og)) staged in
//      shared memory in the MMA's input type, float32 accumulators, each warp
//      16 pixels x the slice; then dCol goes to shared memory as float32;
//   2. two threads per pixel walk the slice's channels (one the even, one the
//      odd ones), reading the input (NCHW) at the point's four corners: the
//      products dCol * pixel feed the offset and mask gradients (partial sums
//      in registers, kept across slices), and weight * mask * dCol is added to
//      the input gradient with float32 atomics. A warp's lanes are 32
//      neighbouring output pixels of one channel, so their reads and atomics
//      land on neighbouring input pixels.
// After the last slice the two threads' sums meet in shared memory and are
// added in a fixed order: the offset and mask gradients never depend on the
// grid or on timing. Points on row or column -1 count for the slopes only
// (locate's for_slope), as in deform_col2im_coord.
//
// fused_backward_weight: a block of 8 warps takes units (convolution group,
// slice of up to 32 channels, kernel point, tile of 128 output channels, pixel
// split). For each run of 32 pixels of its split it samples the columns of the
// slice (bilinear x mask, exactly as deform_im2col computes them) into shared
// memory (B, [channel][pixel]), stages grad_output (A, [output channel][pixel],
// read along pixels as NCHW stores them) and accumulates
// dW[o][c] += sum_pixel grad_output[pixel][o] * columns[pixel][c]
// on tensor cores, each warp 16 output channels x the slice. A split's pixels
// are summed in order by one block; with one split the result is rounded into
// the weight gradient at once, else each split writes its float32 part and
// fused_weight_split_sum adds the parts in split order. No atomics: the weight
// gradient is bitwise repeatable, whatever the grid.
//
// Types: float16 and bfloat16 operands with float32 accumulation (m16n8k16),
// float32 rounded to TF32 (m16n8k8, sm_80 and newer, as bfloat16). The
// launchers (cudcn/backends/cuda/fused_backward.py) choose the instantiations
// and keep float64, and float32 without TF32, on the im2col path.
#include "dcn_mma.cuh"

// Tile sizes (cudcn/backends/cuda/fused_backward.py mirrors them).
constexpr int kFusedDataThreads = 128;   // 4 warps
constexpr int kFusedDataPixels = 64;     // output pixels of a unit: 16 MMA rows per warp
constexpr int kFusedDataSlice = 32;      // channels of a slice: 4 MMA column tiles of 8
constexpr int kFusedDataChunk = 32;      // output channels staged at a time (the MMAs' k)
constexpr int kFusedWeightThreads = 256;  // 8 warps
constexpr int kFusedWeightOutputs = 128;  // output channels of a unit: 16 MMA rows per warp
constexpr int kFusedWeightSlice = 32;     // channels of a slice: 4 MMA column tiles of 8
constexpr int kFusedWeightPixels = 32;    // pixels staged at a time (the MMAs' k)

/// The tensor-core path of storage type T: the operand element the shared
/// tiles hold (16-bit patterns, or float32 rounded to TF32 as fragments are
/// loaded), the depth of one MMA, fragment loads (A row-major, B
/// column-major) and D += A B.
template <typename T>
struct FusedMma;

/// float16 and bfloat16 operands: their bits as stored.
template <typename T>
struct FusedMma16 {
  typedef unsigned short Element;
  static constexpr int depth = 16;
  static __device__ __forceinline__ Element operand(T v) { return v.bits; }
  static __device__ __forceinline__ Element operand(float v) {
    T h;
    store(&h, v);
    return h.bits;
  }
  template <typename Tile>
  static __device__ __forceinline__ void load_a(unsigned (&a)[4], Tile tile, int ld) {
    dcn_mma_load_a16(a, tile, ld);
  }
  template <typename Tile>
  static __device__ __forceinline__ void load_b(unsigned (&b)[2], Tile tile, int ld) {
    dcn_mma_load_b16_col(b, tile, ld);
  }
};

template <>
struct FusedMma<dcn_half> : FusedMma16<dcn_half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    dcn_mma_m16n8k16_f16(d, a, b, d);
  }
};

template <>
struct FusedMma<dcn_bfloat16> : FusedMma16<dcn_bfloat16> {
  static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    dcn_mma_m16n8k16_bf16(d, a, b, d);
  }
};

template <>
struct FusedMma<float> {
  typedef float Element;
  static constexpr int depth = 8;
  static __device__ __forceinline__ Element operand(float v) { return v; }
  template <typename Tile>
  static __device__ __forceinline__ void load_a(unsigned (&a)[4], Tile tile, int ld) {
    dcn_mma_load_a8_tf32(a, tile, ld);
  }
  template <typename Tile>
  static __device__ __forceinline__ void load_b(unsigned (&b)[2], Tile tile, int ld) {
    dcn_mma_load_b8_tf32(b, tile, ld);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    dcn_mma_m16n8k8_tf32(d, a, b, d);
  }
};

/// Row length of a staged tile of `columns` elements: one 4-byte word more
/// than a multiple of 32 words, so that lanes writing one element of
/// consecutive rows hit different banks.
template <typename Element>
__host__ __device__ constexpr int fused_tile_stride(int columns) {
  return columns + static_cast<int>(4 / sizeof(Element));
}

__device__ __forceinline__ int fused_min(int a, int b) { return a < b ? a : b; }

/// acc[tile] += A B for the calling warp (all 32 lanes, converged): A is the
/// warp's 16 rows of a row-major tile, B the first `columns` rows of a
/// column-major tile (8 per MMA column tile), both of row length ld; k runs
/// over the first `depth` elements of each row (rounded up to the MMA's
/// depth, which the tiles' zero padding covers).
template <typename Mma, int Tiles, typename TileA, typename TileB>
__device__ __forceinline__ void fused_warp_product(float (&acc)[Tiles][4], TileA a, TileB b, int ld,
                                                   int depth, int columns) {
  for (int step = 0; step < depth; step += Mma::depth) {
    unsigned fa[4];
    Mma::load_a(fa, a + step, ld);
#pragma unroll
    for (int tile = 0; tile < Tiles; ++tile) {
      if (tile * 8 >= columns) break;
      unsigned fb[2];
      Mma::load_b(fb, b + (tile * 8 * ld + step), ld);
      Mma::mma(acc[tile], fa, fb);
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
/// matrix:      (groups, K*Cg, Og), row k*Cg + c holds W[group*Og + o][c][k] at o
/// grad_input:  (batch, C, H, W) float32, zero-filled by the caller; the input
///              gradient is added to it
/// grad_offset: (batch, 2*G*K, Ho, Wo), every element written
/// grad_mask:   (batch, G*K, Ho, Wo), written only when has_mask
template <typename T, typename Index>
__global__ void fused_backward_data(const T* __restrict__ grad_output, const T* __restrict__ input,
                                    const T* __restrict__ offset, const T* __restrict__ mask,
                                    int has_mask, const T* __restrict__ matrix, DCN_SHAPE_PARAMS,
                                    int out_channels, float* __restrict__ grad_input,
                                    T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
  typedef FusedMma<T> Mma;
  typedef typename Mma::Element Element;
  constexpr int M = kFusedDataPixels, SLICE = kFusedDataSlice, CHUNK = kFusedDataChunk;
  constexpr int THREADS = kFusedDataThreads, PARTS = THREADS / M;  // threads per pixel
  constexpr int LD = fused_tile_stride<Element>(CHUNK), LDC = SLICE + 1;
  static_assert(THREADS / 32 * 16 == M, "each warp computes 16 pixels of a tile");
  DCN_SHARED(Element, output_tile, M * LD);  // A: grad_output [pixel][output channel]
  DCN_SHARED(Element, weight_tile, SLICE * LD);  // B: weight [channel][output channel]
  DCN_SHARED(float, column_tile, M * LDC);  // the slice's column gradients [pixel][channel]
  DCN_SHARED(Index, output_rows, M);  // where a pixel's grad_output starts; -1 past the end
  DCN_SHARED(float, sums, 3 * THREADS);  // each thread's offset and mask sums, [part][pixel][3]

  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w, G = s.offset_groups;
  const int Cg = s.channels / s.groups, Cog = s.channels / G, Og = out_channels / s.groups;
  const Index pixels = Index(s.batch) * L;
  const Index plane_size = Index(s.height) * s.width;
  const Index units = (pixels + M - 1) / M * K * G;
  const int t = threadIdx.x, warp = t / 32;
  const int m = t % M, part = t / M;  // this thread's pixel of the tile, and which of its channels

  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int g = static_cast<int>(unit % G);
    const int k = static_cast<int>(unit / G % K);
    const Index first_pixel = unit / G / K * M;
    const int rows = pixels - first_pixel < M ? static_cast<int>(pixels - first_pixel) : M;
    for (int r = t; r < M; r += THREADS) {
      const Index p = first_pixel + r;
      output_rows[r] = r < rows ? p / L * out_channels * L + p % L : Index(-1);
    }

    // This thread's sampling point, its corners and their derivatives.
    const bool live = m < rows;
    const Index n = live ? (first_pixel + m) / L : Index(0);
    const int l = live ? static_cast<int>((first_pixel + m) % L) : 0;
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
    Corner<float> corners[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      corners[q] = corner(q, y0, x0, ly, lx, s.height, s.width);
      corners[q].valid = corners[q].valid && slope;
    }

    float grad_y = 0.0f, grad_x = 0.0f, grad_m = 0.0f;
    const int group_end = (g + 1) * Cog;
    for (int c0 = g * Cog; c0 < group_end;) {
      const int group = c0 / Cg;
      const int slice = fused_min(fused_min(group_end, (group + 1) * Cg) - c0, SLICE);
      const T* weights = matrix + (Index(group) * K * Cg + k * Cg + c0 - group * Cg) * Og;

      // 1. The slice's column gradients on tensor cores.
      float acc[SLICE / 8][4] = {};
      for (int o0 = 0; o0 < Og; o0 += CHUNK) {
        __syncthreads();  // every warp is done with the tiles
        for (int e = t; e < M * CHUNK; e += THREADS) {
          const int r = e % M, o = e / M;  // consecutive threads: consecutive pixels
          const Index row = output_rows[r];
          output_tile[r * LD + o] = row >= 0 && o0 + o < Og
                                        ? Mma::operand(grad_output[row + Index(group * Og + o0 + o) * L])
                                        : Mma::operand(0.0f);
        }
        for (int e = t; e < SLICE * CHUNK; e += THREADS) {
          const int o = e % CHUNK, c = e / CHUNK;  // consecutive threads: consecutive output channels
          weight_tile[c * LD + o] = c < slice && o0 + o < Og ? Mma::operand(weights[Index(c) * Og + o0 + o])
                                                             : Mma::operand(0.0f);
        }
        __syncthreads();
        if (warp * 16 < rows)  // the output channels past Og are zeros: their steps are skipped
          fused_warp_product<Mma>(acc, output_tile + warp * 16 * LD, weight_tile, LD, fused_min(CHUNK, Og - o0), slice);
      }
      if (Og == 0) __syncthreads();  // (else the chunks' barriers did it) the last slice's column gradients are consumed
      if (warp * 16 < rows) {
#pragma unroll
        for (int tile = 0; tile < SLICE / 8; ++tile)
          if (tile * 8 < slice) dcn_mma_store_c(column_tile + (warp * 16 * LDC + tile * 8), LDC, acc[tile]);
      }
      __syncthreads();

      // 2. Offset and mask sums, and the input gradient.
      if (live && slope) {
        for (int c = part; c < slice; c += PARTS) {
          const float grad = column_tile[m * LDC + c];
          const Index plane = (n * s.channels + c0 + c) * plane_size;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (!corners[q].valid) continue;
            const Index at = plane + Index(corners[q].y) * s.width + corners[q].x;
            const float product = grad * to_compute(input[at]);
            grad_y += corners[q].d_dy * product;
            grad_x += corners[q].d_dx * product;
            grad_m += corners[q].weight * product;
            if (value) atomicAdd(grad_input + at, corners[q].weight * (grad * mask_m));
          }
        }
      }
      c0 += slice;
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

/// Weight gradient of the whole batch, or the part of pixel split `split`
/// of each unit.
///
/// grad_output:        (batch, O, Ho, Wo)
/// input:              (batch, C, H, W)
/// offset:             (batch, 2*G*K, Ho, Wo)
/// mask:               (batch, G*K, Ho, Wo), read only when has_mask
/// segments_per_group: the most offset groups any convolution group overlaps
/// splits:             pixel splits; split s sums pixels [s*split_pixels, (s+1)*split_pixels)
/// grad_weight:        (O, Cg, kh, kw), every element written when splits == 1
/// split_parts:        (splits, O*Cg*K) float32, every element written when splits > 1
template <typename T, typename Index>
__global__ void fused_backward_weight(const T* __restrict__ grad_output, const T* __restrict__ input,
                                      const T* __restrict__ offset, const T* __restrict__ mask,
                                      int has_mask, DCN_SHAPE_PARAMS, int out_channels,
                                      int segments_per_group, int splits, Index split_pixels,
                                      T* __restrict__ grad_weight, float* __restrict__ split_parts) {
  typedef FusedMma<T> Mma;
  typedef typename Mma::Element Element;
  constexpr int OUTS = kFusedWeightOutputs, SLICE = kFusedWeightSlice, PK = kFusedWeightPixels;
  constexpr int THREADS = kFusedWeightThreads, LD = fused_tile_stride<Element>(PK);
  static_assert(THREADS / 32 * 16 == OUTS, "each warp computes 16 output channels of a tile");
  DCN_SHARED(Element, output_tile, OUTS * LD);  // A: grad_output [output channel][pixel]
  DCN_SHARED(Element, column_tile, SLICE * LD);  // B: columns [channel][pixel]
  DCN_SHARED(Index, output_rows, PK);  // where a pixel's grad_output starts; -1 past the split
  DCN_SHARED(Index, input_planes, PK);  // where the pixel's image starts in the input
  DCN_SHARED(Index, corner_at, PK * 4);  // a corner's pixel in its plane; -1 when it counts 0
  DCN_SHARED(float, corner_weight, PK * 4);
  DCN_SHARED(float, point_mask, PK);

  const ConvShape s = DCN_SHAPE;
  const int K = s.kernel_h * s.kernel_w, L = s.out_h * s.out_w;
  const int Cg = s.channels / s.groups, Cog = s.channels / s.offset_groups, Og = out_channels / s.groups;
  const Index pixels = Index(s.batch) * L;
  const Index plane_size = Index(s.height) * s.width;
  const Index weight_size = Index(out_channels) * Cg * K;
  const int slices_per_segment = ((Cg < Cog ? Cg : Cog) + SLICE - 1) / SLICE;
  const int out_tiles = (Og + OUTS - 1) / OUTS;
  const Index units = Index(s.groups) * segments_per_group * slices_per_segment * K * out_tiles * splits;
  const int t = threadIdx.x, warp = t / 32, lane = dcn_lane();

  for (Index unit = blockIdx.x; unit < units; unit += gridDim.x) {
    Index rest = unit;
    const int split = static_cast<int>(rest % splits);
    rest /= splits;
    const int out_tile = static_cast<int>(rest % out_tiles);
    rest /= out_tiles;
    const int k = static_cast<int>(rest % K);
    rest /= K;
    const int slice_index = static_cast<int>(rest % slices_per_segment);
    rest /= slices_per_segment;
    const int segment = static_cast<int>(rest % segments_per_group);
    const int group = static_cast<int>(rest / segments_per_group);
    // The segment: channels of the group inside offset group g. Units past
    // the group's last segment or slice have nothing to do (the whole block
    // skips them).
    const int g = group * Cg / Cog + segment;
    const int segment_first = group * Cg > g * Cog ? group * Cg : g * Cog;
    const int segment_end = fused_min((group + 1) * Cg, (g + 1) * Cog);
    const int c0 = segment_first + slice_index * SLICE;
    if (g >= s.offset_groups || c0 >= segment_end) continue;
    const int slice = fused_min(segment_end - c0, SLICE);
    const int o0 = out_tile * OUTS, outs = fused_min(Og - o0, OUTS);
    const Index first_pixel = Index(split) * split_pixels;
    const Index end_pixel = pixels - first_pixel < split_pixels ? pixels : first_pixel + split_pixels;

    float acc[SLICE / 8][4] = {};
    for (Index p0 = first_pixel; p0 < end_pixel; p0 += PK) {
      __syncthreads();  // every warp is done with the tiles and points
      if (t < PK) {
        // The sampling point of pixel p0 + t: its corners that count, as deform_im2col sees them.
        const Index p = p0 + t;
        Index n = 0;
        int l = 0, y0 = 0, x0 = 0;
        float y, x, ly = 0.0f, lx = 0.0f;
        bool counts = false;
        if (p < end_pixel) {
          n = p / L;
          l = static_cast<int>(p % L);
          sampling_point(s, offset, n, g, k, l, y, x);
          counts = locate(y, x, s.height, s.width, y0, x0, ly, lx);
        }
        output_rows[t] = p < end_pixel ? n * out_channels * L + l : Index(-1);
        input_planes[t] = n * s.channels * plane_size;
        point_mask[t] = counts ? mask_value(s, mask, has_mask, n, g, k, l) : 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const Corner<float> c = corner(q, y0, x0, ly, lx, s.height, s.width);
          corner_at[t * 4 + q] = counts && c.valid ? Index(c.y) * s.width + c.x : Index(-1);
          corner_weight[t * 4 + q] = c.weight;
        }
      }
      __syncthreads();
      for (int e = t; e < OUTS * PK; e += THREADS) {
        const int i = e % PK, o = e / PK;  // consecutive threads: consecutive pixels
        const Index row = output_rows[i];
        output_tile[o * LD + i] = row >= 0 && o < outs
                                      ? Mma::operand(grad_output[row + Index(group * Og + o0 + o) * L])
                                      : Mma::operand(0.0f);
      }
      for (int e = t; e < SLICE * PK; e += THREADS) {
        const int i = e % PK, c = e / PK;
        float sample = 0.0f;
        if (c < slice) {
          const Index plane = input_planes[i] + Index(c0 + c) * plane_size;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const Index at = corner_at[i * 4 + q];
            if (at >= 0) sample += static_cast<float>(corner_weight[i * 4 + q]) * to_compute(input[plane + at]);
          }
          sample *= static_cast<float>(point_mask[i]);
        }
        column_tile[c * LD + i] = Mma::operand(sample);
      }
      __syncthreads();
      if (warp * 16 < outs)  // the pixels past the split are zeros: their steps are skipped
        fused_warp_product<Mma>(acc, output_tile + warp * 16 * LD, column_tile, LD,
                                end_pixel - p0 < PK ? static_cast<int>(end_pixel - p0) : PK, slice);
    }

    if (warp * 16 >= outs) continue;
#pragma unroll
    for (int tile = 0; tile < SLICE / 8; ++tile) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int row, col;
        dcn_mma_c_coord(lane, i, row, col);
        const int o = warp * 16 + row, c = tile * 8 + col;
        if (o >= outs || c >= slice) continue;
        const Index at = (Index(group * Og + o0 + o) * Cg + (c0 + c - group * Cg)) * K + k;
        if (splits == 1)
          store(grad_weight + at, acc[tile][i]);
        else
          split_parts[split * weight_size + at] = acc[tile][i];
      }
    }
  }
}

/// grad_weight[i] = the sum over s of split_parts[s][i], in split order,
/// rounded to T; size = O*Cg*K.
template <typename T, typename Index>
__global__ void fused_weight_split_sum(const float* __restrict__ split_parts, int splits, Index size,
                                       T* __restrict__ grad_weight) {
  DCN_GRID_STRIDE_LOOP(i, size) {
    float sum = split_parts[i];
    for (int split = 1; split < splits; ++split) sum += split_parts[split * size + i];
    store(grad_weight + i, sum);
  }
}
