// cooperative_kernels.cu: small kernels that exercise the cooperative
// emulator (tests/test_emulator.py); `bug` plants a mistake the emulator,
// or the comparison with NumPy it makes possible, must catch.
//
//   thread_coordinates        every thread writes its block, thread, lane and warp (x, y, z dims)
//   block_reverse             reverse each block's slice through shared memory, static or dynamic
//                             (bug 1: no __syncthreads; bug 2: shared index off by one)
//   warp_sum<T>               each warp's sum by a __shfl_xor_sync or __shfl_down_sync tree
//                             (bug 1: a wrong source lane)
//   warp_shared_sum           a warp's tree sum in shared memory, ordered by __syncwarp
//                             (bug 1: no __syncwarp; bug 2: __syncwarp of half the warp)
//   shuffle_probe             shuffles with widths and partial masks, votes: one value each
//   misuse                    barriers and collectives used as CUDA forbids, one way per `bug`
//   mma_fragments<Kind>       one MMA from registers filled by (lane, register): the layouts
//   mma_matmul<Kind>          C = A B^T from m16n8 tiles staged in shared memory
//                             (bug 1: A fragment mapped wrongly; bug 2: no barrier before the next k step)
//   memory_pattern<V>         one warp's global load, store and atomics and shared store and load at
//                             lane strides, for the memory accounting's hand-counted cases
//   round_to_storage<T>       to_storage<T> of each float (kernels/dcn_common.cuh): the host's and
//                             each architecture's conversions, compared bit for bit
//   ldmatrix_probe<Trans>     one warp's ldmatrix.x4 (.trans) from rows it chooses
//                             (bug 1: a lane gives the next row; bug 2: .trans the other way)
//   async_copy                cp.async into shared memory, two groups, waits and a barrier, read back
//                             (bug 1: read before the wait; 2: exit unwaited; 3: no barrier before
//                             reading another thread's bytes; 4: waits for the older group only)
// Kind: 0 float16, 1 bfloat16 (m16n8k16), 2 tf32 (m16n8k8).
#include "dcn_mma.cuh"

/// out[t * 8 + ...] = blockIdx, threadIdx, lane, warp of global thread t
/// (blocks numbered x fastest, threads likewise).
__global__ void thread_coordinates(int* out) {
  const int in_block = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  int* mine = out + (block * blockDim.x * blockDim.y * blockDim.z + in_block) * 8;
  mine[0] = blockIdx.x;
  mine[1] = blockIdx.y;
  mine[2] = blockIdx.z;
  mine[3] = threadIdx.x;
  mine[4] = threadIdx.y;
  mine[5] = threadIdx.z;
  mine[6] = dcn_lane();
  mine[7] = in_block / 32;
}

/// out[b*B + t] = in[b*B + B-1-t] (0 past n), through a shared tile of
/// B = blockDim.x floats: the static one (B <= 128) or the dynamic one.
__global__ void block_reverse(const float* in, float* out, int n, int dynamic, int bug) {
  DCN_SHARED(float, fixed, 128);
  DCN_SHARED_DYNAMIC(float, sized);
  DCN_SHARED_PTR(float) tile = dynamic ? sized : fixed;
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  tile[t] = base + t < n ? in[base + t] : 0.0f;
  if (bug != 1) __syncthreads();
  const int from = bug == 2 ? blockDim.x - t : blockDim.x - 1 - t;
  const float value = tile[from];
  if (base + t < n) out[base + t] = value;
}

/// out[w] = sum of the 32 values of warp w; with use_xor every lane of the
/// warp ends with the sum, written to all_lanes.
template <typename T>
__global__ void warp_sum(const T* in, T* out, T* all_lanes, int use_xor, int bug) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  T v = in[i];
  for (int d = 16; d > 0; d /= 2) {
    const int step = bug == 1 && d == 4 ? 3 : d;
    v += use_xor ? __shfl_xor_sync(0xffffffffu, v, step) : __shfl_down_sync(0xffffffffu, v, step);
  }
  all_lanes[i] = v;
  if (dcn_lane() == 0) out[i / 32] = v;
}

/// out[w] = sum of warp w's values, by a tree in shared memory (blocks of
/// up to 4 warps).
__global__ void warp_shared_sum(const float* in, float* out, int bug) {
  DCN_SHARED(float, partial, 128);
  const int lane = dcn_lane(), warp = threadIdx.x / 32;
  const unsigned sync_mask = bug == 2 ? 0x0000ffffu : 0xffffffffu;
  DCN_SHARED_PTR(float) mine = partial + warp * 32;
  mine[lane] = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int d = 16; d > 0; d /= 2) {
    if (bug != 1 && ((sync_mask >> lane) & 1u)) __syncwarp(sync_mask);
    float sum = 0.0f;
    if (lane < d) sum = static_cast<float>(mine[lane]) + static_cast<float>(mine[lane + d]);
    if (bug != 1 && ((sync_mask >> lane) & 1u)) __syncwarp(sync_mask);
    if (lane < d) mine[lane] = sum;
  }
  if (bug != 1 && ((sync_mask >> lane) & 1u)) __syncwarp(sync_mask);
  if (lane == 0) out[blockIdx.x * (blockDim.x / 32) + warp] = mine[0];
}

/// Ten results per thread of one warp, from in[lane]: see tests/test_emulator.py.
__global__ void shuffle_probe(const int* in, int* out) {
  const int lane = dcn_lane();
  const int v = in[lane];
  int* mine = out + lane * 10;
  mine[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) & 31);
  mine[1] = __shfl_sync(0xffffffffu, v, lane + 5, 8);
  mine[2] = __shfl_up_sync(0xffffffffu, v, 3, 16);
  mine[3] = __shfl_down_sync(0xffffffffu, v, 5, 16);
  mine[4] = __shfl_xor_sync(0xffffffffu, v, 9, 16);
  mine[5] = __shfl_xor_sync(0xffffffffu, v, 16, 16);
  mine[6] = static_cast<int>(__ballot_sync(0xffffffffu, v % 3 == 0));
  if (lane % 2 == 0)
    mine[7] = __shfl_sync(0x55555555u, v, lane ^ 2);
  else
    mine[7] = __shfl_sync(0xaaaaaaaau, v, lane - 1);  // an even lane: outside this mask
  mine[8] = __all_sync(0xffffffffu, v >= 0);
  mine[9] = __any_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, v == 7);
}

/// Barriers and collectives used as CUDA forbids; each `bug` must stop the launch.
__global__ void misuse(float* out, int bug) {
  DCN_SHARED(float, tile, 64);
  const int lane = dcn_lane();
  float v = static_cast<float>(threadIdx.x);
  if (bug == 1) {  // threads at different barriers
    if (threadIdx.x < 16)
      __syncthreads();
    else
      __syncthreads();
  }
  if (bug == 2) {  // a barrier after some threads returned
    if (threadIdx.x == 5) return;
    __syncthreads();
  }
  if (bug == 3) v = __shfl_sync(0x1u, v, 0);  // lanes other than 0 are not in their mask
  if (bug == 4) {  // half the warp shuffles, half votes
    if (lane < 16)
      v = __shfl_sync(0xffffffffu, v, 0);
    else
      v = static_cast<float>(__ballot_sync(0xffffffffu, 1));
  }
  if (bug == 5) {  // a named lane exited
    if (lane == 31) return;
    v = __shfl_sync(0xffffffffu, v, 0);
  }
  if (bug == 6) {  // an MMA needs the whole warp: blocks of 48 threads have half a warp
    float d[4] = {0, 0, 0, 0};
    const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    dcn_mma_m16n8k16_f16(d, a, b, d);
    v = d[0];
  }
  if (bug == 7) {  // a reference to a shared element kept across a barrier
    tile[threadIdx.x % 64] = v;
    __syncthreads();
    auto kept = tile[(threadIdx.x + 1) % 64];
    __syncthreads();
    v = kept;
  }
  if (bug == 8) {  // a tf32 operand that was not rounded
    float d[4] = {0, 0, 0, 0};
    const unsigned a[4] = {__float_as_uint(1.1f), 0, 0, 0}, b[2] = {0, 0};
    dcn_mma_m16n8k8_tf32(d, a, b, d);
    v = d[0];
  }
  if (bug == 9) {  // three lanes each wait for the next in a different shuffle: a cycle
    if (lane == 0) v = __shfl_sync(0x3u, v, 1);
    if (lane == 1) v = __shfl_sync(0x6u, v, 2);
    if (lane == 2) v = __shfl_sync(0x5u, v, 0);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

template <int Kind>
__device__ __forceinline__ void mma_of_kind(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                            const float (&c)[4]) {
  if constexpr (Kind == 0) dcn_mma_m16n8k16_f16(d, a, b, c);
  if constexpr (Kind == 1) dcn_mma_m16n8k16_bf16(d, a, b, c);
  if constexpr (Kind == 2) dcn_mma_m16n8k8_tf32(d, a, b, c);
}

/// One warp: d = mma(a, b, c) from registers a_regs[lane*4 + r],
/// b_regs[lane*2 + r], c_regs[lane*4 + i]; d_regs likewise.
template <int Kind>
__global__ void mma_fragments(const unsigned* a_regs, const unsigned* b_regs, const float* c_regs,
                              float* d_regs) {
  const int lane = dcn_lane();
  unsigned a[4], b[2];
  float c[4], d[4];
  for (int r = 0; r < 4; ++r) a[r] = a_regs[lane * 4 + r];
  for (int r = 0; r < 2; ++r) b[r] = b_regs[lane * 2 + r];
  for (int i = 0; i < 4; ++i) c[i] = c_regs[lane * 4 + i];
  mma_of_kind<Kind>(d, a, b, c);
  for (int i = 0; i < 4; ++i) d_regs[lane * 4 + i] = d[i];
}

template <int Kind>
struct MatmulTypes {
  typedef unsigned short Element;  // float16 / bfloat16 bit patterns
  static constexpr int depth = 16;
};
template <>
struct MatmulTypes<2> {
  typedef float Element;
  static constexpr int depth = 8;
};

/// c (M, N) = a (M, K) b (N, K)^T, all row-major; blocks of 2 warps
/// (blockDim (32, 2)) on a grid (N/16, M/16): warp w computes the 16x8 tile
/// at rows 16*blockIdx.y, columns 16*blockIdx.x + 8*w, one k step of depth
/// 16 (8 for tf32) at a time, both operands staged in shared memory.
template <int Kind>
__global__ void mma_matmul(const typename MatmulTypes<Kind>::Element* a,
                           const typename MatmulTypes<Kind>::Element* b, float* c, int M, int N, int K,
                           int bug) {
  typedef typename MatmulTypes<Kind>::Element Element;
  constexpr int depth = MatmulTypes<Kind>::depth;
  DCN_SHARED(Element, a_tile, 16 * depth);  // rows of A, row-major
  DCN_SHARED(Element, b_tile, 16 * depth);  // rows of b (columns of B), row-major
  const int t = threadIdx.y * 32 + threadIdx.x, warp = threadIdx.y, lane = dcn_lane();
  const int row0 = blockIdx.y * 16, col0 = blockIdx.x * 16;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k0 = 0; k0 < K; k0 += depth) {
    for (int e = t; e < 16 * depth; e += 64) {
      a_tile[e] = a[(row0 + e / depth) * K + k0 + e % depth];
      b_tile[e] = b[(col0 + e / depth) * K + k0 + e % depth];
    }
    __syncthreads();
    unsigned fa[4], fb[2];
    if constexpr (Kind == 2) {
      dcn_mma_load_a8_tf32(fa, a_tile, depth);
      dcn_mma_load_b8_tf32(fb, b_tile + warp * 8 * depth, depth);
    } else {
      dcn_mma_load_a16(fa, a_tile, depth);
      dcn_mma_load_b16_col(fb, b_tile + warp * 8 * depth, depth);
      if (bug == 1) {  // registers 1 and 3 hold rows group + 8: take rows group instead
        const int row = dcn_mma_group(lane), col = 2 * dcn_mma_thread(lane);
        fa[1] = dcn_pack_half2(a_tile[row * depth + col], a_tile[row * depth + col + 1]);
        fa[3] = dcn_pack_half2(a_tile[row * depth + col + 8], a_tile[row * depth + col + 9]);
      }
    }
    mma_of_kind<Kind>(acc, fa, fb, acc);
    if (bug != 2) __syncthreads();
  }
  dcn_mma_store_c(c + row0 * N + col0 + warp * 8, N, acc);
}

/// One warp; V floats (4, 8 or 16 bytes) per lane and access, lane l at
/// element l * stride of vectors (stride 0: every lane at element 0):
///   out[l * stride] = in[l * stride]              a global load and a store
///   tile[l * shared_stride] = x (stride 0: tile[l]), then tile[l * shared_stride] read
///                                                 a shared store and a load
///   sums: with per_lane, lane l adds 1 to floats 4l .. 4l + 3 in turn (a lane
///   owns 4 consecutive floats); else float 32v + l in step v (lanes interleaved)
template <int V>
__global__ void memory_pattern(const float* in, float* out, float* sums, int stride, int shared_stride,
                               int per_lane) {
  typedef ChannelVector<float, V> Vector;
  DCN_SHARED(Vector, tile, 32 * 32);
  const int lane = dcn_lane();
  const Vector x = dcn_load(reinterpret_cast<const Vector*>(in), lane * stride);
  dcn_store(reinterpret_cast<Vector*>(out), lane * stride, x);
  for (int v = 0; v < 4; ++v) dcn_atomic_add(sums + (per_lane ? 4 * lane + v : 32 * v + lane), 1.0f);
  tile[lane * (shared_stride > 0 ? shared_stride : 1)] = x;
  __syncwarp();
  const Vector y = tile[lane * shared_stride];
  dcn_store(reinterpret_cast<Vector*>(out), 32 * 32 + lane, y);
}

/// out[i] = to_storage<T>(in[i]) (bits of dcn_half or dcn_bfloat16) for i < n.
template <typename T>
__global__ void round_to_storage(const float* in, T* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    out[i] = to_storage<T>(in[i]);
}

/// One warp: out[lane * 4 + m] = register m of an ldmatrix.x4 (.trans when
/// Trans) from a shared tile of 64 rows of 8 16-bit elements (tile_words, 4
/// words a row), lane l passing row rows[l].
template <int Trans>
__global__ void ldmatrix_probe(const unsigned* tile_words, const int* rows, unsigned* out, int bug) {
  DCN_SHARED(unsigned, tile, 64 * 4);
  const int lane = dcn_lane();
  for (int i = lane; i < 64 * 4; i += 32) tile[i] = tile_words[i];
  __syncwarp();
  const int row = bug == 1 && lane % 8 == 3 ? rows[lane + 1] : rows[lane];
  unsigned r[4];
  if ((Trans != 0) != (bug == 2))
    dcn_ldmatrix_x4_trans(r, tile + 4 * row);
  else
    dcn_ldmatrix_x4(r, tile + 4 * row);
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

/// One block: thread t copies words 4t .. 4t + 3 of `in` (zeros instead
/// where t % 5 == 4) into a shared tile by cp.async in two groups (the first
/// half of the threads' copies in the first), waits for both, and after a
/// barrier writes the 16 bytes of thread (t + 1) % n to out[4t ..]. `bug`:
/// 1 reads its own bytes before the wait; 2 exits without waiting; 3 no barrier before
/// reading the neighbour's bytes; 4 waits for the older group only.
__global__ void async_copy(const unsigned* in, unsigned* out, int bug) {
  DCN_SHARED(unsigned, tile, 4 * 128);
  const int t = threadIdx.x, n = blockDim.x;
  DCN_SHARED_PTR(unsigned) mine = tile + 4 * t;
  if (t < n / 2) dcn_cp_async_16(mine, in + 4 * t, t % 5 != 4);
  dcn_cp_async_commit();
  if (t >= n / 2) dcn_cp_async_16(mine, in + 4 * t, t % 5 != 4);
  dcn_cp_async_commit();
  if (bug == 1) out[4 * t] = mine[0];
  if (bug == 2) return;
  if (bug == 4)
    dcn_cp_async_wait<1>();
  else
    dcn_cp_async_wait<0>();
  if (bug != 3) __syncthreads();
  const DcnChunk value = dcn_shared_cast<DcnChunk>(tile + 4 * ((t + 1) % n))[0];
  for (int w = 0; w < 4; ++w) out[4 * t + w] = value.w[w];
  if (bug == 4) dcn_cp_async_wait<0>();
}
