// A CPU emulator for this crate's CUDA kernels, so that the tests check what the kernels
// compute on machines without a GPU (CI, most development sessions). It compiles the kernel
// sources themselves as C++ (`DEBERTA_EMULATE`) and runs a launch block by block, each CUDA
// thread a fiber (ucontext) on the calling OS thread:
//   - __syncthreads() parks the fiber until every thread of the block has arrived;
//   - warp-synchronous operations (__shfl_xor_sync, mma.sync) deposit the lane's operands,
//     wait for the 32 lanes of the warp, and compute each lane's result from the others';
//   - mma.sync.m16n8k16 (bf16 in, fp32 accumulate) is rebuilt from the fragment layout of the
//     PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), written here
//     independently of the kernels' own loaders, so a loader that misplaces an element fails;
//   - dynamic shared memory starts as NaN bytes each block (reading a slot nobody wrote shows
//     up), and a guard past its end catches writes beyond the launch's size;
//   - ldmatrix and cp.async likewise from the PTX ISA; a cp.async destination reads as NaN from
//     the issue until the issuing thread waits for it;
//   - a barrier that not every thread reaches is reported as an error instead of hanging.
// It checks semantics, not speed. It runs each fiber until it blocks, first thread first with
// the warps in lockstep, or last first with one warp at a time
// (`deberta_emulate_reverse_schedule`: from each block barrier the last warp runs alone to the
// next, then the one before it): a race that both orders hide stays hidden.

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// CUDA's integer min and max.
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

// HELD: past a block barrier, but not yet let go (the reverse schedule lets one warp at a time).
enum Wait { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, HELD, DONE };

struct Lane {
  unsigned a[4], b[2];
  float x;
  const unsigned char* row;  // ldmatrix: the row address this lane gives
  std::uint64_t wgmma[3];    // wgmma: its descriptors (A's or 0, B's) and its shape and flags
};

// A wgmma of this thread in flight (issued, its group not yet waited for): its result, computed
// at the issue, goes to the accumulators at the wait; until then they hold POISON.
struct Wgmma {
  float* d;
  int n;                      // accumulators of this thread: columns / 2
  float out[32];
  unsigned group;             // the commit group it belongs to (the fiber's count at the issue)
  bool superseded;            // a later wgmma on the same accumulators took its result over
  std::uint64_t adesc, bdesc;  // adesc 0: A from registers
  int trans_b, row0;
  std::uint64_t read;         // a hash of the shared memory it read, checked again at the wait
};

// A cp.async copy in flight: its 16 bytes, taken from global memory at issue.
struct Copy {
  unsigned char* dst;
  unsigned char bytes[16];
  unsigned group;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Wait wait = RUNNABLE;
  std::vector<Copy> copies;  // issued by this thread, not yet waited for
  unsigned committed = 0;    // groups committed so far
  std::vector<Wgmma> wgmmas;  // in flight
  unsigned wgmma_groups = 0;  // wgmma.commit_group so far
  bool wgmma_fenced = false;  // a wgmma.fence since the last wgmma.wait_group (or the start)
};

constexpr std::size_t STACK_BYTES = 256 << 10;
constexpr std::size_t GUARD_BYTES = 256;
constexpr unsigned char GUARD = 0xA5;

struct State {
  std::vector<Fiber> fibers;
  std::vector<Lane> lanes;
  ucontext_t scheduler;
  int current = 0;
  std::vector<unsigned char> shared;
  void (*run)(void**) = nullptr;
  void** params = nullptr;
  // Resume fibers from the last thread to the first, and let one warp at a time (the last
  // first) run from a block barrier (or the start) until it waits at the next one or ends,
  // warp-synchronous operations included: a missing barrier that the forward order hides (a
  // later thread reading what an earlier one wrote, or a warp overwriting what a slower warp
  // still reads: in the forward order the warps move in lockstep) shows up in this one.
  bool reverse = false;
  // The first misuse a block made that the emulator could not let happen (ldmatrix outside
  // shared memory or misaligned): reported when the block ends.
  std::string fault;
  // Each warp's wgmma, in order (lane 0's descriptors, shape and flags): the four warps of a
  // warpgroup must issue the same ones (checked when the block ends).
  std::vector<std::vector<std::uint64_t>> wgmma_log;
};
thread_local State st;

static int lane_id() { return st.current % 32; }

static void park(Wait w) {
  st.fibers[st.current].wait = w;
  swapcontext(&st.fibers[st.current].ctx, &st.scheduler);
}

void syncthreads() { park(AT_BLOCK_BARRIER); }

float shfl_xor(float x, int mask) {
  const int me = st.current, base = me - lane_id();
  st.lanes[me].x = x;
  park(AT_WARP_BARRIER);
  const float r = st.lanes[base + (lane_id() ^ mask)].x;
  park(AT_WARP_BARRIER);  // nobody overwrites a slot before every lane has read it
  return r;
}

// __ballot_sync over the whole warp: bit l of the result is lane l's predicate.
unsigned ballot(bool pred) {
  const int me = st.current, base = me - lane_id();
  st.lanes[me].x = pred ? 1.f : 0.f;
  park(AT_WARP_BARRIER);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (st.lanes[base + l].x != 0.f ? 1u : 0u) << l;
  park(AT_WARP_BARRIER);  // nobody overwrites a slot before every lane has read it
  return r;
}

static float bf16_bits_to_float(unsigned bits) {
  const std::uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One half of a 32-bit register holding two bf16 (low half first).
static float half_of(unsigned reg, int which) { return bf16_bits_to_float(which ? reg >> 16 : reg & 0xffffu); }

// Element (r, k) of the 16 x 16 A operand the warp starting at lane `base` deposited, in the
// fragment layout below (mma.sync's, and wgmma's per warp).
static float fragment_a(int base, int r, int k) {
  const Lane& l = st.lanes[base + 4 * (r % 8) + (k % 8) / 2];
  return half_of(l.a[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
}

// D = A B + C for the warp, m16n8k16, A row-major 16x16, B column-major 16x8, bf16 -> fp32.
// PTX fragment layout, lane = 4 g + t:
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..2t+1), a2 = (g, 2t+8..2t+9), a3 = (g+8, 2t+8..2t+9)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C, D: c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
void mma_m16n8k16(float* c, const unsigned* a, const unsigned* b) {
  const int me = st.current, base = me - lane_id();
  std::memcpy(st.lanes[me].a, a, sizeof st.lanes[me].a);
  std::memcpy(st.lanes[me].b, b, sizeof st.lanes[me].b);
  park(AT_WARP_BARRIER);
  auto A = [&](int r, int k) { return fragment_a(base, r, k); };
  auto B = [&](int k, int n) {
    const Lane& l = st.lanes[base + 4 * n + (k % 8) / 2];
    return half_of(l.b[k >= 8 ? 1 : 0], k % 2);
  };
  const int g = lane_id() / 4, t = lane_id() % 4;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  park(AT_WARP_BARRIER);
  std::memcpy(c, d, sizeof d);
}

unsigned char* shared_memory() { return st.shared.data(); }

static bool in_shared(const void* p, std::size_t bytes);

// A pointer into shared memory as the state space's address (its offset from the start).
unsigned shared_offset(const void* p) {
  return static_cast<unsigned>(static_cast<const unsigned char*>(p) - st.shared.data());
}

// Element (k, mn) of an operand read through a descriptor (wgmma.cuh): K-major at start +
// (mn % 8) 16 + (k % 8) 2 + (mn / 8) SBO + (k / 8) LBO, MN-major at start + (k % 8) 16 + (mn % 8) 2
// + (mn / 8) SBO + (k / 8) LBO. A swizzled layout or a base offset is a fault (nothing uses them).
static float through_descriptor(std::uint64_t desc, int k, int mn, bool mn_major, const char* which) {
  const unsigned start = static_cast<unsigned>(desc & 0x3fffu) << 4,
                 lbo = static_cast<unsigned>((desc >> 16) & 0x3fffu) << 4,
                 sbo = static_cast<unsigned>((desc >> 32) & 0x3fffu) << 4;
  if (((desc >> 49) & 7u) != 0 || (desc >> 62) != 0) {
    if (st.fault.empty()) st.fault = "wgmma: a descriptor with a swizzle or a base offset (not emulated)";
    return 0.f;
  }
  const unsigned at = start + (mn_major ? (k % 8) * 16 + (mn % 8) * 2 : (mn % 8) * 16 + (k % 8) * 2) +
                      (mn / 8) * sbo + (k / 8) * lbo;
  if (!in_shared(st.shared.data() + at, 2)) {
    if (st.fault.empty())
      st.fault = std::string("wgmma: ") + which + "(" + std::to_string(k) + ", " + std::to_string(mn) +
                 ") at shared byte " + std::to_string(at) + ", outside shared memory";
    return 0.f;
  }
  std::uint16_t v;
  std::memcpy(&v, st.shared.data() + at, 2);
  return bf16_bits_to_float(v);
}

// What an accumulator holds while its wgmma is in flight: a NaN, so that a read before the wait
// spoils what the kernel computes, and a pattern no result has, so that a write before the wait
// shows at the wait.
constexpr std::uint32_t POISON = 0x7fc0deadu;

static void fault_once(const std::string& what) {
  if (st.fault.empty()) st.fault = what;
}

// An FNV-style hash, a word at a time, of the operand values a wgmma read from shared memory.
static std::uint64_t hash_in(std::uint64_t h, float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return (h ^ u) * 0x100000001b3ull;
}

// The shared memory this lane's part of a wgmma reads (A's rows too, when adesc != 0), hashed:
// the hardware may read it any time until the wait, so it must not change before then.
static std::uint64_t operands_read(std::uint64_t adesc, std::uint64_t bdesc, int trans_b, int row0, int cols) {
  const int g = lane_id() / 4, t = lane_id() % 4;
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (int k = 0; k < 16; ++k) {
    for (int j = 0; j < cols / 8; ++j)
      for (int c = 0; c < 2; ++c) h = hash_in(h, through_descriptor(bdesc, k, 8 * j + 2 * t + c, trans_b != 0, "B"));
    if (adesc)
      for (int r = 0; r < 2; ++r) h = hash_in(h, through_descriptor(adesc, k, row0 + g + 8 * r, false, "A"));
  }
  return h;
}

// wgmma.fence, wgmma.commit_group, wgmma.wait_group n (PTX ISA, "Asynchronous Warpgroup Level
// Matrix Multiply-Accumulate"), for this thread's wgmma.
void wgmma_fence() { st.fibers[st.current].wgmma_fenced = true; }
void wgmma_commit() { ++st.fibers[st.current].wgmma_groups; }
// Every committed group but the n latest completes: each wgmma's result lands in its
// accumulators (unless a later one of its chain took it over), which must still hold POISON,
// and the shared memory it read must be what it was at the issue.
void wgmma_wait(int n) {
  Fiber& f = st.fibers[st.current];
  std::vector<Wgmma> later;
  for (const Wgmma& w : f.wgmmas) {
    if (w.group + n >= f.wgmma_groups) {
      later.push_back(w);
      continue;
    }
    if (operands_read(w.adesc, w.bdesc, w.trans_b, w.row0, 2 * w.n) != w.read)
      fault_once("wgmma: thread " + std::to_string(st.current) +
                 ": shared memory a wgmma read changed before its wgmma.wait_group");
    if (w.superseded) continue;
    for (int i = 0; i < w.n; ++i) {
      std::uint32_t u;
      std::memcpy(&u, &w.d[i], 4);
      if (u != POISON)
        fault_once("wgmma: thread " + std::to_string(st.current) +
                   " wrote an accumulator of a wgmma in flight (before its wgmma.wait_group)");
    }
    std::memcpy(w.d, w.out, sizeof(float) * static_cast<std::size_t>(w.n));
  }
  f.wgmmas.swap(later);
  f.wgmma_fenced = false;
}

// The warp's 16 rows of D = (accumulate ? D : 0) + A B (cols columns), A(r, k) by `a`, issued:
// D's input is the latest result of a wgmma of this thread in flight on the same accumulators
// (the chain of a K loop), else the registers; the result lands at the wait (`wgmma_wait`).
template <class A>
static void wgmma_rows(float* d, A a, std::uint64_t adesc, std::uint64_t bdesc, int accumulate, int trans_b, int row0,
                       int cols) {
  const int me = st.current, base = me - lane_id();
  Fiber& f = st.fibers[me];
  const std::uint64_t shape = static_cast<std::uint64_t>(cols) | static_cast<std::uint64_t>(trans_b) << 8 |
                              static_cast<std::uint64_t>(accumulate != 0) << 9;
  Lane& mine = st.lanes[me];
  mine.wgmma[0] = adesc;
  mine.wgmma[1] = bdesc;
  mine.wgmma[2] = shape;
  park(AT_WARP_BARRIER);
  const Lane& first = st.lanes[base];
  if (std::memcmp(first.wgmma, mine.wgmma, sizeof mine.wgmma) != 0)
    fault_once("wgmma: lane " + std::to_string(lane_id()) + " of warp " + std::to_string(me / 32) +
               " gave other descriptors or flags than lane 0");
  if (!f.wgmma_fenced)
    fault_once("wgmma: warp " + std::to_string(me / 32) +
               " issued a wgmma with no wgmma.fence since its last wgmma.wait_group");
  if (lane_id() == 0) {
    auto& log = st.wgmma_log[me / 32];
    log.insert(log.end(), {adesc, bdesc, shape});
  }
  const int n = cols / 2;
  const float* in = d;
  for (auto w = f.wgmmas.rbegin(); w != f.wgmmas.rend(); ++w)
    if (w->d == d && !w->superseded) {
      w->superseded = true;  // its result is this one's input (or, accumulate 0, overwritten)
      in = w->out;
      break;
    }
  Wgmma w{d, n, {}, f.wgmma_groups, false, adesc, bdesc, trans_b, row0, 0};
  const int g = lane_id() / 4, t = lane_id() % 4;
  for (int j = 0; j < cols / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * t + (e % 2);
      float acc = accumulate ? in[4 * j + e] : 0.f;
      for (int k = 0; k < 16; ++k) acc += a(row, k) * through_descriptor(bdesc, k, col, trans_b != 0, "B");
      w.out[4 * j + e] = acc;
    }
  w.read = operands_read(adesc, bdesc, trans_b, row0, cols);
  park(AT_WARP_BARRIER);
  if (!st.fault.empty()) park(DONE);
  for (int i = 0; i < n; ++i) std::memcpy(&d[i], &POISON, 4);
  f.wgmmas.push_back(w);
}

// wgmma.mma_async.sync.aligned.m64n{64,32}k16.f32.bf16.bf16 with A from registers (kernels/wgmma.cuh):
// each warp's 16 rows of D = (accumulate ? D : 0) + A B, A the warp's fragment in mma.sync's
// layout (the PTX ISA's "register fragment" of wgmma's A: the same per warp), D likewise
// (d[4 j + e]: row g + 8 (e >= 2), column 8 j + 2 t + (e & 1), j < cols / 8), and B(k, n) read from shared
// memory through the descriptor as the PTX ISA's "Matrix Descriptor Format" and CUTLASS's
// canonical layouts without swizzle say: start, LBO, SBO in 16-byte units (bits 0-13, 16-29,
// 32-45), K-major or (trans_b) MN-major (`through_descriptor`). Asynchronous as the PTX ISA
// says: the accumulators hold POISON from the issue until a wgmma.wait_group that covers it.
// A's registers are taken at the issue: ptxas keeps them (or serializes the wgmma, and says so).
void wgmma(float* d, const unsigned* a, std::uint64_t desc, int accumulate, int trans_b, int cols) {
  const int me = st.current, base = me - lane_id();
  std::memcpy(st.lanes[me].a, a, sizeof st.lanes[me].a);
  park(AT_WARP_BARRIER);
  float fa[16][16];  // the warp's A, taken before any lane deposits again
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) fa[r][k] = fragment_a(base, r, k);
  wgmma_rows(d, [&](int r, int k) { return fa[r][k]; }, 0, desc, accumulate, trans_b, 0, cols);
}

// The same with A [64 x 16] read from shared memory too (K-major, through adesc): the warp's rows
// are rows 16 (warp % 4) .. of it, as each warp of the warpgroup gets its own rows of D.
void wgmma_ss(float* d, std::uint64_t adesc, std::uint64_t bdesc, int accumulate, int cols) {
  const int row0 = 16 * ((st.current / 32) % 4);
  wgmma_rows(d, [&](int r, int k) { return through_descriptor(adesc, k, row0 + r, false, "A"); }, adesc, bdesc,
             accumulate, 0, row0, cols);
}

static bool in_shared(const void* p, std::size_t bytes) {
  const std::uintptr_t lo = reinterpret_cast<std::uintptr_t>(st.shared.data()),
                       hi = lo + st.shared.size() - GUARD_BYTES, at = reinterpret_cast<std::uintptr_t>(p);
  return at >= lo && at + bytes <= hi;
}

// A vector access the GPU would fault on ("misaligned address"): the block's first such fault.
// The thread goes no further, as the GPU stops the kernel there (the access itself would be
// undefined here: the emulator's 16-byte vector types fault on x86 too).
void check_aligned(const void* p, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes == 0) return;
  if (st.fault.empty())
    st.fault = "misaligned address: thread " + std::to_string(st.current) + " made a " + std::to_string(bytes) +
               "-byte access " + std::to_string(reinterpret_cast<std::uintptr_t>(p) % bytes) +
               " bytes off its alignment";
  park(DONE);
}

// cp.async.cg.shared.global [dst], [src], 16, valid ? 16 : 0. The hardware may land the bytes
// any time between the issue and the wait: the emulator fills the destination with NaN at issue
// and writes the bytes at the wait, so a read before the wait (and the barrier after it), or a
// copy issued into a buffer another thread still reads, shows up as NaN.
void cp_async(void* dst, const void* src, bool valid) {
  Fiber& f = st.fibers[st.current];
  if (valid) check_aligned(src, 16);
  if (!in_shared(dst, 16) || (static_cast<unsigned char*>(dst) - st.shared.data()) % 16 != 0) {
    if (st.fault.empty())
      st.fault = "cp.async: thread " + std::to_string(st.current) + " copied to a destination " +
                 (in_shared(dst, 16) ? "not 16-byte aligned" : "outside shared memory");
    return;
  }
  Copy c{static_cast<unsigned char*>(dst), {}, f.committed};
  if (valid) std::memcpy(c.bytes, src, 16);
  std::memset(dst, 0xff, 16);
  f.copies.push_back(c);
}
void cp_async_commit() { ++st.fibers[st.current].committed; }
// cp.async.wait_group n: every committed group of this thread but the n latest has landed.
void cp_async_wait(int n = 0) {
  Fiber& f = st.fibers[st.current];
  std::vector<Copy> later;
  for (const Copy& c : f.copies) {
    if (c.group + n < f.committed) std::memcpy(c.dst, c.bytes, 16);
    else later.push_back(c);
  }
  f.copies.swap(later);
}

// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lane 8m + r gives the address of row r of matrix m (16 bytes, 16-byte
// aligned, in shared memory); register m of lane 4g + t receives elements (g, 2t), (g, 2t + 1)
// of matrix m, or with trans (2t, g), (2t + 1, g), the first in the low half.
void ldmatrix(unsigned* r, const void* p, int num, bool trans) {
  const int me = st.current, base = me - lane_id();
  st.lanes[me].row = static_cast<const unsigned char*>(p);
  park(AT_WARP_BARRIER);
  for (int m = 0; m < num; ++m)
    for (int i = 0; i < 8; ++i) {
      const unsigned char* row = st.lanes[base + 8 * m + i].row;
      const bool inside = in_shared(row, 16);
      if ((!inside || (row - st.shared.data()) % 16 != 0) && st.fault.empty())
        st.fault = "ldmatrix: lane " + std::to_string(8 * m + i) + " of warp " + std::to_string(me / 32) +
                   " gave a row address " + (inside ? "not 16-byte aligned" : "outside shared memory");
    }
  const int g = lane_id() / 4, t = lane_id() % 4;
  for (int m = 0; m < num; ++m) {
    unsigned halves[2];
    for (int k = 0; k < 2; ++k) {
      const int row = trans ? 2 * t + k : g, col = trans ? g : 2 * t + k;
      const unsigned char* at = st.lanes[base + 8 * m + row].row + 2 * col;
      std::uint16_t v = 0;
      if (st.fault.empty()) std::memcpy(&v, at, 2);
      halves[k] = v;
    }
    r[m] = halves[0] | (halves[1] << 16);
  }
  park(AT_WARP_BARRIER);  // nobody overwrites a row address before every lane has used it
}

// Let the block's threads go from the start or a block barrier: all of them, or in the reverse
// schedule only the last warp, the others HELD until it waits again.
static void let_go(unsigned threads) {
  const unsigned first = st.reverse ? (threads - 1) / 32 * 32 : 0;
  for (unsigned i = 0; i < threads; ++i) st.fibers[i].wait = i >= first ? RUNNABLE : HELD;
}

static void fiber_main() {
  st.run(st.params);
  if (!st.fibers[st.current].copies.empty() && st.fault.empty())
    st.fault = "thread " + std::to_string(st.current) + " exited with cp.async copies it never waited for";
  if (!st.fibers[st.current].wgmmas.empty() && st.fault.empty())
    st.fault = "thread " + std::to_string(st.current) +
               " exited with a wgmma in flight (not committed, or no wgmma.wait_group for its group)";
  st.fibers[st.current].wait = DONE;  // returning resumes the scheduler (uc_link)
}

// The four warps of each warpgroup issued the same wgmma, in the same order: a wgmma is the
// warpgroup's one instruction, its descriptors and flags the same in every thread.
static std::string wgmma_log_check(unsigned threads) {
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
    const auto &mine = st.wgmma_log[w], &first = st.wgmma_log[w / 4 * 4];
    if (mine == first) continue;
    std::size_t i = 0;
    while (i < mine.size() && i < first.size() && mine[i] == first[i]) ++i;
    return "wgmma: warp " + std::to_string(w) + "'s wgmma " + std::to_string(i / 3) + " is not warp " +
           std::to_string(w / 4 * 4) + "'s (" + std::to_string(mine.size() / 3) + " and " +
           std::to_string(first.size() / 3) + " issued; a wgmma is its warpgroup's, with the same descriptors)";
  }
  return "";
}

// Runs one block; returns an error message, empty on success.
static std::string run_block(unsigned threads) {
  st.fault.clear();
  if (st.fibers.size() < threads) st.fibers.resize(threads);
  st.lanes.assign(threads, Lane{});
  st.wgmma_log.assign((threads + 31) / 32, {});
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = st.fibers[i];
    if (f.stack.empty()) f.stack.resize(STACK_BYTES);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &st.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
    f.copies.clear();
    f.committed = 0;
    f.wgmmas.clear();
    f.wgmma_groups = 0;
    f.wgmma_fenced = false;
  }
  let_go(threads);
  for (;;) {
    for (unsigned k = 0; k < threads; ++k) {
      const unsigned i = st.reverse ? threads - 1 - k : k;
      if (st.fibers[i].wait != RUNNABLE) continue;
      st.current = static_cast<int>(i);
      threadIdx.x = i % blockDim.x;
      threadIdx.y = (i / blockDim.x) % blockDim.y;
      threadIdx.z = i / (blockDim.x * blockDim.y);
      swapcontext(&st.scheduler, &st.fibers[i].ctx);
    }
    // Every fiber is parked or done: release a warp barrier or the block barrier.
    unsigned done = 0, at_block = 0;
    bool released = false;
    const unsigned warps = (threads + 31) / 32;
    for (unsigned k = 0; k < warps && !(released && st.reverse); ++k) {
      const unsigned w = st.reverse ? warps - 1 - k : k, lo = w * 32, hi = lo + 32 < threads ? lo + 32 : threads;
      unsigned at_warp = 0;
      for (unsigned i = lo; i < hi; ++i) at_warp += st.fibers[i].wait == AT_WARP_BARRIER;
      if (at_warp == 0) continue;
      if (at_warp != hi - lo && !st.fault.empty()) return st.fault;  // a faulted lane stopped
      if (at_warp != hi - lo)
        return "warp " + std::to_string(w) + ": a warp-synchronous operation that only " + std::to_string(at_warp) +
               " of its " + std::to_string(hi - lo) + " lanes reached";
      for (unsigned i = lo; i < hi; ++i) st.fibers[i].wait = RUNNABLE;
      released = true;
    }
    if (released) continue;
    // Nothing can move: the last warp still held goes next.
    for (unsigned i = threads; i-- > 0;)
      if (st.fibers[i].wait == HELD) {
        for (unsigned j = i / 32 * 32; j <= i; ++j) st.fibers[j].wait = RUNNABLE;
        released = true;
        break;
      }
    if (released) continue;
    for (unsigned i = 0; i < threads; ++i) {
      done += st.fibers[i].wait == DONE;
      at_block += st.fibers[i].wait == AT_BLOCK_BARRIER;
    }
    if (done == threads) return st.fault.empty() ? wgmma_log_check(threads) : st.fault;
    if (at_block == threads) {
      let_go(threads);
      continue;
    }
    if (!st.fault.empty()) return st.fault;  // a faulted thread stopped before the barrier
    return "__syncthreads() reached by " + std::to_string(at_block) + " threads while " + std::to_string(done) +
           " of " + std::to_string(threads) + " had exited";
  }
}

}  // namespace emu

// The kernels' view of the device.
#define DEBERTA_EMULATE 1
#define KERNEL
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define DYNAMIC_SMEM(name) unsigned char* name = emu::shared_memory()
#define __syncthreads() emu::syncthreads()
#define CHECK_ALIGNED(p, bytes) emu::check_aligned((p), (bytes))
#define __shfl_xor_sync(mask, x, lane) emu::shfl_xor((x), (lane))
#define __ballot_sync(mask, pred) emu::ballot(pred)
#define __expf expf
#define __logf logf
static inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
static inline float __uint_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
// cvt.rn.bf16.f32: round to nearest, ties to even; NaN stays NaN.
static inline unsigned short emu_f2bf(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}
static inline void emu_mma(float* c, const unsigned* a, const unsigned* b) { emu::mma_m16n8k16(c, a, b); }
static inline void emu_ldmatrix(unsigned* r, const void* p, int num, bool trans) { emu::ldmatrix(r, p, num, trans); }
static inline void emu_cp_async(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, valid); }
static inline void emu_cp_async_commit() { emu::cp_async_commit(); }
static inline void emu_cp_async_wait() { emu::cp_async_wait(); }
static inline void emu_cp_async_wait_prior() { emu::cp_async_wait(1); }
static inline unsigned emu_shared_offset(const void* p) { return emu::shared_offset(p); }
static inline void emu_wgmma(float* d, const unsigned* a, unsigned long long desc, int accumulate, int trans_b,
                             int n) {
  emu::wgmma(d, a, desc, accumulate, trans_b, n);
}
static inline void emu_wgmma_ss(float* d, unsigned long long adesc, unsigned long long bdesc, int accumulate, int n) {
  emu::wgmma_ss(d, adesc, bdesc, accumulate, n);
}
static inline void emu_wgmma_fence() { emu::wgmma_fence(); }
static inline void emu_wgmma_commit() { emu::wgmma_commit(); }
static inline void emu_wgmma_wait(int n) { emu::wgmma_wait(n); }

// Before the attention kernels: their source defines short macro names (D, BM, WARPS, ...).
namespace adamw {
#include "bf16.cuh"
#include "adamw.cu"
}  // namespace adamw
namespace rln {
#include "bf16.cuh"
#include "residual_norm.cu"
}  // namespace rln
namespace gelu {
#include "bf16.cuh"
#include "gelu.cu"
}  // namespace gelu
namespace ce {
#include "bf16.cuh"
#include "cross_entropy.cu"
}  // namespace ce
namespace wgmma {
#include "bf16.cuh"
#include "wgmma.cuh"
#include "wgmma_probe.cu"
}  // namespace wgmma
namespace hd16 {
#include "bf16.cuh"
#include "wgmma.cuh"
#define HEAD_DIM 16
#include "disentangled_attention.cu"
#undef HEAD_DIM
}  // namespace hd16
namespace hd32 {
#include "bf16.cuh"
#include "wgmma.cuh"
#define HEAD_DIM 32
#include "disentangled_attention.cu"
#undef HEAD_DIM
}  // namespace hd32
namespace hd64 {
#include "bf16.cuh"
#include "wgmma.cuh"
#define HEAD_DIM 64
#include "disentangled_attention.cu"
#undef HEAD_DIM
}  // namespace hd64

// Kernels that break the rules on purpose: the emulator's own tests (cuda.rs).
namespace misuse {
void barrier_in_a_branch(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}
void shuffle_in_half_a_warp(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}
void shared_store(int at) {
  DYNAMIC_SMEM(s);
  s[at] = 0;
}
// A barrier missing after the reads of a block-wide sum, as in two reductions in a row: each
// warp's lane 0 writes its slot, all read all slots, then (after a warp shuffle, as the next
// reduction's) write them again with no barrier between. out[thread] = its sum: the same in
// every thread when the warps move in lockstep, not when one runs ahead.
void reuse_without_a_barrier(float* out) {
  DYNAMIC_SMEM(s);
  float* slot = reinterpret_cast<float*>(s);
  const unsigned warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) slot[warp] = 1.f;
  __syncthreads();
  float sum = 0.f;
  for (unsigned w = 0; w < warps; ++w) sum += slot[w];
  const float next = __shfl_xor_sync(0xffffffffu, 100.f, 1);
  if (threadIdx.x % 32 == 0) slot[warp] = next;
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}
// One warp: shared halfword k holds k; lane 8m + r gives row r of matrix m at byte
// 32 (8m + r) + offset; out[4 lane + m] = its register m of ldmatrix.x4 (trans != 0: .trans).
void ldmatrix_rows(int offset, int trans, unsigned* out) {
  DYNAMIC_SMEM(s);
  if (threadIdx.x == 0)
    for (int k = 0; k < 512; ++k) reinterpret_cast<unsigned short*>(s)[k] = static_cast<unsigned short>(k);
  __syncthreads();
  emu::ldmatrix(out + 4 * threadIdx.x, s + 32 * threadIdx.x + offset, 4, trans != 0);
}
#include "wgmma.cuh"
// One warpgroup, 8 KB of shared memory: D [64][64] = A B with A all ones (registers) and B(k, n)
// = (k + n) % 7 - 3, K-major as in wgmma_probe, four k16 steps; out[32 thread + i] = the
// thread's accumulator i (d[i / 4][i % 4]) as `mode` leaves it:
//   0 as intended; 1 read before the wait; 2 shared memory rewritten before the wait; 3 warp 1's
//   descriptor elsewhere; 4 no wgmma.fence; 5 no commit; 6 the product in two groups of two k16
//   steps on two accumulators, the first read after wgmma_wait<1>, the second before
//   wgmma_wait<0> (out[4096 + 32 thread + i]); 7 an accumulator written before the wait.
void wgmma_misuse(int mode, float* out) {
  DYNAMIC_SMEM(smem);
  unsigned short* B = reinterpret_cast<unsigned short*>(smem);
  for (int e = threadIdx.x; e < 64 * 64; e += 128) {
    const int n = e / 64, k = e % 64;
    B[(n / 8 * 8 + k / 8) * 64 + n % 8 * 8 + k % 8] = emu_f2bf(static_cast<float>((k + n) % 7 - 3));
  }
  fence_proxy_async();
  __syncthreads();
  const unsigned one = 0x3f803f80u, a[4] = {one, one, one, one};
  const unsigned start = wgmma_shared(B) + (mode == 3 && threadIdx.x / 32 == 1 ? 256 : 0);
  float d[8][4] = {}, d2[8][4] = {};
  if (mode != 4) wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) {
    if (mode == 6 && kk == 2) wgmma_commit();
    wgmma_m64n64k16<0>(mode == 6 && kk >= 2 ? d2 : d, a, wgmma_desc(start + 256 * kk, 128, 1024), kk % 2 || (mode != 6 && kk));
  }
  if (mode != 5) wgmma_commit();
  if (mode == 2 && threadIdx.x == 5) B[100] = emu_f2bf(42.f);
  if (mode == 7) d[3][1] = 0.f;
  if (mode == 1 || mode == 6) {
    if (mode == 6) wgmma_wait<1>();
    for (int i = 0; i < 32; ++i) out[32 * threadIdx.x + i] = d[i / 4][i % 4];
    if (mode == 6)
      for (int i = 0; i < 32; ++i) out[4096 + 32 * threadIdx.x + i] = d2[i / 4][i % 4];
  }
  wgmma_wait<0>();
  if (mode != 1 && mode != 6)
    for (int i = 0; i < 32; ++i) out[32 * threadIdx.x + i] = d[i / 4][i % 4];
}
}  // namespace misuse

namespace {

// The launch's parameters as cuLaunchKernel takes them: p[i] points at argument i.
template <class... A, std::size_t... I>
void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
  f(*static_cast<A*>(p[I])...);
}
template <class... A>
void invoke(void (*f)(A...), void** p) {
  call(f, p, std::index_sequence_for<A...>{});
}

struct Entry {
  const char* name;
  int head_dim;  // 0: any
  void (*run)(void**);
};

#define ENTRY(ns, d, f) \
  Entry { #f, d, [](void** p) { invoke(ns::f, p); } }
const Entry KERNELS[] = {
    ENTRY(hd16, 16, dattn_fwd), ENTRY(hd16, 16, dattn_fwd_rel), ENTRY(hd16, 16, dattn_bwd_kv), ENTRY(hd16, 16, dattn_bwd_q),
    ENTRY(hd16, 16, dattn_bwd_kv_rel), ENTRY(hd16, 16, dattn_bwd_q_ds), ENTRY(hd16, 16, dattn_rel_reduce), ENTRY(hd16, 16, dattn_row_dot),
    ENTRY(hd16, 16, dattn_bwd_v_ds), ENTRY(hd16, 16, dattn_bwd_k_ds),
    ENTRY(hd16, 16, dattn_bwd_kv_rel_diag), ENTRY(hd16, 16, dattn_bwd_kv_rel_lean), ENTRY(hd16, 16, dattn_bwd_q_ds_diag), ENTRY(hd16, 16, dattn_bwd_k_ds_diag),
    ENTRY(hd16, 16, dattn_table_grads), ENTRY(hd16, 16, dattn_table_grads_sum),
    ENTRY(hd32, 32, dattn_fwd), ENTRY(hd32, 32, dattn_fwd_rel), ENTRY(hd32, 32, dattn_bwd_kv), ENTRY(hd32, 32, dattn_bwd_q),
    ENTRY(hd32, 32, dattn_bwd_kv_rel), ENTRY(hd32, 32, dattn_bwd_q_ds), ENTRY(hd32, 32, dattn_rel_reduce), ENTRY(hd32, 32, dattn_row_dot),
    ENTRY(hd32, 32, dattn_bwd_v_ds), ENTRY(hd32, 32, dattn_bwd_k_ds),
    ENTRY(hd32, 32, dattn_bwd_kv_rel_diag), ENTRY(hd32, 32, dattn_bwd_kv_rel_lean), ENTRY(hd32, 32, dattn_bwd_q_ds_diag), ENTRY(hd32, 32, dattn_bwd_k_ds_diag),
    ENTRY(hd32, 32, dattn_table_grads), ENTRY(hd32, 32, dattn_table_grads_sum),
    ENTRY(hd64, 64, dattn_fwd), ENTRY(hd64, 64, dattn_fwd_rel), ENTRY(hd64, 64, dattn_bwd_kv), ENTRY(hd64, 64, dattn_bwd_q),
    ENTRY(hd64, 64, dattn_bwd_kv_rel), ENTRY(hd64, 64, dattn_bwd_q_ds), ENTRY(hd64, 64, dattn_rel_reduce), ENTRY(hd64, 64, dattn_row_dot),
    ENTRY(hd64, 64, dattn_bwd_v_ds), ENTRY(hd64, 64, dattn_bwd_k_ds),
    ENTRY(hd64, 64, dattn_bwd_kv_rel_diag), ENTRY(hd64, 64, dattn_bwd_kv_rel_lean), ENTRY(hd64, 64, dattn_bwd_q_ds_diag), ENTRY(hd64, 64, dattn_bwd_k_ds_diag),
    ENTRY(hd64, 64, dattn_table_grads), ENTRY(hd64, 64, dattn_table_grads_sum), ENTRY(hd64, 64, dattn_fwd_rel_wg), ENTRY(hd64, 64, dattn_fwd_rel_wgb),
    ENTRY(hd64, 64, dattn_bwd_kv_rel_lean_wg),
    ENTRY(hd64, 64, dattn_bwd_q_ds_diag_wg), ENTRY(hd64, 64, dattn_table_grads_wg),
    ENTRY(hd64, 0, dattn_dropout_mask),
    ENTRY(rln, 0, rln_fwd_bf16), ENTRY(rln, 0, rln_fwd_f32), ENTRY(rln, 0, rln_bwd_bf16), ENTRY(rln, 0, rln_bwd_f32),
    ENTRY(rln, 0, rln_dropout_mask), ENTRY(adamw, 0, adamw_step), ENTRY(gelu, 0, gelu_bwd_bf16),
    ENTRY(gelu, 0, gelu_bwd_f32), ENTRY(ce, 0, ce_stats_bf16), ENTRY(ce, 0, ce_stats_f32), ENTRY(ce, 0, ce_grad_bf16),
    ENTRY(ce, 0, ce_grad_f32), ENTRY(wgmma, 0, wgmma_probe),
    ENTRY(misuse, 0, barrier_in_a_branch), ENTRY(misuse, 0, shuffle_in_half_a_warp), ENTRY(misuse, 0, shared_store),
    ENTRY(misuse, 0, ldmatrix_rows), ENTRY(misuse, 0, reuse_without_a_barrier), ENTRY(misuse, 0, wgmma_misuse),
};

void set_error(char* err, std::size_t len, const std::string& msg) {
  if (len == 0) return;
  std::snprintf(err, len, "%s", msg.c_str());
}

}  // namespace

// Schedule the fibers of this OS thread's later launches last-to-first (on != 0) or first-to-last.
extern "C" void deberta_emulate_reverse_schedule(int on) { emu::st.reverse = on != 0; }

// Runs kernel `name` (built for `head_dim`) over grid[3] x block[3] with `shared` bytes of
// dynamic shared memory; `params` as cuLaunchKernel's. Returns 0, or 1 with a message in err.
extern "C" int deberta_emulate_launch(const char* name, int head_dim, const unsigned* grid, const unsigned* block,
                                      unsigned shared, void** params, char* err, std::size_t err_len) {
  const Entry* entry = nullptr;
  for (const Entry& e : KERNELS)
    if (std::strcmp(e.name, name) == 0 && (e.head_dim == 0 || e.head_dim == head_dim)) entry = &e;
  if (!entry) {
    set_error(err, err_len, std::string("no emulated kernel ") + name + " for head size " + std::to_string(head_dim));
    return 1;
  }
  blockDim = dim3{block[0], block[1], block[2]};
  gridDim = dim3{grid[0], grid[1], grid[2]};
  const unsigned threads = block[0] * block[1] * block[2];
  if (threads == 0 || threads > 1024) {
    set_error(err, err_len, std::string(name) + ": " + std::to_string(threads) + " threads per block");
    return 1;
  }
  emu::st.run = entry->run;
  emu::st.params = params;
  for (unsigned z = 0; z < grid[2]; ++z)
    for (unsigned y = 0; y < grid[1]; ++y)
      for (unsigned x = 0; x < grid[0]; ++x) {
        blockIdx = dim3{x, y, z};
        emu::st.shared.assign(shared + emu::GUARD_BYTES, 0xff);  // NaN in bf16 and fp32
        std::memset(emu::st.shared.data() + shared, emu::GUARD, emu::GUARD_BYTES);
        const std::string e = emu::run_block(threads);
        if (!e.empty()) {
          set_error(err, err_len,
                    std::string(name) + ", block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                        std::to_string(z) + "): " + e);
          return 1;
        }
        for (std::size_t i = 0; i < emu::GUARD_BYTES; ++i)
          if (emu::st.shared[shared + i] != emu::GUARD) {
            set_error(err, err_len,
                      std::string(name) + ": wrote past its " + std::to_string(shared) +
                          " bytes of dynamic shared memory");
            return 1;
          }
      }
  return 0;
}
