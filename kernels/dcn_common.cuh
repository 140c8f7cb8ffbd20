// dcn_common.cuh: what every deformable-convolution kernel shares.
//
//   dcn_load, dcn_store, dcn_atomic_add, DcnCaller, dcn_reconverge
//                              global memory accesses (see below)
//   DCN_ARCH                   the architecture compiled for (__CUDA_ARCH__; the emulator's choice on the host)
//   DCN_BLOCK_THREADS          threads per block of the grid-stride launches (launch bounds)
//   dcn_half, dcn_bfloat16     2-byte storage types (bit patterns of IEEE half / bfloat16)
//   ComputeType<T>::type       float for float16, bfloat16 and float32; double for float64
//   to_compute(v)              storage value -> compute type
//   to_storage<T>(v)           compute value -> storage type, rounded to nearest even
//   dcn_bfloat16_bits(v)       float -> bfloat16 bits, rounded to nearest even (software; NaN -> 0x7fff)
//   store(p, v)                compute value -> *p, rounded to nearest even
//   dcn_floor(v)               floor in float or double
//   ConvShape, DCN_SHAPE_*     the geometry of one launch, passed as plain int arguments
//   DCN_GRID_STRIDE_LOOP       grid-stride loop over [0, total) in the index type
//   DCN_SHARED, DCN_SHARED_DYNAMIC, DCN_SHARED_PTR   shared memory (see below)
//   dcn_lane()                 lane of the calling thread in its warp
//   DCN_POINT_LOOP             warp-uniform loop over sampling points, a lane group each
//   point_element(...)         (n, g, k, l) of a sampling point, layout (batch, G, K, Ho*Wo)
//   column_point(...)          (n, l, k, g) of a sampling point, in the order of the column rows
//   sampling_point(...)        where kernel point k of output pixel l samples
//   mask_value(...)            its modulation (1 without a mask)
//   ChannelVector, ChannelsPerLane, channel_vectors_fit, aligned_for,
//   load_channels, column_index, load_column_block, store_column_block
//                              a lane's block of channels, by 16-byte vectors where they fit
//   DCN_VECTOR_RED, dcn_atomic_add(ChannelVector<float, 4>*, ...)
//                              4 floats added by one red.global.add.v4.f32 (sm_90 on)
//
// No CUDA header is included, on purpose: NVRTC then compiles these kernels
// with no include path at all (`python -m cudcn compile` works on any machine
// with NVRTC), and the host-emulation harness compiles the very same text with
// g++ under its cooperative emulator (tests/emulation/emulate.h).
#pragma once

// The architecture the code is compiled for, as __CUDA_ARCH__ writes it (800
// for sm_80): on the device __CUDA_ARCH__; on the host, the one the emulator
// was built to imitate (DCN_EMULATED_ARCH, tests/emulation/harness.py), else
// 0, which takes the paths every architecture has. Only choices that the
// emulator can run are made on it (the vector atomics); conversions by PTX
// instructions test __CUDA_ARCH__ itself, the host has its own.
#if defined(__CUDA_ARCH__)
#define DCN_ARCH __CUDA_ARCH__
#elif defined(DCN_EMULATED_ARCH)
#define DCN_ARCH DCN_EMULATED_ARCH
#else
#define DCN_ARCH 0
#endif

// Threads per block of the grid-stride launches (kernels.BLOCK in
// cudcn/backends/cuda/kernels.py, which a test keeps equal): the kernels'
// launch bounds promise no larger block.
#define DCN_BLOCK_THREADS 256

// Shared memory is declared through these macros: on the device they are
// plain __shared__ arrays; under the emulator (which defines them for the
// host) they are bounds-checked proxies that feed its race detector and its
// memory accounting. Index them only (tile[i]); DCN_SHARED_PTR(T) is the
// type of a pointer into them.
//
// Global memory is read, written and atomically added to through
// dcn_load(p, i) (p[i]; dcn_load(p) is *p), dcn_store(p, i, v) (p[i] = v;
// dcn_store(p, v) is *p = v) and dcn_atomic_add(p, v), of any element type,
// 16-byte vectors included: on the device each is the plain access it wraps,
// the same instruction; the emulator (tests/emulation/emulate.h) defines them
// for the host, where they also record the access, with its line, for the
// memory accounting (sectors per warp request). A helper that touches memory
// for its caller takes a defaulted DcnCaller last, so that the accounting
// names the kernel line that called it; dcn_reconverge() marks a step of a
// warp-uniform loop. On the device both are empty and compile to nothing.
#ifdef __CUDA_ARCH__
#define DCN_SHARED(type, name, count) __shared__ type name[count]
#define DCN_SHARED_DYNAMIC(type, name)                                   \
  extern __shared__ __align__(16) unsigned char dcn_dynamic_shared[];   \
  type* const name = reinterpret_cast<type*>(dcn_dynamic_shared)
#define DCN_SHARED_PTR(type) type*

template <typename T>
__device__ __forceinline__ T dcn_load(const T* p) { return *p; }
template <typename T, typename I>
__device__ __forceinline__ T dcn_load(const T* p, I i) { return p[i]; }
template <typename T>
__device__ __forceinline__ void dcn_store(T* p, const T& value) { *p = value; }
template <typename T, typename I>
__device__ __forceinline__ void dcn_store(T* p, I i, const T& value) { p[i] = value; }
template <typename T>
__device__ __forceinline__ T dcn_atomic_add(T* p, T value) { return atomicAdd(p, value); }
struct DcnCaller {};
__device__ __forceinline__ void dcn_reconverge() {}
#elif !defined(DCN_SHARED)
#error "on the host, include tests/emulation/emulate.h before the kernels"
#endif

/// IEEE binary16, as its bit pattern (NumPy float16 has the same layout).
struct dcn_half {
  unsigned short bits;
};

/// bfloat16 (the top half of a float32), as its bit pattern (ml_dtypes layout).
struct dcn_bfloat16 {
  unsigned short bits;
};

/// The type a kernel computes in: half types are widened to float.
template <typename T>
struct ComputeType {
  typedef float type;
};
template <>
struct ComputeType<double> {
  typedef double type;
};

/// Storage -> compute type.
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(dcn_bfloat16 v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}
__device__ __forceinline__ float to_compute(dcn_half v) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#else
  return dcn_host_half_to_float(v.bits);  // provided by the emulation shim
#endif
}

/// Compute type -> storage type T, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T to_storage(typename ComputeType<T>::type v);
template <>
__device__ __forceinline__ float to_storage<float>(float v) { return v; }
template <>
__device__ __forceinline__ double to_storage<double>(double v) { return v; }
/// float -> bfloat16 bits in software, as cvt.rn.bf16.f32 computes them: the
/// top half of the float rounded to nearest even (ties to the even half;
/// subnormals as they are; past the largest finite value, infinity), and
/// every NaN the canonical 0x7fff (rounding a NaN's bits could carry into
/// the exponent and make infinity). The path of sm_75 and of the host.
__device__ __forceinline__ unsigned short dcn_bfloat16_bits(float v) {
  const unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
template <>
__device__ __forceinline__ dcn_bfloat16 to_storage<dcn_bfloat16>(float v) {
  dcn_bfloat16 r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // One instruction (F2FP) where the software rounding takes about eight.
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#else
  r.bits = dcn_bfloat16_bits(v);
#endif
  return r;
}
template <>
__device__ __forceinline__ dcn_half to_storage<dcn_half>(float v) {
  dcn_half r;
#ifdef __CUDA_ARCH__
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#else
  r.bits = dcn_host_float_to_half(v);  // provided by the emulation shim
#endif
  return r;
}

/// *p = v rounded to T (global memory).
template <typename T>
__device__ __forceinline__ void store(T* p, typename ComputeType<T>::type v, DcnCaller = {}) {
  dcn_store(p, to_storage<T>(v));
}

/// floor in the compute type.
__device__ __forceinline__ float dcn_floor(float v) { return floorf(v); }
__device__ __forceinline__ double dcn_floor(double v) { return floor(v); }

/// Geometry of one launch. `batch` is the number of images in this launch
/// (a chunk of the call's batch); `groups` is the number of convolution groups
/// in the column layout (groups, batch, Ho*Wo, kh*kw, C/groups).
struct ConvShape {
  int batch, channels, height, width;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int out_h, out_w, offset_groups, groups;
};

// Shapes travel as kernel arguments (never pasted into the source, so that
// one compiled kernel serves every shape); the launcher passes them in this
// order.
#define DCN_SHAPE_PARAMS                                                       \
  int batch, int channels, int height, int width, int kernel_h, int kernel_w, \
      int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,  \
      int out_h, int out_w, int offset_groups, int groups
#define DCN_SHAPE                                                              \
  ConvShape {                                                                  \
    batch, channels, height, width, kernel_h, kernel_w, stride_h, stride_w,    \
        pad_h, pad_w, dil_h, dil_w, out_h, out_w, offset_groups, groups        \
  }

// The grid is capped, so one thread handles several elements. The launcher
// picks Index = int only when total plus one grid's worth of threads stays
// below 2^31, so the increment cannot overflow. (dcn_reconverge: each step
// starts with the warp's lanes together, for the emulator's accounting.)
#define DCN_GRID_STRIDE_LOOP(i, total)                                          \
  for (Index i = Index(blockIdx.x) * Index(blockDim.x) + Index(threadIdx.x);   \
       i < (total); i += Index(blockDim.x) * Index(gridDim.x), dcn_reconverge())

/// The sampling point `index` of the layout (batch, G, K, Ho*Wo) (that of the
/// mask): image n, offset group g, kernel point k, output pixel l.
template <typename Index>
__device__ __forceinline__ void point_element(const ConvShape& s, Index index, Index& n,
                                              int& g, int& k, int& l) {
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  l = static_cast<int>(index % L);
  index /= L;
  k = static_cast<int>(index % K);
  index /= K;
  g = static_cast<int>(index % s.offset_groups);
  n = index / s.offset_groups;
}

/// Lane of the calling thread in its warp (CUDA numbers threads x fastest,
/// then y, then z, and cuts warps of 32 from that order).
__device__ __forceinline__ int dcn_lane() {
  return static_cast<int>((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) & 31;
}

// Warp-uniform loop over `points` sampling points with a group of
// `group_lanes` lanes (a power of two up to 32) per point: each warp takes
// 32 / group_lanes consecutive points per step, `first` being its first, and
// a lane's point is first + lane / group_lanes. Every lane of a warp makes
// the same number of steps, so the body may use full-warp shuffles. Needs
// 1-D blocks of whole warps; the launcher keeps points plus one grid stride
// below the index type's range.
#define DCN_POINT_LOOP(first, points, group_lanes)                                         \
  for (Index first = (Index(blockIdx.x) * Index(blockDim.x) + Index(threadIdx.x)) / 32 *  \
                     Index(32 / (group_lanes));                                            \
       first < (points);                                                                   \
       first += Index(gridDim.x) * Index(blockDim.x) / Index(group_lanes), dcn_reconverge())

/// The sampling point `index` of the order (batch, Ho*Wo, K, G), offset group
/// fastest (the order of the column rows, so that neighbouring points write
/// neighbouring columns): image n, output pixel l, kernel point k, offset group g.
template <typename Index>
__device__ __forceinline__ void column_point(const ConvShape& s, Index index, Index& n, int& l,
                                             int& k, int& g) {
  g = static_cast<int>(index % s.offset_groups);
  index /= s.offset_groups;
  k = static_cast<int>(index % (s.kernel_h * s.kernel_w));
  index /= s.kernel_h * s.kernel_w;
  l = static_cast<int>(index % (s.out_h * s.out_w));
  n = index / (s.out_h * s.out_w);
}

/// Sampling point (y, x) of kernel point k of output pixel l of image n in
/// offset group g: the regular grid position plus the learned offset.
/// offset is (batch, 2*G*K, Ho, Wo); channel g*2K + 2k is the row shift.
template <typename T, typename Index, typename Acc>
__device__ __forceinline__ void sampling_point(const ConvShape& s, const T* offset,
                                               Index n, int g, int k, int l, Acc& y,
                                               Acc& x, DcnCaller = {}) {
  const int K = s.kernel_h * s.kernel_w;
  const int L = s.out_h * s.out_w;
  const int i = k / s.kernel_w, j = k % s.kernel_w;
  const int h = l / s.out_w, w = l % s.out_w;
  const Index at = ((n * s.offset_groups + g) * 2 * K + 2 * k) * L + l;
  y = Acc(h * s.stride_h - s.pad_h + i * s.dil_h) + to_compute(dcn_load(offset, at));
  x = Acc(w * s.stride_w - s.pad_w + j * s.dil_w) + to_compute(dcn_load(offset, at + L));
}

/// Modulation of kernel point k of output pixel l of image n in offset group
/// g; mask is (batch, G*K, Ho, Wo) and is not read when has_mask is 0.
template <typename T, typename Index>
__device__ __forceinline__ typename ComputeType<T>::type mask_value(
    const ConvShape& s, const T* mask, int has_mask, Index n, int g, int k, int l, DcnCaller = {}) {
  typedef typename ComputeType<T>::type Acc;
  if (!has_mask) return Acc(1);
  const int K = s.kernel_h * s.kernel_w;
  return to_compute(dcn_load(mask, ((n * s.offset_groups + g) * K + k) * Index(s.out_h * s.out_w) + l));
}

// A lane handles a block of consecutive channels of one sampling point: 16
// bytes of the wider of the input and column types (4 float32, 2 float64, 8
// float16 or bfloat16). When every block lies inside one offset group and
// one convolution group and the arrays are aligned, a block moves
// as one vector load or store; otherwise channel by channel. Either way a
// lane sees the same channels in the same order, so sums do not depend on
// the path taken.

/// Channels per lane block for input type T and column type TCol.
template <typename T, typename TCol>
struct ChannelsPerLane {
  static constexpr int value = 16 / (sizeof(T) > sizeof(TCol) ? sizeof(T) : sizeof(TCol));
};

/// V consecutive values that one load or store moves.
template <typename T, int V>
struct alignas(sizeof(T) * V) ChannelVector {
  T v[V];
};

/// Whether blocks of V channels never straddle an offset group or a
/// convolution group (then, with aligned arrays, they are vectors).
template <int V>
__device__ __forceinline__ bool channel_vectors_fit(const ConvShape& s) {
  return (s.channels / s.offset_groups) % V == 0 && (s.channels / s.groups) % V == 0;
}

/// Whether p is aligned for a vector of V elements.
template <int V, typename T>
__device__ __forceinline__ bool aligned_for(const T* p) {
  return reinterpret_cast<unsigned long long>(p) % (sizeof(T) * V) == 0;
}

// Vector reductions: from sm_90 (PTX ISA 8.1) red.global.add.v4.f32 adds 4
// consecutive floats in one instruction; a warp's request of 32 lanes x 16
// bytes then takes the sectors of its 512 bytes, as 4 scalar requests would,
// in a quarter of the instructions. The emulator imitates it when built for
// sm_90 (DCN_ARCH), so both paths run against NumPy.
#define DCN_VECTOR_RED (DCN_ARCH >= 900)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/// *p += value element by element, one vector reduction (red: no old value
/// comes back). p: 16-byte aligned, in global memory.
__device__ __forceinline__ void dcn_atomic_add(ChannelVector<float, 4>* p, const ChannelVector<float, 4>& value) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)),
               "f"(value.v[0]), "f"(value.v[1]), "f"(value.v[2]), "f"(value.v[3])
               : "memory");
}
#endif

/// values[v] = p[v] for v < count, 0 beyond; one vector load when `vector`
/// (then count is V and p aligned).
template <int V, typename T, typename Acc>
__device__ __forceinline__ void load_channels(const T* p, int count, bool vector, Acc (&values)[V],
                                              DcnCaller = {}) {
  if (vector) {
    const ChannelVector<T, V> x = dcn_load(reinterpret_cast<const ChannelVector<T, V>*>(p));
#pragma unroll
    for (int v = 0; v < V; ++v) values[v] = to_compute(x.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) values[v] = v < count ? to_compute(dcn_load(p, v)) : Acc(0);
  }
}

/// Position of (image n, output pixel l, kernel point k, channel c) in the
/// column layout (groups, batch, Ho*Wo, K, C/groups).
template <typename Index>
__device__ __forceinline__ Index column_index(const ConvShape& s, Index n, int l, int k, int c) {
  const int group_channels = s.channels / s.groups;
  const int K = s.kernel_h * s.kernel_w;
  return (((Index(c / group_channels) * s.batch + n) * (s.out_h * s.out_w) + l) * K + k) *
             group_channels + c % group_channels;
}

/// values[v] = column (n, l, k, c + v) for v < count, 0 beyond.
template <int V, typename TCol, typename Index, typename Acc>
__device__ __forceinline__ void load_column_block(const ConvShape& s, const TCol* columns, Index n,
                                                  int l, int k, int c, int count, bool vector,
                                                  Acc (&values)[V], DcnCaller = {}) {
  if (vector) {
    load_channels<V>(columns + column_index(s, n, l, k, c), V, true, values);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      values[v] = v < count ? to_compute(dcn_load(columns, column_index(s, n, l, k, c + v))) : Acc(0);
  }
}

/// column (n, l, k, c + v) = values[v] for v < count, rounded to TCol.
template <int V, typename TCol, typename Index, typename Acc>
__device__ __forceinline__ void store_column_block(const ConvShape& s, TCol* columns, Index n, int l,
                                                   int k, int c, int count, bool vector,
                                                   const Acc (&values)[V], DcnCaller = {}) {
  if (vector) {
    ChannelVector<TCol, V> x;
#pragma unroll
    for (int v = 0; v < V; ++v) x.v[v] = to_storage<TCol>(values[v]);
    dcn_store(reinterpret_cast<ChannelVector<TCol, V>*>(columns + column_index(s, n, l, k, c)), x);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v < count) store(columns + column_index(s, n, l, k, c + v), values[v]);
  }
}
