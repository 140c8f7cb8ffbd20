// dcn_mma.cuh: tensor-core MMA wrappers and their fragment layouts.
//
//   dcn_mma_m16n8k16_f16(d, a, b, c)    D = A B + C; A 16x16, B 16x8 float16; C, D 16x8 float32
//   dcn_mma_m16n8k16_bf16(d, a, b, c)   the same with bfloat16 A and B
//   dcn_mma_m16n8k8_tf32(d, a, b, c)    A 16x8, B 8x8 tf32 (see dcn_to_tf32); C, D float32
//   dcn_to_tf32(v)                      float32 -> tf32 bit pattern, rounded to nearest, ties away
//   dcn_pack_half2(low, high)           two 16-bit patterns -> one .f16x2 / .bf16x2 register
//   dcn_mma_a16_coord, dcn_mma_b16_coord, dcn_mma_a8_tf32_coord, dcn_mma_b8_tf32_coord,
//   dcn_mma_c_coord                     (row, col) of element i of a lane's fragment
//   dcn_mma_load_a16, dcn_mma_load_b16_col, dcn_mma_load_b16_row, dcn_mma_load_a8_tf32,
//   dcn_mma_load_b8_tf32, dcn_mma_store_c   fragments from and to tiles in memory
//   DcnChunk, dcn_shared_cast<U>(p)     16 bytes; a shared-memory pointer as another element type
//   dcn_ldmatrix_x4(r, row), dcn_ldmatrix_x4_trans(r, row)
//                                       ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 (sm_75 and newer)
//   dcn_cp_async_16(dst, src, fill), dcn_cp_async_commit(), dcn_cp_async_wait<N>()
//                                       cp.async.cg 16 bytes global -> shared, its groups (sm_80 and
//                                       newer; a plain load and store before)
//
// Fragment layouts, from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type", "Matrix Fragments for mma.m16n8k8"), with
// group = lane >> 2 and thread = lane % 4, for element i of a lane's fragment:
//   m16n8k16 A (i < 8)        row = group + 8*((i >> 1) & 1)   col = 2*thread + (i & 1) + 8*(i >> 2)
//   m16n8k16 B (i < 4)        row = 2*thread + (i & 1) + 8*(i >> 1)   col = group
//   m16n8k8 tf32 A (i < 4)    row = group + 8*(i & 1)          col = thread + 4*(i >> 1)
//   m16n8k8 tf32 B (i < 2)    row = thread + 4*i               col = group
//   C and D, both (i < 4)     row = group + 8*(i >> 1)         col = 2*thread + (i & 1)
// 16-bit elements come in pairs: register r holds elements 2r (low half) and
// 2r + 1 (high half). tf32 and float32 elements take a register each.
//
// On the device each wrapper is one inline-PTX mma.sync (no CUDA header, so
// NVRTC needs no include path). The f16 m16n8k16 needs sm_80; on sm_75 it is
// two m16n8k8, whose A and B fragments are exactly the first and second
// halves of the k16 registers. The bf16 and tf32 MMAs need sm_80: on older
// GPUs they trap, and launchers must not choose kernels that use them there.
//
// ldmatrix moves 16-bit elements; it serves 32-bit (tf32) fragments too: the
// two 16-bit elements a lane receives of a row are one 32-bit word of it
// (word l % 4 of row l / 4), exactly the m16n8k8 tf32 A and B layouts below
// with 8 rows of 4 words a matrix.
//
// On the host (under tests/emulation/emulate.h) each wrapper is a warp
// collective of all 32 lanes (mask 0xffffffff: mma.sync.aligned needs the
// whole warp, converged): the last lane to arrive assembles A, B and C from
// every lane's registers by the layouts above, computes each dot product in
// double and rounds it once to float32, and hands each lane its fragment of
// D. Tensor cores sum in an unspecified order and internal precision, so
// tests compare with a tolerance. A tf32 operand with any of its low 13 bits
// set is an error there: a kernel must round with dcn_to_tf32, so that what
// the GPU computes does not depend on how it treats those bits.
#pragma once

#include "dcn_common.cuh"

/// 16 bytes: a vector of four 32-bit words (a row of an 8x8 16-bit matrix, one
/// cp.async, one 16-byte shared-memory access).
struct alignas(16) DcnChunk {
  unsigned w[4];
};

#ifdef __CUDA_ARCH__
/// A pointer into shared memory as a pointer to U (the emulator defines its own).
template <typename U, typename T>
__device__ __forceinline__ U* dcn_shared_cast(T* p) {
  return reinterpret_cast<U*>(p);
}

/// The shared-memory address (state space .shared) of a generic pointer into it.
__device__ __forceinline__ unsigned dcn_shared_address(const void* p) {
  unsigned address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(p));
  return address;
}
#endif

/// Lane group (lane >> 2) and thread in group (lane % 4), as the PTX ISA names them.
__device__ __forceinline__ int dcn_mma_group(int lane) { return lane >> 2; }
__device__ __forceinline__ int dcn_mma_thread(int lane) { return lane & 3; }

/// m16n8k16 A (16x16): element i (0..7) of `lane` is A[row][col].
__device__ __forceinline__ void dcn_mma_a16_coord(int lane, int i, int& row, int& col) {
  row = dcn_mma_group(lane) + 8 * ((i >> 1) & 1);
  col = 2 * dcn_mma_thread(lane) + (i & 1) + 8 * (i >> 2);
}

/// m16n8k16 B (16x8): element i (0..3) of `lane` is B[row][col].
__device__ __forceinline__ void dcn_mma_b16_coord(int lane, int i, int& row, int& col) {
  row = 2 * dcn_mma_thread(lane) + (i & 1) + 8 * (i >> 1);
  col = dcn_mma_group(lane);
}

/// m16n8k8 tf32 A (16x8): element i (0..3) of `lane` is A[row][col].
__device__ __forceinline__ void dcn_mma_a8_tf32_coord(int lane, int i, int& row, int& col) {
  row = dcn_mma_group(lane) + 8 * (i & 1);
  col = dcn_mma_thread(lane) + 4 * (i >> 1);
}

/// m16n8k8 tf32 B (8x8): element i (0..1) of `lane` is B[row][col].
__device__ __forceinline__ void dcn_mma_b8_tf32_coord(int lane, int i, int& row, int& col) {
  row = dcn_mma_thread(lane) + 4 * i;
  col = dcn_mma_group(lane);
}

/// C and D (16x8, float32) of both shapes: element i (0..3) of `lane` is C[row][col].
__device__ __forceinline__ void dcn_mma_c_coord(int lane, int i, int& row, int& col) {
  row = dcn_mma_group(lane) + 8 * (i >> 1);
  col = 2 * dcn_mma_thread(lane) + (i & 1);
}

/// Two 16-bit patterns (float16 or bfloat16) -> one register; `low` is the
/// element with the smaller index.
__device__ __forceinline__ unsigned dcn_pack_half2(unsigned short low, unsigned short high) {
  return static_cast<unsigned>(low) | (static_cast<unsigned>(high) << 16);
}

/// float32 -> tf32 (the top 19 bits), rounded to nearest with ties away from
/// zero as cvt.rna.tf32.f32 does; infinities stay, a NaN stays a NaN.
__device__ __forceinline__ unsigned dcn_to_tf32(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(v));
  return bits;
#else
  unsigned bits = __float_as_uint(v);
  if ((bits & 0x7f800000u) == 0x7f800000u) return (bits & 0x007fffffu) ? 0x7fffe000u : bits;
  return (bits + 0x1000u) & 0xffffe000u;
#endif
}

#ifndef __CUDA_ARCH__
namespace dcn_emu {

enum class MmaType { f16, bf16, tf32 };

struct MmaOperands {
  unsigned a[4];
  unsigned b[2];
  float c[4];
};

struct MmaResult {
  float d[4];
};

/// Element i of a fragment held in `registers`, as a float.
inline float mma_element(const char* op, MmaType type, const unsigned* registers, int i, int lane,
                         const char* operand) {
  if (type == MmaType::tf32) {
    const unsigned bits = registers[i];
    if (bits & 0x1fffu)
      fail(std::string(op) + ": lane " + std::to_string(lane) + " passes " + operand + " element " +
           std::to_string(i) + " = " + hex(bits) + ", not a tf32 value (low 13 bits set): round with dcn_to_tf32");
    return __uint_as_float(bits);
  }
  const unsigned short half = static_cast<unsigned short>(registers[i >> 1] >> (16 * (i & 1)));
  return type == MmaType::f16 ? dcn_host_half_to_float(half) : __uint_as_float(static_cast<unsigned>(half) << 16);
}

/// One m16n8k16 (f16, bf16) or m16n8k8 (tf32) MMA of the calling warp.
inline void mma(const char* op, MmaType type, float (&d)[4], const unsigned* a, const unsigned* b,
                const float (&c)[4]) {
  const bool tf32 = type == MmaType::tf32;
  MmaOperands in{};
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  const MmaResult out = warp_collective<MmaResult>(
      op, 0xffffffffu, 0, in, [op, type, tf32](const MmaOperands* ins, MmaResult* outs, unsigned) {
        const int depth = tf32 ? 8 : 16;
        double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
        for (int lane = 0; lane < kWarp; ++lane) {
          int row, col;
          for (int i = 0; i < (tf32 ? 4 : 8); ++i) {
            if (tf32)
              dcn_mma_a8_tf32_coord(lane, i, row, col);
            else
              dcn_mma_a16_coord(lane, i, row, col);
            A[row][col] = mma_element(op, type, ins[lane].a, i, lane, "A");
          }
          for (int i = 0; i < (tf32 ? 2 : 4); ++i) {
            if (tf32)
              dcn_mma_b8_tf32_coord(lane, i, row, col);
            else
              dcn_mma_b16_coord(lane, i, row, col);
            B[row][col] = mma_element(op, type, ins[lane].b, i, lane, "B");
          }
          for (int i = 0; i < 4; ++i) {
            dcn_mma_c_coord(lane, i, row, col);
            C[row][col] = ins[lane].c[i];
          }
        }
        for (int lane = 0; lane < kWarp; ++lane)
          for (int i = 0; i < 4; ++i) {
            int row, col;
            dcn_mma_c_coord(lane, i, row, col);
            double sum = C[row][col];
            for (int k = 0; k < depth; ++k) sum += A[row][k] * B[k][col];
            outs[lane].d[i] = static_cast<float>(sum);
          }
      });
  std::memcpy(d, out.d, sizeof d);
}

}  // namespace dcn_emu
#endif

/// D = A B + C for one warp: A 16x16 and B 16x8 float16 (4 and 2 registers
/// of pairs), C and D 16x8 float32 (d may be c).
__device__ __forceinline__ void dcn_mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4],
                                                     const unsigned (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  float half_done[4];  // k = 0..7, then k = 8..15 on top
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%7, %8, %9, %10};"
      : "=f"(half_done[0]), "=f"(half_done[1]), "=f"(half_done[2]), "=f"(half_done[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%7, %8, %9, %10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[2]), "r"(a[3]), "r"(b[1]),
        "f"(half_done[0]), "f"(half_done[1]), "f"(half_done[2]), "f"(half_done[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#else
  dcn_emu::mma("mma.m16n8k16.f16", dcn_emu::MmaType::f16, d, a, b, c);
#endif
}

/// D = A B + C for one warp with bfloat16 A and B (sm_80 and newer).
__device__ __forceinline__ void dcn_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4],
                                                      const unsigned (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#else
  dcn_emu::mma("mma.m16n8k16.bf16", dcn_emu::MmaType::bf16, d, a, b, c);
#endif
}

/// D = A B + C for one warp: A 16x8 and B 8x8 tf32 (from dcn_to_tf32), C and
/// D 16x8 float32 (sm_80 and newer).
__device__ __forceinline__ void dcn_mma_m16n8k8_tf32(float (&d)[4], const unsigned (&a)[4],
                                                     const unsigned (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#else
  dcn_emu::mma("mma.m16n8k8.tf32", dcn_emu::MmaType::tf32, d, a, b, c);
#endif
}

// Loading and storing fragments. `tile` is a pointer to 16-bit patterns
// (unsigned short) or floats, in global memory or shared memory
// (DCN_SHARED_PTR; dcn_load and dcn_store take either); `ld` is its leading
// dimension in elements.

/// m16n8k16 A fragment of this lane from a row-major tile: A[r][c] = tile[r*ld + c].
template <typename Tile>
__device__ __forceinline__ void dcn_mma_load_a16(unsigned (&a)[4], Tile tile, int ld, DcnCaller = {}) {
  const int lane = dcn_lane();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    int row0, col0, row1, col1;
    dcn_mma_a16_coord(lane, 2 * r, row0, col0);
    dcn_mma_a16_coord(lane, 2 * r + 1, row1, col1);
    a[r] = dcn_pack_half2(dcn_load(tile, row0 * ld + col0), dcn_load(tile, row1 * ld + col1));
  }
}

/// m16n8k16 B fragment from a column-major tile (each column of B
/// contiguous, as a weight matrix stored (n, k)): B[k][n] = tile[n*ld + k].
template <typename Tile>
__device__ __forceinline__ void dcn_mma_load_b16_col(unsigned (&b)[2], Tile tile, int ld, DcnCaller = {}) {
  const int lane = dcn_lane();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int row0, col0, row1, col1;
    dcn_mma_b16_coord(lane, 2 * r, row0, col0);
    dcn_mma_b16_coord(lane, 2 * r + 1, row1, col1);
    b[r] = dcn_pack_half2(dcn_load(tile, col0 * ld + row0), dcn_load(tile, col1 * ld + row1));
  }
}

/// m16n8k16 B fragment from a row-major tile: B[k][n] = tile[k*ld + n].
template <typename Tile>
__device__ __forceinline__ void dcn_mma_load_b16_row(unsigned (&b)[2], Tile tile, int ld, DcnCaller = {}) {
  const int lane = dcn_lane();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int row0, col0, row1, col1;
    dcn_mma_b16_coord(lane, 2 * r, row0, col0);
    dcn_mma_b16_coord(lane, 2 * r + 1, row1, col1);
    b[r] = dcn_pack_half2(dcn_load(tile, row0 * ld + col0), dcn_load(tile, row1 * ld + col1));
  }
}

/// m16n8k8 tf32 A fragment from a row-major float tile, rounded to tf32.
template <typename Tile>
__device__ __forceinline__ void dcn_mma_load_a8_tf32(unsigned (&a)[4], Tile tile, int ld, DcnCaller = {}) {
  const int lane = dcn_lane();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int row, col;
    dcn_mma_a8_tf32_coord(lane, i, row, col);
    a[i] = dcn_to_tf32(dcn_load(tile, row * ld + col));
  }
}

/// m16n8k8 tf32 B fragment from a column-major float tile (B[k][n] =
/// tile[n*ld + k]), rounded to tf32.
template <typename Tile>
__device__ __forceinline__ void dcn_mma_load_b8_tf32(unsigned (&b)[2], Tile tile, int ld, DcnCaller = {}) {
  const int lane = dcn_lane();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int row, col;
    dcn_mma_b8_tf32_coord(lane, i, row, col);
    b[i] = dcn_to_tf32(dcn_load(tile, col * ld + row));
  }
}

/// D fragment of this lane into a row-major float tile: tile[r*ld + c] = D[r][c].
template <typename Tile>
__device__ __forceinline__ void dcn_mma_store_c(Tile tile, int ld, const float (&d)[4], DcnCaller = {}) {
  const int lane = dcn_lane();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int row, col;
    dcn_mma_c_coord(lane, i, row, col);
    dcn_store(tile, row * ld + col, d[i]);
  }
}

// Matrix loads and asynchronous copies. All lanes of the warp, converged,
// call the ldmatrix wrappers; the cp.async ones are per thread.

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8m + i passes row i of
/// matrix m (16 bytes, 16-byte aligned, in shared memory); r[m] receives
/// elements 2(l % 4), 2(l % 4) + 1 of row l / 4 of matrix m (l: the lane),
/// i.e. that row's 32-bit word l % 4. sm_75 and newer.
__device__ __forceinline__ void dcn_ldmatrix_x4(unsigned (&r)[4], DCN_SHARED_PTR(unsigned) row, DcnCaller = {}) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(dcn_shared_address(row)));
#elif defined(__CUDA_ARCH__)
  __trap();
#else
  dcn_emu::ldmatrix(r, row, false, __builtin_FILE(), __builtin_LINE());
#endif
}

/// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: as dcn_ldmatrix_x4, each
/// matrix transposed: r[m] receives elements l / 4 of rows 2(l % 4) and
/// 2(l % 4) + 1 (the low half first). sm_75 and newer.
__device__ __forceinline__ void dcn_ldmatrix_x4_trans(unsigned (&r)[4], DCN_SHARED_PTR(unsigned) row,
                                                      DcnCaller = {}) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(dcn_shared_address(row)));
#elif defined(__CUDA_ARCH__)
  __trap();
#else
  dcn_emu::ldmatrix(r, row, true, __builtin_FILE(), __builtin_LINE());
#endif
}

/// 16 bytes from global memory (src, 16-byte aligned) to shared memory (dst,
/// 16-byte aligned), or 16 zero bytes when !fill (src must still be a
/// readable address: the plain path reads it and drops it): cp.async.cg on
/// sm_80 and newer, complete once a later dcn_cp_async_wait covers its group
/// (dcn_cp_async_commit); before sm_80 a plain 16-byte load and store,
/// complete at once. Either way dst must not be touched before that wait,
/// and other threads see it only after a barrier that follows it.
__device__ __forceinline__ void dcn_cp_async_16(DCN_SHARED_PTR(unsigned) dst, const void* src, bool fill,
                                                DcnCaller = {}) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dcn_shared_address(dst)), "l"(src),
               "r"(fill ? 16 : 0)
               : "memory");
#elif defined(__CUDA_ARCH__)
  // Loaded whatever `fill` says and zeroed by predicated moves, in one piece
  // the compiler cannot split into branches, so that a batch of copies
  // issues its loads together.
  DcnChunk value;
  asm volatile(
      "{\n\t.reg .pred empty;\n\tsetp.eq.u32 empty, %5, 0;\n\t"
      "ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n\t"
      "@empty mov.b32 %0, 0;\n\t@empty mov.b32 %1, 0;\n\t@empty mov.b32 %2, 0;\n\t@empty mov.b32 %3, 0;\n\t}"
      : "=r"(value.w[0]), "=r"(value.w[1]), "=r"(value.w[2]), "=r"(value.w[3])
      : "l"(src), "r"(static_cast<unsigned>(fill)));
  *reinterpret_cast<DcnChunk*>(dst) = value;
#else
  dcn_emu::cp_async(dst, src, 16, fill ? 16 : 0, __builtin_FILE(), __builtin_LINE());
#endif
}

/// cp.async.commit_group: the copies this thread issued since the last commit form a group.
__device__ __forceinline__ void dcn_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#elif !defined(__CUDA_ARCH__)
  dcn_emu::async_commit();
#endif
}

/// cp.async.wait_group N: all but this thread's N most recent groups are complete.
template <int N>
__device__ __forceinline__ void dcn_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif !defined(__CUDA_ARCH__)
  dcn_emu::async_wait(N);
#endif
}
