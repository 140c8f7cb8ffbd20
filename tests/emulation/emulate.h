// emulate.h: CUDA's execution model on the CPU, for kernels/*.cu and the
// emulator's own test kernels (cooperative_kernels.cu beside this file).
//
// What it provides
//   qualifiers         __global__, __device__, __host__, __forceinline__, __restrict__, __align__,
//                      __launch_bounds__ (ignored)
//   dim3, threadIdx, blockIdx, blockDim, gridDim, warpSize (x, y and z)
//   __syncthreads()    a barrier of the block
//   __syncwarp, __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync,
//   __ballot_sync, __all_sync, __any_sync      warp collectives, with mask and width semantics
//   DCN_SHARED(type, name, count)              static shared memory (per block)
//   DCN_SHARED_DYNAMIC(type, name)             dynamic shared memory, sized at launch
//   DCN_SHARED_PTR(type)                       the type of a pointer into shared memory
//   atomicAdd, __float_as_uint, __uint_as_float, __float_as_int, __int_as_float, __popc, __ffs
//   dcn_load, dcn_store, dcn_atomic_add, DcnCaller, dcn_reconverge
//                                              global memory accesses of kernels/dcn_common.cuh, recorded
//                                              (dcn_atomic_add of a ChannelVector: sm_90's vector red)
//   dcn_host_half_to_float, dcn_host_float_to_half   (what PTX cvt does on a GPU; NaN -> 0x7fff)
//   (DCN_EMULATED_ARCH, a compiler flag: the architecture whose code paths kernels/dcn_common.cuh's
//   DCN_ARCH selects, e.g. 900 for sm_90's vector atomics; tests/emulation/harness.py sets it)
//   dcn_emu::warp_collective                   building block of the MMA wrappers (kernels/dcn_mma.cuh)
//   dcn_emu::ldmatrix, cp_async, async_commit, async_wait, dcn_shared_cast
//                                              ldmatrix, cp.async and vector shared accesses of
//                                              kernels/dcn_mma.cuh's wrappers
//   dcn_emu::launch(kernel, name, grid, block, shared_bytes, argv, account)
//   dcn_emu::accounting                        the memory accounting of the last accounted launch
//
// Design
//   Every CUDA thread of a block is a fiber (ucontext: makecontext/swapcontext,
//   a 256 KiB stack each with a guard page). One OS thread runs them
//   round-robin in linear thread order (x fastest, then y, then z, as CUDA
//   numbers threads into warps of 32), and a fiber runs until it exits or
//   reaches a barrier or a warp collective; nothing else switches. So a launch
//   always runs the same schedule (deterministic), and between two
//   synchronisation points a thread runs alone, which is one valid
//   interleaving; the race detector below catches kernels whose result
//   would depend on the interleaving. Blocks run one after another.
//   - __syncthreads: a thread waits until every thread of the block has
//     arrived. It is an error (the launch fails, naming kernel, threads and
//     line) when threads of a block wait at different __syncthreads calls,
//     or when some threads exited while others wait.
//   - Warp collectives rendezvous per warp: a lane posts its operation and
//     operand, and when every lane named in `mask` has posted the same
//     operation with the same mask (and width), the last to arrive computes
//     every lane's result. It is an error when the mask does not name the
//     calling lane, names a lane that has exited or does not exist, when two
//     lanes wait for each other in different operations (or masks), or when
//     a named lane waits at __syncthreads instead; a schedule in which no
//     thread can go on is reported as a deadlock. A value read from a lane
//     outside the mask is undefined on a GPU: here it is all one bits (NaN,
//     or -1).
//   - Shared memory lives in a per-block arena filled with 0xFF bytes (NaN in
//     every float type) at the start of each block. Kernels declare it with
//     DCN_SHARED / DCN_SHARED_DYNAMIC (kernels/dcn_common.cuh makes them
//     plain __shared__ arrays on the device); here a declaration is a checked
//     proxy: every index is bounds-checked against its array (an error names
//     kernel, array, index and thread), and every byte read or written is
//     recorded for the race detector.
//   - Race detector: two accesses to one shared byte by different threads, at
//     least one a write, race unless a barrier orders them: a __syncthreads
//     between them, or, for two lanes of one warp, a __syncwarp that both
//     joined between them. (Vector clocks per warp; __syncthreads starts a
//     new epoch for the whole block.) Shuffles, votes and MMAs order nothing,
//     as in CUDA's memory model. The first race fails the launch with kernel,
//     array, element, block and both threads.
//   - Global memory is plain host memory: atomicAdd is a plain add (no fiber
//     switches inside it), and races on global memory are not detected (the
//     harness's guard bytes catch out-of-range indices there).
//   - ldmatrix (m8n8, x1/x2/x4, .trans) is a warp collective: each lane that
//     supplies a row reads its 16 bytes when it arrives (race detector,
//     accounting: one 16-byte load per lane, a matrix per quarter-warp phase),
//     and every lane receives its registers by the PTX ISA's fragment layout.
//   - cp.async (4, 8 or 16 bytes, zero-fill) reads the source when issued and
//     writes shared memory when the issuing thread's cp.async.wait_group
//     completes its group (commit_group makes the groups): until then any
//     access to those bytes by any thread fails as a race, the write counts
//     for the race detector as the issuing thread's at the wait, and a thread
//     that exits with copies never waited for fails the launch.
//   Not emulated: atomics on shared memory (a compile error: the proxy is no
//   pointer), __threadfence, cooperative groups, clusters, TMA and other bulk copies.
//   Cost: a fiber switch takes a few hundred nanoseconds (swapcontext saves
//   the signal mask with a system call) and a warp collective 32 of them,
//   so emulated launches should stay tiny (a few thousand warp steps).
//
// Memory accounting (a launch with account = true; harness.py's stats=True)
//   What a launch asks of memory, per access site, in the terms a profiler
//   counts: warp requests, 32-byte sectors of global memory, wavefronts of
//   shared memory. Kernels reach global memory through kernels/dcn_common.cuh's
//   dcn_load / dcn_store / dcn_atomic_add (plain accesses on the device) and
//   shared memory through the DCN_SHARED proxies; both record the thread, the
//   address, the bytes, the kind and the site.
//   - A site is the source line of the access (__builtin_LINE() in a defaulted
//     argument: the helpers' DcnHere, the index of `tile[i]`) and, when it sits
//     in a helper that takes a DcnCaller, the kernel line that called the
//     outermost such helper. The width is the bytes one lane moves: an element
//     wider than 16 bytes, or not a power of two, moves in parts of its
//     alignment (at most 16 bytes), each part a request of its own.
//   - Requests, as SIMT issues them: the j-th execution of a site by the lanes
//     of a warp between two convergence points is one request. Convergence
//     points: __syncthreads, each warp collective (shuffles, votes, __syncwarp,
//     MMAs), and each step of DCN_GRID_STRIDE_LOOP and DCN_POINT_LOOP
//     (dcn_reconverge). A lane that skips an execution in a branch (a corner
//     outside the image) has its later executions paired with the other
//     lanes' earlier ones until the next convergence point: exact for code
//     whose lanes execute a site equally often between convergence points, an
//     approximation otherwise. Accesses are counted as the source writes them:
//     a compiler that merges or vectorises them is not seen (the PTX of
//     kernels/ keeps the fused kernels' tile accesses 4-byte scalars).
//   - Global memory: per request, the distinct 32-byte sectors and the distinct
//     bytes of all its lanes' byte ranges (a broadcast is one sector); the
//     ideal is the bytes / 32 rounded up. Caches are not modelled: these are
//     the L1 requests' sectors, not DRAM traffic.
//   - Shared memory: 32 banks of 4-byte words; lanes touching the same word
//     share it (no conflict); a request takes, per phase, as many wavefronts as
//     the most distinct words any one bank holds. Phases: the whole warp for
//     accesses of up to 4 bytes, each half-warp for 8 bytes, each quarter-warp
//     for 16 bytes (so 32 lanes x 16 bytes take 4 wavefronts at best). The
//     32-bit rule is the CUDA C++ Programming Guide's (Compute Capability 5.x
//     and later, Shared Memory); the 8- and 16-byte phases follow the guide's
//     description of 64- and 128-bit accesses (half- and quarter-warp
//     requests). For sm_80/sm_90 this is a model, to be checked against
//     Nsight Compute's shared-memory wavefronts on the first GPU.
//   - Totals per site (tests/emulation/transactions.py reads them): requests,
//     lane accesses, bytes, sectors, ideal sectors, wavefronts, ideal
//     wavefronts (one per phase with an active lane), and the worst request
//     (sectors; wavefronts of one phase, the conflict degree).
//   Requests complete at a __syncthreads every thread reached and at the end
//   of a block, and are counted then. Off, the accounting costs a branch per
//   access; on, it takes up to about twice the launch's time.
//
// Writing a cooperative kernel that runs both here and on a GPU
//   - Declare shared memory with DCN_SHARED(float, tile, 256) or
//     DCN_SHARED_DYNAMIC(float, tile) (size: the launch's shared_bytes), never
//     with a bare __shared__. Index it (`tile[i] = v; float w = tile[j];`),
//     pass it on as DCN_SHARED_PTR(float), do pointer arithmetic on it
//     (`tile + 16`); name the element type when reading (`float v = tile[i]`,
//     never `auto`: a host proxy would read later; reading a proxy made
//     before a __syncthreads is reported as an error).
//   - Use __syncthreads / __syncwarp / __shfl_*_sync / __ballot_sync as usual,
//     with explicit masks; lane = dcn_lane() (kernels/dcn_common.cuh).
//   - Tensor cores only through kernels/dcn_mma.cuh (fragment layouts and MMA
//     wrappers, exact per the PTX ISA on the host).
//   - Test it (tests/emulation/harness.py): `library = harness.build(names,
//     [source])` compiles its name expressions under this emulator, and
//     `library.launch(name, Launch(grid, block, shared_bytes), args)` runs one
//     on NumPy arrays (guard bytes around each); compare with NumPy. A broken
//     barrier, shared index or collective raises harness.EmulationError.
//     Plant each bug the kernel could have and watch it caught, as
//     tests/test_emulator.py does; tests/test_gpu_compile.py compiles such
//     kernels through NVRTC for every architecture.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace dcn_emu {

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kSlotBytes = 128;                       // a lane's operand of a collective
constexpr std::size_t kMaxSharedBytes = 227 * 1024;           // per block, sm_90's opt-in maximum
constexpr std::size_t kMaxStaticSharedBytes = 48 * 1024;      // CUDA's limit for __shared__ arrays

enum class Wait : unsigned char { running, barrier, collective, exited };

/// An asynchronous copy into shared memory (cp.async) not yet waited for:
/// the bytes it will write (read from global memory when it was issued).
struct AsyncCopy {
  std::size_t offset;  // in the block's arena
  std::uint32_t size;
  const char* name;  // the shared array and element it writes (for messages)
  long long index;
  unsigned char data[16];
};

/// One CUDA thread.
struct Fiber {
  ucontext_t context;  // not movable (glibc points into it): fibers live behind unique_ptr
  char* stack = nullptr;
  dim3 thread;
  Wait wait = Wait::exited;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  const char* op = nullptr;  // the collective it waits in
  unsigned op_mask = 0;
  long long op_key = 0;
  alignas(16) unsigned char in[kSlotBytes];
  alignas(16) unsigned char out[kSlotBytes];
  // Memory accounting: the kernel line that called the helper running now
  // (DcnCaller), the convergence interval the thread is in, and how often it
  // has executed each access site in that interval.
  const char* caller_file = nullptr;
  int caller_line = 0;
  std::uint32_t interval = 0;
  std::uint32_t counted_interval = 0;
  std::vector<std::pair<int, std::uint32_t>> executions;  // (site, count) in counted_interval
  // Asynchronous copies (cp.async): issued since the last commit, then the
  // committed groups, oldest first, until a cp.async.wait_group completes them.
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> groups;
};

/// A shared-memory access: the thread (linear index in its block) and its
/// own vector-clock entry at the time.
struct Access {
  int thread;
  std::uint32_t clock;
};

/// Race-detector state of one byte of shared memory.
struct ByteState {
  std::uint32_t write_epoch = 0;
  Access writer{};
  std::uint32_t read_epoch = 0;
  std::vector<Access> readers;  // since the last write, in read_epoch
  int async_thread = -1;  // the thread whose asynchronous copy into this byte is pending, or -1
};

struct Declaration {
  const void* site;
  std::size_t offset;
};

/// Everything about the launch in progress.
struct Emulator {
  std::string kernel;
  std::string error;
  ucontext_t scheduler;
  std::vector<std::unique_ptr<Fiber>> fibers;
  int threads = 0;  // of the current block
  int current = -1;  // linear index of the running thread, -1 in the scheduler
  int arrived = 0;  // threads waiting at __syncthreads
  int exited = 0;
  std::uint32_t epoch = 0;  // barrier intervals, never reused within a process
  std::vector<std::array<std::uint32_t, kWarp>> clocks;  // per thread, over its warp's lanes
  std::vector<unsigned char> shared;
  std::vector<ByteState> bytes;
  std::size_t dynamic_bytes = 0;
  std::size_t shared_end = 0;  // dynamic memory first, then static arrays
  std::vector<Declaration> declarations;
  void (*body)(void*) = nullptr;
  void* body_argument = nullptr;
  bool accounting = false;  // memory accounting of the launch in progress (opt-in)
  std::vector<std::size_t> async_bytes;  // bytes an asynchronous copy was issued into, this block
};

inline Emulator g;

inline std::string describe(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline std::string thread_name(int linear) {
  return "thread " + describe(g.fibers[linear]->thread) + " of block " + describe(blockIdx);
}

/// Record the launch's first error and abandon it (called from a fiber:
/// switches to the scheduler, which stops the launch).
[[noreturn]] inline void fail(const std::string& what) {
  if (g.error.empty()) g.error = g.kernel + ": " + what;
  swapcontext(&g.fibers[g.current]->context, &g.scheduler);
  std::abort();  // an abandoned fiber is never resumed
}

inline Fiber& me() { return *g.fibers[g.current]; }

/// Give the CPU to the next thread; returns once this one may go on.
inline void yield() { swapcontext(&me().context, &g.scheduler); }

inline int lane_of(int linear) { return linear % kWarp; }

inline std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", mask);
  return text;
}

/// Fail if a warp-mate waits in a collective whose mask names thread `linear`.
inline void check_nobody_waits_for(int linear, const char* doing) {
  const int base = linear - lane_of(linear);
  for (int t = base; t < base + kWarp && t < g.threads; ++t) {
    const Fiber& f = *g.fibers[t];
    if (t != linear && f.wait == Wait::collective && ((f.op_mask >> lane_of(linear)) & 1u))
      fail(thread_name(linear) + " " + doing + " while lane " + std::to_string(lane_of(t)) +
           " waits for it in " + f.op + " with mask " + hex(f.op_mask));
  }
}

// ---------------------------------------------------------------------------
// Memory accounting (opt-in per launch): warp requests, 32-byte sectors of
// global memory, wavefronts of shared memory. See the header comment.

enum class MemorySpace : unsigned char { global, shared };
enum class MemoryOp : unsigned char { load, store, atomic };

/// An access site: the line of the access, the kernel line that called the
/// helper it is in (DcnCaller; none for an access written in the kernel),
/// what it does and how many bytes one lane moves at a time.
struct Site {
  const char* file;
  int line;
  const char* caller_file;
  int caller_line;
  MemorySpace space;
  MemoryOp op;
  int width;
  bool operator==(const Site& o) const {
    return line == o.line && caller_line == o.caller_line && space == o.space && op == o.op &&
           width == o.width && file == o.file && caller_file == o.caller_file;
  }
};

/// A site's totals over the launch.
struct SiteTotals {
  Site site;
  unsigned long long requests = 0;
  unsigned long long lanes = 0;            // lane accesses
  unsigned long long bytes = 0;            // distinct bytes, summed over requests
  unsigned long long sectors = 0;          // distinct 32-byte sectors, summed over requests
  unsigned long long ideal_sectors = 0;    // ceil(distinct bytes / 32), summed over requests
  unsigned long long wavefronts = 0;       // shared memory
  unsigned long long ideal_wavefronts = 0; // shared memory: one per phase with an active lane
  unsigned worst = 0;  // most sectors (global) or wavefronts in one phase (shared) of one request
};

/// One lane's part of a warp request: a byte range (an address in global
/// memory, an offset in the block's arena in shared memory).
struct Piece {
  std::uintptr_t address;
  std::uint32_t size;
  int lane;
};

struct RequestKey {
  int warp, site;
  std::uint32_t interval, execution;
  int part;
  bool operator==(const RequestKey& o) const {
    return warp == o.warp && site == o.site && interval == o.interval && execution == o.execution &&
           part == o.part;
  }
};

struct Hash {
  std::size_t operator()(const Site& s) const {
    return std::hash<const void*>()(s.file) ^ (std::hash<const void*>()(s.caller_file) << 1) ^
           (static_cast<std::size_t>(s.line) * 1000003u) ^ (static_cast<std::size_t>(s.caller_line) * 7919u) ^
           (static_cast<std::size_t>(s.width) << 20) ^ (static_cast<std::size_t>(s.op) << 28) ^
           (static_cast<std::size_t>(s.space) << 30);
  }
  std::size_t operator()(const RequestKey& k) const {
    return (static_cast<std::size_t>(k.site) * 1000003u) ^ (static_cast<std::size_t>(k.warp) << 40) ^
           (static_cast<std::size_t>(k.interval) * 7919u) ^ (static_cast<std::size_t>(k.execution) << 20) ^
           static_cast<std::size_t>(k.part);
  }
};

struct Accounting {
  std::vector<SiteTotals> sites;
  std::unordered_map<Site, int, Hash> site_ids;
  std::vector<std::pair<int, std::vector<Piece>>> pending;  // (site, pieces) of requests not yet counted
  std::unordered_map<RequestKey, int, Hash> pending_ids;
  std::string report;  // of the last accounted launch

  void clear() {
    sites.clear();
    site_ids.clear();
    pending.clear();
    pending_ids.clear();
  }
};

inline Accounting accounting;

/// Count one complete global request: its distinct sectors and bytes.
inline void count_global(SiteTotals& t, std::vector<Piece>& pieces) {
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.address < b.address; });
  // In address order, every byte (sector) up to the furthest one seen is counted.
  unsigned long long bytes = 0, sectors = 0;
  std::uintptr_t covered = pieces.front().address, next_sector = covered / 32;
  for (const Piece& p : pieces) {
    const std::uintptr_t end = p.address + p.size;
    if (end > covered) {
      bytes += end - std::max(p.address, covered);
      covered = end;
    }
    for (std::uintptr_t s = std::max(p.address / 32, next_sector); s <= (end - 1) / 32; ++s, next_sector = s)
      ++sectors;
  }
  t.bytes += bytes;
  t.sectors += sectors;
  t.ideal_sectors += (bytes + 31) / 32;
  t.worst = std::max(t.worst, static_cast<unsigned>(sectors));
}

/// Count one complete shared-memory request by the rule of the header
/// comment: lanes in phases (a warp for accesses of up to 4 bytes, half-warps
/// for 8 bytes, quarter-warps for 16), 32 banks of 4-byte words; a phase
/// takes as many wavefronts as the most distinct words it touches in one bank.
inline void count_shared(SiteTotals& t, const std::vector<Piece>& pieces) {
  const int width = t.site.width;
  const int phase_lanes = width <= 4 ? 32 : width == 8 ? 16 : 8;
  for (int phase = 0; phase < kWarp / phase_lanes; ++phase) {
    std::vector<std::uintptr_t> words;
    for (const Piece& p : pieces)
      if (p.lane / phase_lanes == phase)
        for (std::uintptr_t w = p.address / 4; w <= (p.address + p.size - 1) / 4; ++w) words.push_back(w);
    if (words.empty()) continue;
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    int per_bank[kWarp] = {};
    int most = 0;
    for (std::uintptr_t w : words) most = std::max(most, ++per_bank[w % kWarp]);
    t.wavefronts += most;
    t.ideal_wavefronts += 1;
    t.worst = std::max(t.worst, static_cast<unsigned>(most));
  }
}

/// Count every request recorded so far (all are complete: called at a
/// __syncthreads that every thread of the block reached, and at its end).
inline void count_pending() {
  for (auto& [site, pieces] : accounting.pending) {
    SiteTotals& t = accounting.sites[site];
    t.requests += 1;
    t.lanes += pieces.size();
    if (t.site.space == MemorySpace::global)
      count_global(t, pieces);
    else
      count_shared(t, pieces);
  }
  accounting.pending.clear();
  accounting.pending_ids.clear();
}

/// Record an access of `size` bytes by the running thread. An element wider
/// than 16 bytes (or not a power of two) moves in parts of its alignment (at
/// most 16 bytes), as a compiler splits it; each part is a request of its own.
inline void account(MemorySpace space, MemoryOp op, std::uintptr_t address, std::size_t size,
                    std::size_t alignment, const char* file, int line) {
  if (!g.accounting || g.current < 0) return;
  const bool whole = size <= 16 && (size & (size - 1)) == 0;
  const std::size_t part_bytes = whole ? size : std::min<std::size_t>(std::max<std::size_t>(alignment, 1), 16);
  Fiber& f = me();
  // (An access in an argument of a helper's call is on its caller's line.)
  const bool called = f.caller_file != nullptr && (f.caller_line != line || std::strcmp(f.caller_file, file) != 0);
  const Site key{file, line, called ? f.caller_file : nullptr, called ? f.caller_line : 0, space, op,
                 static_cast<int>(part_bytes)};
  auto found = accounting.site_ids.find(key);
  int site;
  if (found == accounting.site_ids.end()) {
    site = static_cast<int>(accounting.sites.size());
    accounting.site_ids.emplace(key, site);
    accounting.sites.push_back(SiteTotals{key});
  } else {
    site = found->second;
  }
  if (f.counted_interval != f.interval) {
    f.executions.clear();
    f.counted_interval = f.interval;
  }
  std::uint32_t execution = 0;
  bool seen = false;
  for (auto& [s, count] : f.executions)
    if (s == site) {
      execution = count++;
      seen = true;
      break;
    }
  if (!seen) f.executions.emplace_back(site, 1);
  const int warp = g.current / kWarp, lane = lane_of(g.current);
  for (std::size_t at = 0, part = 0; at < size; at += part_bytes, ++part) {
    const RequestKey request{warp, site, f.interval, execution, static_cast<int>(part)};
    auto [entry, added] = accounting.pending_ids.emplace(request, static_cast<int>(accounting.pending.size()));
    if (added) accounting.pending.emplace_back(site, std::vector<Piece>{});
    accounting.pending[entry->second].second.push_back(
        Piece{address + at, static_cast<std::uint32_t>(std::min(part_bytes, size - at)), lane});
  }
}

/// The thread reached a point where its warp reconverges (a barrier, a warp
/// collective, a step of a warp-uniform loop): executions count afresh.
inline void reconverge(Fiber& f) { ++f.interval; }

inline const char* base_name(const char* path) {
  if (path == nullptr) return "";
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

/// The launch's totals, a line per site, tab-separated (read by
/// tests/emulation/transactions.py).
inline std::string accounting_report() {
  static const char* spaces[] = {"global", "shared"};
  static const char* ops[] = {"load", "store", "atomic"};
  std::string text;
  for (const SiteTotals& t : accounting.sites) {
    const Site& s = t.site;
    const unsigned long long values[] = {t.requests, t.lanes, t.bytes, t.sectors, t.ideal_sectors,
                                         t.wavefronts, t.ideal_wavefronts, t.worst};
    text += std::string(spaces[static_cast<int>(s.space)]) + "\t" + ops[static_cast<int>(s.op)] + "\t" +
            std::to_string(s.width) + "\t" + base_name(s.file) + "\t" + std::to_string(s.line) + "\t" +
            base_name(s.caller_file) + "\t" + std::to_string(s.caller_line);
    for (unsigned long long v : values) text += "\t" + std::to_string(v);
    text += "\n";
  }
  return text;
}

// ---------------------------------------------------------------------------
// Barriers and warp collectives.

inline void sync_threads(const char* file, int line) {
  Fiber& f = me();
  check_nobody_waits_for(g.current, "reached __syncthreads");
  if (g.exited > 0)
    fail(thread_name(g.current) + " reached __syncthreads (line " + std::to_string(line) + ") after " +
         std::to_string(g.exited) + " threads of its block exited: every thread must reach it");
  f.wait = Wait::barrier;
  f.barrier_file = file;
  f.barrier_line = line;
  if (++g.arrived < g.threads) {
    yield();
    return;
  }
  for (int t = 0; t < g.threads; ++t) {
    const Fiber& other = *g.fibers[t];
    if (other.barrier_line != line || std::strcmp(other.barrier_file, file) != 0)
      fail("threads of block " + describe(blockIdx) + " wait at different __syncthreads: " +
           thread_name(t) + " at line " + std::to_string(other.barrier_line) + ", " +
           thread_name(g.current) + " at line " + std::to_string(line));
  }
  g.arrived = 0;
  ++g.epoch;  // every earlier shared-memory access is now ordered before every later one
  for (int t = 0; t < g.threads; ++t) {
    g.fibers[t]->wait = Wait::running;
    reconverge(*g.fibers[t]);
  }
  if (g.accounting) count_pending();  // every thread is here: each request recorded so far is complete
}

/// A warp collective. Every lane named in `mask` posts `in`; once all have
/// posted the same `op` with the same mask and key, `combine(ins, outs, mask)`
/// runs once (in the last lane to arrive) with arrays indexed by lane, and
/// each lane returns its `outs[lane]`. Lanes outside the mask are left alone.
template <typename Out, typename In, typename Combine>
Out warp_collective(const char* op, unsigned mask, long long key, const In& in, Combine combine) {
  static_assert(sizeof(In) <= kSlotBytes && sizeof(Out) <= kSlotBytes, "collective operand too large");
  static_assert(std::is_trivially_copyable<In>::value && std::is_trivially_copyable<Out>::value, "");
  const int linear = g.current;
  const int lane = lane_of(linear), base = linear - lane;
  if (!((mask >> lane) & 1u))
    fail(thread_name(linear) + " calls " + op + " with a mask that does not name its own lane " +
         std::to_string(lane));
  Fiber& self = me();
  self.op = op;
  self.op_mask = mask;
  self.op_key = key;
  std::memcpy(self.in, &in, sizeof in);
  self.wait = Wait::collective;
  bool complete = true;
  for (int l = 0; l < kWarp; ++l) {
    const bool named = (mask >> l) & 1u;
    const int t = base + l;
    if (t >= g.threads) {
      if (named)
        fail(thread_name(linear) + " calls " + op + " naming lane " + std::to_string(l) +
             ", which does not exist (the block has " + std::to_string(g.threads) + " threads)");
      continue;
    }
    const Fiber& other = *g.fibers[t];
    const bool names_me = other.wait == Wait::collective && ((other.op_mask >> lane) & 1u);
    const bool same = other.wait == Wait::collective && std::strcmp(other.op, op) == 0 &&
                      other.op_mask == mask && other.op_key == key;
    if (named && other.wait == Wait::exited)
      fail(thread_name(linear) + " calls " + op + " naming lane " + std::to_string(l) + ", which has exited");
    if (named && other.wait == Wait::barrier)
      fail(thread_name(linear) + " calls " + op + " naming lane " + std::to_string(l) +
           ", which waits at __syncthreads");
    // Two lanes that each wait for the other in different collectives never
    // meet. (One that waits elsewhere without naming this lane may still come.)
    if (named && names_me && !same)
      fail("lanes " + std::to_string(l) + " and " + std::to_string(lane) + " of a warp of block " +
           describe(blockIdx) + " disagree: " + other.op + " with mask " + hex(other.op_mask) +
           " against " + op + " with mask " + hex(mask) +
           " (every lane named must make the same call with the same mask)");
    if (named && !same) complete = false;
  }
  if (!complete) {
    yield();
  } else {
    In ins[kWarp];
    Out outs[kWarp];
    std::memset(static_cast<void*>(ins), 0xFF, sizeof ins);
    std::memset(static_cast<void*>(outs), 0xFF, sizeof outs);
    for (int l = 0; l < kWarp; ++l)
      if ((mask >> l) & 1u) std::memcpy(&ins[l], g.fibers[base + l]->in, sizeof(In));
    combine(ins, outs, mask);
    for (int l = 0; l < kWarp; ++l)
      if ((mask >> l) & 1u) {
        Fiber& other = *g.fibers[base + l];
        std::memcpy(other.out, &outs[l], sizeof(Out));
        other.wait = Wait::running;
        reconverge(other);
      }
  }
  Out out;
  std::memcpy(&out, self.out, sizeof out);
  return out;
}

struct Nothing {};

/// __syncwarp's effect on the race detector: the lanes in mask learn each
/// other's clocks, then each starts a new interval of its own.
inline void sync_warp(unsigned mask) {
  const int base = g.current - lane_of(g.current);
  warp_collective<Nothing>("__syncwarp", mask, 0, Nothing{}, [base](const Nothing*, Nothing*, unsigned m) {
    std::array<std::uint32_t, kWarp> joined{};
    for (int l = 0; l < kWarp; ++l)
      if ((m >> l) & 1u)
        for (int k = 0; k < kWarp; ++k) joined[k] = std::max(joined[k], g.clocks[base + l][k]);
    for (int l = 0; l < kWarp; ++l)
      if ((m >> l) & 1u) {
        g.clocks[base + l] = joined;
        ++g.clocks[base + l][l];
      }
  });
}

enum class Shuffle { idx, up, down, bfly };

/// shfl.sync as the PTX ISA defines it, with CUDA's encoding of `width`
/// into the clamp/segment operand: a lane outside the segment (or beyond the
/// clamp) reads its own value; a source lane outside the mask gives all one bits.
template <typename T>
T shuffle(const char* op, Shuffle mode, unsigned mask, T value, int b, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of an unsupported type");
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0)
    fail(thread_name(g.current) + " calls " + op + " with width " + std::to_string(width) +
         ", not a power of two up to 32");
  struct Operand {
    T value;
    int b;
  };
  return warp_collective<T>(op, mask, width, Operand{value, b}, [mode, width](const Operand* ins, T* outs, unsigned m) {
    const int segment = kWarp - width;  // c[12:8]
    const int clamp = mode == Shuffle::up ? 0 : kWarp - 1;  // c[4:0]
    for (int lane = 0; lane < kWarp; ++lane) {
      if (!((m >> lane) & 1u)) continue;
      const int b = ins[lane].b;
      const int min_lane = lane & segment;
      const int max_lane = min_lane | (clamp & ~segment);
      int j;
      bool inside;
      switch (mode) {
        case Shuffle::up: j = lane - b; inside = j >= max_lane; break;
        case Shuffle::down: j = lane + b; inside = j <= max_lane; break;
        case Shuffle::bfly: j = lane ^ b; inside = j <= max_lane; break;
        default: j = min_lane | (b & (kWarp - 1) & ~segment); inside = j <= max_lane; break;
      }
      if (!inside) j = lane;
      if ((m >> j) & 1u)
        outs[lane] = ins[j].value;
      else
        std::memset(&outs[lane], 0xFF, sizeof(T));
    }
  });
}

inline unsigned vote(const char* op, unsigned mask, int predicate) {
  return warp_collective<unsigned>(op, mask, 0, predicate, [](const int* ins, unsigned* outs, unsigned m) {
    unsigned ballot = 0;
    for (int l = 0; l < kWarp; ++l)
      if (((m >> l) & 1u) && ins[l]) ballot |= 1u << l;
    for (int l = 0; l < kWarp; ++l) outs[l] = ballot;
  });
}

// ---------------------------------------------------------------------------
// Shared memory.

[[noreturn]] inline void race(const char* name, long long index, std::size_t byte, const Access& earlier,
                             const char* earlier_did, const char* now_does) {
  fail("shared-memory race on " + std::string(name) + "[" + std::to_string(index) + "] (byte " +
       std::to_string(byte) + " of block " + describe(blockIdx) + "'s shared memory): " +
       thread_name(g.current) + " " + now_does + " it after thread " +
       describe(g.fibers[earlier.thread]->thread) + " " + earlier_did +
       " it, with no barrier between (__syncthreads, or __syncwarp for lanes of one warp)");
}

/// Whether `earlier` (an access by another thread) happens before the
/// current thread's next access, within one barrier epoch: only for lanes of
/// one warp, through a __syncwarp both joined since.
inline bool ordered(const Access& earlier) {
  return earlier.thread / kWarp == g.current / kWarp &&
         g.clocks[g.current][lane_of(earlier.thread)] >= earlier.clock;
}

/// Check and record an access of `size` bytes at `offset` of the arena.
inline void access_shared(std::size_t offset, std::size_t size, bool write, const char* name, long long index) {
  const Access now{g.current, g.clocks[g.current][lane_of(g.current)]};
  for (std::size_t at = offset; at < offset + size; ++at) {
    ByteState& s = g.bytes[at];
    if (s.async_thread >= 0)
      fail("shared-memory race on " + std::string(name) + "[" + std::to_string(index) + "] (byte " +
           std::to_string(at) + " of block " + describe(blockIdx) + "'s shared memory): " + thread_name(g.current) +
           " " + (write ? "writes" : "reads") + " it while an asynchronous copy into it by thread " +
           describe(g.fibers[s.async_thread]->thread) +
           " is pending (cp.async.wait_group, then a barrier for other threads, must come first)");
    if (s.write_epoch == g.epoch && s.writer.thread != now.thread && !ordered(s.writer))
      race(name, index, at, s.writer, "wrote", write ? "writes" : "reads");
    if (write) {
      if (s.read_epoch == g.epoch)
        for (const Access& r : s.readers)
          if (r.thread != now.thread && !ordered(r)) race(name, index, at, r, "read", "writes");
      s.write_epoch = g.epoch;
      s.writer = now;
      s.readers.clear();
    } else {
      if (s.read_epoch != g.epoch) {
        s.readers.clear();
        s.read_epoch = g.epoch;
      }
      bool seen = false;
      for (Access& r : s.readers)
        if (r.thread == now.thread) {
          r.clock = now.clock;  // its latest read is the one a later write must follow
          seen = true;
        }
      if (!seen) s.readers.push_back(now);
    }
  }
}

template <typename T>
class SharedArray;

/// The index of a shared-array element, with the line that indexes it (an
/// implicit conversion, so that `tile[i]` names its own line to the
/// memory accounting).
struct SharedIndex {
  template <typename I>
  SharedIndex(I i, const char* file = __builtin_FILE(), int line = __builtin_LINE())
      : value(static_cast<long long>(i)), file(file), line(line) {
    static_assert(std::is_integral<I>::value, "shared arrays are indexed by integers");
    beyond = std::is_unsigned<I>::value && static_cast<long long>(i) < 0;  // an unsigned past long long
  }
  long long value;
  bool beyond;
  const char* file;
  int line;
};

/// One element of a shared array: reads and writes go through the checks.
template <typename T>
class SharedRef {
 public:
  SharedRef(std::size_t offset, const char* name, long long index, std::size_t count, const char* file = nullptr,
            int line = 0)
      : offset_(offset), name_(name), index_(index), count_(count), epoch_(g.epoch), file_(file), line_(line) {}

  operator T() const {
    check();
    access_shared(offset_, sizeof(T), false, name_, index_);
    account(MemorySpace::shared, MemoryOp::load, offset_, sizeof(T), alignof(T), file_, line_);
    T value;
    std::memcpy(&value, &g.shared[offset_], sizeof(T));
    return value;
  }
  const SharedRef& operator=(const T& value) const {
    check();
    access_shared(offset_, sizeof(T), true, name_, index_);
    account(MemorySpace::shared, MemoryOp::store, offset_, sizeof(T), alignof(T), file_, line_);
    std::memcpy(&g.shared[offset_], &value, sizeof(T));
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = static_cast<T>(other); }
  template <typename U>
  const SharedRef& operator+=(const U& u) const { return *this = static_cast<T>(static_cast<T>(*this) + u); }
  template <typename U>
  const SharedRef& operator-=(const U& u) const { return *this = static_cast<T>(static_cast<T>(*this) - u); }
  template <typename U>
  const SharedRef& operator*=(const U& u) const { return *this = static_cast<T>(static_cast<T>(*this) * u); }
  /// &tile[i]: a pointer to this element.
  SharedArray<T> operator&() const;

 private:
  void check() const {
    if (epoch_ != g.epoch)
      fail(thread_name(g.current) + " uses a reference to " + name_ + "[" + std::to_string(index_) +
           "] taken before a __syncthreads (an `auto` copy of a shared element?)");
  }
  std::size_t offset_;
  const char* name_;
  long long index_;
  std::size_t count_;
  std::uint32_t epoch_;
  const char* file_;  // where it was indexed
  int line_;
};

/// A pointer into a shared array (the array and a position in it): indexing
/// is bounds-checked against the whole array, pointer arithmetic is free.
template <typename T>
class SharedArray {
 public:
  SharedArray(std::size_t offset, long long count, long long position, const char* name)
      : offset_(offset), count_(count), position_(position), name_(name) {}

  SharedRef<T> operator[](SharedIndex i) const {
    const long long index = position_ + i.value;
    if (index < 0 || index >= count_ || i.beyond)
      fail(thread_name(g.current) + " indexes shared array " + name_ + " at " + std::to_string(index) +
           ", outside [0, " + std::to_string(count_) + ")");
    return SharedRef<T>(offset_ + static_cast<std::size_t>(index) * sizeof(T), name_, index,
                        static_cast<std::size_t>(count_), i.file, i.line);
  }
  SharedRef<T> operator*() const { return (*this)[0]; }
  template <typename I>
  SharedArray operator+(I k) const { return SharedArray(offset_, count_, position_ + static_cast<long long>(k), name_); }
  template <typename I>
  SharedArray operator-(I k) const { return SharedArray(offset_, count_, position_ - static_cast<long long>(k), name_); }

  /// The same bytes as elements of U (reinterpret_cast on a device): the
  /// position must fall on a U boundary (16 bytes for a 16-byte vector).
  template <typename U>
  SharedArray<U> as() const {
    const long long byte = position_ * static_cast<long long>(sizeof(T));
    if (byte % static_cast<long long>(alignof(U)) != 0 || (offset_ + byte) % alignof(U) != 0)
      fail(thread_name(g.current) + " reinterprets shared array " + name_ + " at element " +
           std::to_string(position_) + " as a " + std::to_string(sizeof(U)) + "-byte element: misaligned");
    return SharedArray<U>(offset_, count_ * static_cast<long long>(sizeof(T)) / static_cast<long long>(sizeof(U)),
                          byte / static_cast<long long>(sizeof(U)), name_);
  }
  /// Where it points: the byte in the block's arena, and the element of its array.
  std::size_t byte_offset() const { return offset_ + static_cast<std::size_t>(position_) * sizeof(T); }
  long long position() const { return position_; }
  const char* name() const { return name_; }
  long long count() const { return count_; }

 private:
  std::size_t offset_;
  long long count_;
  long long position_;
  const char* name_;
};

template <typename T>
SharedArray<T> SharedRef<T>::operator&() const {
  const std::size_t first = offset_ - static_cast<std::size_t>(index_) * sizeof(T);
  return SharedArray<T>(first, static_cast<long long>(count_), index_, name_);
}

inline void grow_shared(std::size_t end) {
  if (end > g.shared.size()) {
    g.shared.resize(end, 0xFF);
    g.bytes.resize(end);
  }
}

/// A static shared array: one per declaration site and block.
template <typename T>
SharedArray<T> declare_static(const void* site, const char* name, long long count) {
  for (const Declaration& d : g.declarations)
    if (d.site == site) return SharedArray<T>(d.offset, count, 0, name);
  const std::size_t offset = (g.shared_end + 15) / 16 * 16;
  const std::size_t end = offset + static_cast<std::size_t>(count) * sizeof(T);
  if (end - g.dynamic_bytes > kMaxStaticSharedBytes + 15 || end > kMaxSharedBytes)
    fail("shared array " + std::string(name) + " takes the block's static shared memory past " +
         std::to_string(kMaxStaticSharedBytes) + " bytes (or all of it past " + std::to_string(kMaxSharedBytes) + ")");
  grow_shared(end);
  std::memset(&g.shared[offset], 0xFF, end - offset);
  g.shared_end = end;
  g.declarations.push_back({site, offset});
  return SharedArray<T>(offset, count, 0, name);
}

/// The dynamic shared memory of the launch, seen as an array of T.
template <typename T>
SharedArray<T> declare_dynamic(const char* name) {
  return SharedArray<T>(0, static_cast<long long>(g.dynamic_bytes / sizeof(T)), 0, name);
}

// ---------------------------------------------------------------------------
// Matrix loads and asynchronous copies (kernels/dcn_mma.cuh's wrappers).

/// 16 bytes: one row of an 8x8 matrix of 16-bit elements, or one asynchronous copy.
struct alignas(16) Bytes16 {
  unsigned words[4];
};

/// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16 for the calling
/// lane, as the PTX ISA defines it: a warp collective in which lane 8m + i
/// gives the address of row i of matrix m (m < N; other lanes' addresses are
/// not read), each a 16-byte aligned row of eight 16-bit elements, and every
/// lane receives one register per matrix. Without .trans lane l receives
/// elements 2(l % 4) and 2(l % 4) + 1 of row l / 4 (the low half first), i.e.
/// the row's 32-bit word l % 4; with .trans, elements l / 4 of rows 2(l % 4)
/// and 2(l % 4) + 1 (the matrix transposed). A lane reads its row when it
/// arrives (the race detector and the memory accounting see a 16-byte load
/// of that lane, so a matrix is one phase of 8 lanes).
template <int N>
void ldmatrix(unsigned (&out)[N], const SharedArray<unsigned>& row, bool trans, const char* file, int line) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const int lane = lane_of(g.current);
  Bytes16 mine{};
  if (lane < 8 * N) mine = row.as<Bytes16>()[SharedIndex(0, file, line)];
  const char* op = trans ? (N == 4 ? "ldmatrix.x4.trans" : N == 2 ? "ldmatrix.x2.trans" : "ldmatrix.x1.trans")
                         : (N == 4 ? "ldmatrix.x4" : N == 2 ? "ldmatrix.x2" : "ldmatrix.x1");
  struct Registers {
    unsigned r[4];
  };
  const Registers got = warp_collective<Registers>(op, 0xffffffffu, 0, mine, [trans](const Bytes16* rows, Registers* outs,
                                                                                       unsigned) {
    auto element = [rows](int matrix, int r, int c) -> unsigned {  // 16-bit element (r, c) of a matrix
      return (rows[8 * matrix + r].words[c / 2] >> (16 * (c % 2))) & 0xffffu;
    };
    for (int l = 0; l < kWarp; ++l)
      for (int m = 0; m < N; ++m)
        outs[l].r[m] = trans ? element(m, 2 * (l % 4), l / 4) | (element(m, 2 * (l % 4) + 1, l / 4) << 16)
                             : element(m, l / 4, 2 * (l % 4)) | (element(m, l / 4, 2 * (l % 4) + 1) << 16);
  });
  for (int m = 0; m < N; ++m) out[m] = got.r[m];
}

/// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes for the
/// calling thread: the first src_bytes bytes of src and zeros after them go
/// to dst (bytes 4, 8 or 16, both addresses aligned to it). The source is read
/// now; the write to shared memory happens when this thread's
/// cp.async.wait_group completes its group (async_wait): until then every
/// access to those bytes, by any thread, is a race, and the race detector sees
/// the write as this thread's at the wait. The memory accounting counts the
/// global load and the shared store here, where the copy is issued.
inline void cp_async(const SharedArray<unsigned>& dst, const void* src, int bytes, int src_bytes, const char* file,
                     int line) {
  const std::size_t offset = dst.byte_offset();
  if ((bytes != 4 && bytes != 8 && bytes != 16) || src_bytes < 0 || src_bytes > bytes)
    fail(thread_name(g.current) + " issues cp.async of " + std::to_string(bytes) + " bytes (" +
         std::to_string(src_bytes) + " from global memory): 4, 8 or 16, at most all from the source");
  if (offset % bytes != 0 || reinterpret_cast<std::uintptr_t>(src) % bytes != 0)
    fail(thread_name(g.current) + " issues cp.async of " + std::to_string(bytes) + " bytes into " + dst.name() +
         "[" + std::to_string(dst.position()) + "] or from a source not aligned to them");
  const long long words = bytes / 4;
  if (dst.position() < 0 || dst.position() + words > dst.count())
    fail(thread_name(g.current) + " issues cp.async into shared array " + dst.name() + " at " +
         std::to_string(dst.position()) + ", outside [0, " + std::to_string(dst.count()) + ")");
  AsyncCopy copy{offset, static_cast<std::uint32_t>(bytes), dst.name(), dst.position(), {}};
  if (src_bytes > 0) {
    account(MemorySpace::global, MemoryOp::load, reinterpret_cast<std::uintptr_t>(src), bytes, bytes, file, line);
    std::memcpy(copy.data, src, static_cast<std::size_t>(src_bytes));
  }
  account(MemorySpace::shared, MemoryOp::store, offset, bytes, bytes, file, line);
  for (std::size_t at = offset; at < offset + bytes; ++at) {
    ByteState& s = g.bytes[at];
    if (s.async_thread >= 0)
      fail(thread_name(g.current) + " issues cp.async into " + dst.name() + "[" + std::to_string(dst.position()) +
           "] while an earlier asynchronous copy into it by thread " + describe(g.fibers[s.async_thread]->thread) +
           " is pending");
    s.async_thread = g.current;
    g.async_bytes.push_back(at);
  }
  me().uncommitted.push_back(copy);
}

/// cp.async.commit_group: the copies issued since the last commit become a
/// group (none: an empty group, complete at once, which no wait counts).
inline void async_commit() {
  Fiber& f = me();
  if (f.uncommitted.empty()) return;
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

/// cp.async.wait_group n: this thread's groups but the n most recent complete
/// (their bytes are written now, by this thread, for the race detector).
inline void async_wait(int n) {
  Fiber& f = me();
  while (static_cast<int>(f.groups.size()) > n) {
    for (const AsyncCopy& copy : f.groups.front()) {
      for (std::size_t at = copy.offset; at < copy.offset + copy.size; ++at) g.bytes[at].async_thread = -1;
      access_shared(copy.offset, copy.size, true, copy.name, copy.index);
      std::memcpy(&g.shared[copy.offset], copy.data, copy.size);
    }
    f.groups.erase(f.groups.begin());
  }
}

// ---------------------------------------------------------------------------
// Launch.

inline void fiber_entry() {
  g.body(g.body_argument);
  Fiber& f = me();
  f.wait = Wait::exited;
  ++g.exited;
  check_nobody_waits_for(g.current, "exited");
  if (g.arrived > 0)
    fail(thread_name(g.current) + " exited while " + std::to_string(g.arrived) +
         " threads of its block wait at __syncthreads: every thread must reach it");
  if (!f.uncommitted.empty() || !f.groups.empty())
    fail(thread_name(g.current) + " exited with asynchronous copies into shared memory never waited for "
         "(cp.async without cp.async.wait_group)");
  swapcontext(&f.context, &g.scheduler);
  std::abort();
}

inline Fiber& fiber(int t) {
  while (static_cast<int>(g.fibers.size()) <= t) {
    auto f = std::make_unique<Fiber>();
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) std::abort();
    mprotect(memory, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    f->stack = static_cast<char*>(memory) + page;
    g.fibers.push_back(std::move(f));
  }
  return *g.fibers[t];
}

inline std::string deadlock() {
  std::string s = "deadlock in block " + describe(blockIdx) + ":";
  for (int t = 0; t < g.threads && t < 64; ++t) {
    const Fiber& f = *g.fibers[t];
    if (f.wait == Wait::barrier) s += " " + describe(f.thread) + " at __syncthreads;";
    if (f.wait == Wait::collective) s += " " + describe(f.thread) + " in " + f.op + " with mask " + hex(f.op_mask) + ";";
  }
  return s;
}

/// Run one block to completion; false on an error.
inline bool run_block() {
  for (int t = 0; t < g.threads; ++t) {
    Fiber& f = fiber(t);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
    f.thread = dim3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.wait = Wait::running;
    f.caller_file = nullptr;
    f.caller_line = 0;
    f.interval = f.counted_interval = 0;
    f.executions.clear();
    f.uncommitted.clear();
    f.groups.clear();
    g.clocks[t].fill(0);
    g.clocks[t][lane_of(t)] = 1;
  }
  g.arrived = g.exited = 0;
  ++g.epoch;
  for (std::size_t at : g.async_bytes)
    if (at < g.bytes.size()) g.bytes[at].async_thread = -1;
  g.async_bytes.clear();
  g.declarations.clear();
  g.shared_end = g.dynamic_bytes;
  if (g.dynamic_bytes) std::memset(g.shared.data(), 0xFF, g.dynamic_bytes);
  while (g.exited < g.threads) {
    bool ran = false;
    for (int t = 0; t < g.threads; ++t) {
      Fiber& f = *g.fibers[t];
      if (f.wait != Wait::running) continue;
      g.current = t;
      threadIdx = f.thread;
      swapcontext(&g.scheduler, &f.context);
      g.current = -1;
      ran = true;
      if (!g.error.empty()) return false;
    }
    if (!ran) {
      g.error = g.kernel + ": " + deadlock();
      return false;
    }
  }
  if (g.accounting) count_pending();
  return true;
}

template <typename... Args, std::size_t... I>
void call_with_argv(void (*kernel)(Args...), void** argv, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(argv[I])...);
}

template <typename... Args>
struct Invocation {
  void (*kernel)(Args...);
  void** argv;
  static void run(void* self) {
    auto* call = static_cast<Invocation*>(self);
    call_with_argv(call->kernel, call->argv, std::index_sequence_for<Args...>{});
  }
};

/// kernel<<<grid, block, shared_bytes>>>(argv...), argv as for cuLaunchKernel
/// (argv[i] points to the i-th argument). Returns 0, or 1 with the first
/// error in g.error.
template <typename... Args>
int launch(void (*kernel)(Args...), const char* name, dim3 grid, dim3 block, std::size_t shared_bytes,
           void** argv, bool account = false) {
  g.kernel = name;
  g.error.clear();
  g.accounting = account;
  accounting.clear();
  accounting.report.clear();
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || shared_bytes > kMaxSharedBytes) {
    g.error = std::string(name) + ": invalid launch: grid " + describe(grid) + ", block " + describe(block) +
              ", " + std::to_string(shared_bytes) + " bytes of dynamic shared memory";
    return 1;
  }
  Invocation<Args...> call{kernel, argv};
  g.body = &Invocation<Args...>::run;
  g.body_argument = &call;
  g.threads = static_cast<int>(threads);
  g.clocks.resize(threads);
  g.dynamic_bytes = shared_bytes;
  grow_shared(shared_bytes);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3{x, y, z};
        if (!run_block()) return 1;
      }
  if (account) accounting.report = accounting_report();
  return 0;
}

}  // namespace dcn_emu

// ---------------------------------------------------------------------------
// CUDA's names.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  dcn_emu::sync_threads(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { dcn_emu::sync_warp(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return dcn_emu::shuffle("__shfl_sync", dcn_emu::Shuffle::idx, mask, var, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return dcn_emu::shuffle("__shfl_up_sync", dcn_emu::Shuffle::up, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return dcn_emu::shuffle("__shfl_down_sync", dcn_emu::Shuffle::down, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return dcn_emu::shuffle("__shfl_xor_sync", dcn_emu::Shuffle::bfly, mask, var, lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return dcn_emu::vote("__ballot_sync", mask, predicate != 0);
}
inline int __all_sync(unsigned mask, int predicate) {
  return dcn_emu::vote("__all_sync", mask, predicate != 0) == mask;
}
inline int __any_sync(unsigned mask, int predicate) {
  return dcn_emu::vote("__any_sync", mask, predicate != 0) != 0;
}

#define DCN_SHARED(type, name, count)      \
  static const char name##_dcn_site = 0; \
  const ::dcn_emu::SharedArray<type> name = ::dcn_emu::declare_static<type>(&name##_dcn_site, #name, (count))
#define DCN_SHARED_DYNAMIC(type, name) \
  const ::dcn_emu::SharedArray<type> name = ::dcn_emu::declare_dynamic<type>(#name)
#define DCN_SHARED_PTR(type) ::dcn_emu::SharedArray<type>

/// A pointer into shared memory seen as another element type (a 16-byte
/// vector, say): kernels/dcn_mma.cuh's reinterpret_cast on a device.
template <typename U, typename T>
inline ::dcn_emu::SharedArray<U> dcn_shared_cast(const ::dcn_emu::SharedArray<T>& p) {
  return p.template as<U>();
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// Global memory through kernels/dcn_common.cuh's helpers: the plain access,
// recorded (with the line it is written on) when the launch is accounted.

/// The line a helper is called from (its defaulted last argument; explicit,
/// so that no other argument converts to it).
struct DcnHere {
  explicit DcnHere(const char* file = __builtin_FILE(), int line = __builtin_LINE()) : file(file), line(line) {}
  const char* file;
  int line;
};

template <typename T>
void dcn_account_global(dcn_emu::MemoryOp op, const T* p, const DcnHere& here) {
  dcn_emu::account(dcn_emu::MemorySpace::global, op, reinterpret_cast<std::uintptr_t>(p), sizeof(T), alignof(T),
                   here.file, here.line);
}

template <typename T>
inline T dcn_load(const T* p, DcnHere here = DcnHere()) {
  dcn_account_global(dcn_emu::MemoryOp::load, p, here);
  return *p;
}

template <typename T, typename I>
inline T dcn_load(const T* p, I i, DcnHere here = DcnHere()) {
  dcn_account_global(dcn_emu::MemoryOp::load, p + i, here);
  return p[i];
}

template <typename T>
inline void dcn_store(T* p, const T& value, DcnHere here = DcnHere()) {
  dcn_account_global(dcn_emu::MemoryOp::store, p, here);
  *p = value;
}

template <typename T, typename I>
inline void dcn_store(T* p, I i, const T& value, DcnHere here = DcnHere()) {
  dcn_account_global(dcn_emu::MemoryOp::store, p + i, here);
  p[i] = value;
}

template <typename T>
inline T dcn_atomic_add(T* p, T value, DcnHere here = DcnHere()) {
  dcn_account_global(dcn_emu::MemoryOp::atomic, p, here);
  if constexpr (std::is_arithmetic<T>::value) {
    return atomicAdd(p, value);
  } else {
    // A vector of floats (kernels/dcn_common.cuh's ChannelVector, an array
    // `v`): red.global.add.v4.f32 on sm_90, one access of its 16 bytes that
    // adds element by element. (The device's returns nothing.)
    const T old = *p;
    for (std::size_t i = 0; i < std::extent<decltype(value.v)>::value; ++i) p->v[i] += value.v[i];
    return old;
  }
}

// A tile that may live in global or shared memory (kernels/dcn_mma.cuh's
// fragment loads): the indexed helpers also take a shared-array pointer.
template <typename T, typename I>
inline T dcn_load(dcn_emu::SharedArray<T> p, I i, DcnHere here = DcnHere()) {
  return p[dcn_emu::SharedIndex(i, here.file, here.line)];
}

template <typename T, typename I>
inline void dcn_store(dcn_emu::SharedArray<T> p, I i, const T& value, DcnHere here = DcnHere()) {
  p[dcn_emu::SharedIndex(i, here.file, here.line)] = value;
}

/// A step of a warp-uniform loop: the warp's lanes reconverge (for the memory accounting).
inline void dcn_reconverge() {
  if (dcn_emu::g.current >= 0) dcn_emu::reconverge(dcn_emu::me());
}

/// The defaulted last argument of a helper that touches memory for its
/// caller: while the outermost such helper runs, the thread's accesses are
/// accounted to the kernel line that called it.
struct DcnCaller {
  DcnCaller(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    if (dcn_emu::g.current < 0) return;
    dcn_emu::Fiber& f = dcn_emu::me();
    if (f.caller_file != nullptr) return;  // an outer helper's caller stands
    f.caller_file = file;
    f.caller_line = line;
    owner_ = &f;
  }
  ~DcnCaller() {
    if (owner_ != nullptr) {
      owner_->caller_file = nullptr;
      owner_->caller_line = 0;
    }
  }
  DcnCaller(const DcnCaller&) = delete;
  DcnCaller& operator=(const DcnCaller&) = delete;

 private:
  dcn_emu::Fiber* owner_ = nullptr;
};

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

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

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// g++ (12+, x86-64) converts _Float16 with round to nearest even, as cvt.rn does.
inline float dcn_host_half_to_float(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

inline unsigned short dcn_host_float_to_half(float v) {
  if (v != v) return 0x7fffu;  // every NaN the canonical one, as cvt.rn.f16.f32 gives it
  const _Float16 h = static_cast<_Float16>(v);
  unsigned short bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}
