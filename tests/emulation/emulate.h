// emulate.h: just enough of CUDA to run kernels/*.cu on the CPU.
//
//   qualifiers       __global__, __device__, __host__, __forceinline__, __restrict__
//   dim3, threadIdx, blockIdx, blockDim, gridDim
//   atomicAdd        a plain add (one thread runs at a time)
//   __float_as_uint, __uint_as_float
//   dcn_host_half_to_float, dcn_host_float_to_half   (what PTX cvt does on a GPU)
//   run_grid(kernel, grid, block, argv)              every thread of every block, in turn
//
// The kernels use no shared memory, no __syncthreads and no warp intrinsics,
// so running threads one after the other is an exact emulation of any
// schedule. argv follows cuLaunchKernel: argv[i] points to the i-th argument.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict


struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// g++ (12+, x86-64) converts _Float16 with round to nearest even, as cvt.rn does.
inline float dcn_host_half_to_float(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

inline unsigned short dcn_host_float_to_half(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  unsigned short bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

template <typename... Args, std::size_t... I>
void call_with_argv(void (*kernel)(Args...), void** argv, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(argv[I])...);
}

/// Run kernel<<<grid, block>>>(argv...) thread by thread.
template <typename... Args>
void run_grid(void (*kernel)(Args...), unsigned int grid, unsigned int block, void** argv) {
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{block, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    for (unsigned int t = 0; t < block; ++t) {
      blockIdx = dim3{b, 1, 1};
      threadIdx = dim3{t, 1, 1};
      call_with_argv(kernel, argv, std::index_sequence_for<Args...>{});
    }
  }
}
