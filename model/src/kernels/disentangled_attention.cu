// Fused disentangled attention (issue G), compiled at run time by NVRTC (model/src/fused_attention.rs).
//
// For one (batch b, head h), with i a query and j a key (both < N):
//   s[i, j] = q[i] . k[j] + c2p[i, (N-1-i) + j] + p2c[j, (N-1-j) + i]
// q is already scaled; c2p and p2c are the relative terms per distance ([B, H, N, 2N-1], column
// N-1-i+j holds distance i-j, bucketing already applied by expanding the table), also scaled.
//   P = softmax_j(s) over the keys with mask[b, j], rows with mask[b, i] = 0 give 0 (XSoftmax);
//   out[i] = sum_j dropout(P)[i, j] v[j].
// Flash-attention style (FA2): key tiles stream through shared memory, scores and
// probabilities stay in registers (the mma accumulator layout doubles as the next mma's A
// operand) with an online softmax, so no [N, N] tensor reaches global memory. The relative
// terms a tile needs are two 64 x 64 bands of the tables, staged in shared memory by coalesced
// loads. The backward recomputes P from the saved log-sum-exp in
// two kernels (keys-major for dK, dV and the p2c table gradient; queries-major for dQ and the
// c2p table gradient), so every output element has one owner: no atomics. The table gradients
// are written per distance, dS[i, j] at (i, N-1-i+j) and (j, N-1-j+i): one writer each.
//
// Layouts: q, k, v, out, dout are [B, N, H, D] (the projections' own layout); dq, dk, dv the
// same with their tokens ldg elements apart (the backward kernels' `ldg`: 3 H D, all three in
// one [B, N, 3, H, D] buffer, whose [B * N, 3 H D] view the projections' backward multiplies);
// lse and dvec [B, H, N] fp32; c2p, p2c and their gradients [H, B, N, 2N] (head-major: one GEMM
// per head over every token makes them; 2N-1 distances and one padding column, so rows stay
// aligned); mask [B, N] u8.
// Tensor cores through mma.sync (bf16 in, fp32 accumulate). 4 warps per block; a warp owns 16 rows.

// No headers (NVRTC ships none of CUDA's): bf16 is its bit pattern, and the tensor cores are
// reached by `mma.sync.m16n8k16` (PTX ISA, "Matrix Fragments for mma.m16n8k16"). In a warp,
// lane = 4 g + t: A (16x16, row) holds (g, 2t..2t+1), (g+8, ..), (g, 2t+8..), (g+8, 2t+8..);
// B (16x8, col) holds (2t..2t+1, g), (2t+8.., g); C (16x8 fp32) holds (g, 2t..2t+1), (g+8, ..).

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#define D HEAD_DIM
#if D % 16 != 0 || D > 64
#error "HEAD_DIM must be a multiple of 16, at most 64"
#endif
#define BM 64
#define BN 64
#define LDS (D + 8)   // padded shared row of a [64][D] tile (bf16): conflict-free fragment loads
#define LDR (BN + 8)  // padded shared row of a [64][64] band
#define WARPS 4
#define NEG_INF (-__int_as_float(0x7f800000))
#define RESCALE_SLACK 8.f  // log2 units: the forward's probabilities stay <= 2^8 (see fwd)
#define POS_INF (__int_as_float(0x7f800000))

// bf16, bf2f, f2bf, pack, lo_f, hi_f, KERNEL and DYNAMIC_SMEM: kernels/bf16.cuh, prepended.
struct FragA { unsigned int x[4]; };
struct FragB { unsigned int x[2]; };

__device__ __forceinline__ unsigned int ld32(const bf16* p) { return *reinterpret_cast<const unsigned int*>(p); }
// The two bands' pairs added as bf16 pairs (one instruction for two scores, where widening
// both and adding in fp32 took three each): c2p + p2c rounded to bf16, as HF's bf16 autocast
// adds them.
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ unsigned int add_bf16x2(unsigned int a, unsigned int b) {
  return pack(f2bf(lo_f(a) + lo_f(b)), f2bf(hi_f(a) + hi_f(b)));
}
#else
__device__ __forceinline__ unsigned int add_bf16x2(unsigned int a, unsigned int b) {
  unsigned int r;  // a * 1 + b, exact up to the rounding: add.bf16x2 needs sm_90, fma sm_80
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(0x3f803f80u), "r"(b));
  return r;
}
#endif

// ldmatrix: the warp loads 8x8 matrices of bf16 from shared memory; lane l gives the address of
// row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned). Matrix m lands in register m, lane
// 4g + t holding its elements (g, 2t..2t+1), or with `.trans` (2t..2t+1, g): exactly the mma
// fragment layouts, one instruction where scalar loads took 4 to 8 (the transposed ones one
// 16-bit load per element).
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ void ldsm4(unsigned int* r, const bf16* p) { emu_ldmatrix(r, p, 4, false); }
__device__ __forceinline__ void ldsm4_t(unsigned int* r, const bf16* p) { emu_ldmatrix(r, p, 4, true); }
__device__ __forceinline__ void ldsm2(unsigned int* r, const bf16* p) { emu_ldmatrix(r, p, 2, false); }
__device__ __forceinline__ void ldsm2_t(unsigned int* r, const bf16* p) { emu_ldmatrix(r, p, 2, true); }
#else
// The 32-bit shared-memory address of p. The intrinsic, not a `cvta` in inline asm: the
// compiler then knows the pointer is shared and keeps the address arithmetic in 32 bits (the
// asm made it build 64-bit generic addresses for every ldmatrix: ~15% of the hot loops'
// instructions, and registers).
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
  return (unsigned int)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void ldsm4(unsigned int* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm4_t(unsigned int* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm2(unsigned int* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm2_t(unsigned int* r, const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
#endif

// cp.async (sm_80+): 16 bytes from global to shared memory without passing through registers,
// so a tile's loads overlap the tensor-core work on the previous one. `valid` false fills zeros.
// A group of copies lands by `cp_async_wait_all` in the thread that issued them; other threads
// see them after the next barrier.
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, bool valid) { emu_cp_async(dst, src, valid); }
__device__ __forceinline__ void cp_async_commit() { emu_cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { emu_cp_async_wait(); }
__device__ __forceinline__ void cp_async_wait_prior() { emu_cp_async_wait_prior(); }
#else
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Every group but the last committed has landed.
__device__ __forceinline__ void cp_async_wait_prior() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
#endif

// A = the 16x16 tile at p, element (r, c) at p[r * ld + c]. Matrices: rows 0-7 / 8-15 (m % 2)
// by columns 0-7 / 8-15 (m / 2).
__device__ __forceinline__ void load_a(FragA& a, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32, m = lane >> 3;
  ldsm4(a.x, p + ((lane & 7) + 8 * (m & 1)) * ld + 8 * (m >> 1));
}
// B (16 k x 8 n) with element (k, n) at p[n * ld + k] (a row-major [n][k] tile: B = tile^T).
__device__ __forceinline__ void load_b_t(FragB& b, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm2(b.x, p + (lane & 7) * ld + 8 * ((lane >> 3) & 1));
}
// The B fragments of two consecutive n blocks (b0: n 0-7, b1: n 8-15) of the same layout:
// matrices n 0-7 / 8-15 (m / 2) by k 0-7 / 8-15 (m % 2).
__device__ __forceinline__ void load_b_t_n2(FragB& b0, FragB& b1, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32, m = lane >> 3;
  unsigned int r[4];
  ldsm4(r, p + ((lane & 7) + 8 * (m >> 1)) * ld + 8 * (m & 1));
  b0.x[0] = r[0], b0.x[1] = r[1], b1.x[0] = r[2], b1.x[1] = r[3];
}
// The B fragments of two consecutive k blocks (b0: k 0-15, b1: k 16-31) of the same layout.
__device__ __forceinline__ void load_b_t2(FragB& b0, FragB& b1, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32;
  unsigned int r[4];
  ldsm4(r, p + (lane & 7) * ld + 8 * (lane >> 3));
  b0.x[0] = r[0], b0.x[1] = r[1], b1.x[0] = r[2], b1.x[1] = r[3];
}
// B (16 k x 8 n) with element (k, n) at p[k * ld + n] (a row-major [k][n] tile), for two
// consecutive n blocks (b0: n 0-7, b1: n 8-15): transposed matrices k 0-7 / 8-15 (m % 2) by
// n 0-7 / 8-15 (m / 2).
__device__ __forceinline__ void load_b2(FragB& b0, FragB& b1, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32, m = lane >> 3;
  unsigned int r[4];
  ldsm4_t(r, p + ((lane & 7) + 8 * (m & 1)) * ld + 8 * (m >> 1));
  b0.x[0] = r[0], b0.x[1] = r[1], b1.x[0] = r[2], b1.x[1] = r[3];
}
// c += A B
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ void mma(float* c, const FragA& a, const FragB& b) { emu_mma(c, a.x, b.x); }
#else
__device__ __forceinline__ void mma(float* c, const FragA& a, const FragB& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}
#endif
// x, which the compiler must keep in a register: without it, short of registers, it recomputes
// the key below (25 instructions, from the kernel's parameters) inside the score loops.
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ unsigned int opaque(unsigned int x) { return x; }
#else
__device__ __forceinline__ unsigned int opaque(unsigned int x) {
  asm volatile("mov.b32 %0, %1;" : "=r"(x) : "r"(x));
  return x;
}
#endif

// Phase timing (GPU builds with -DPHASE_TIMING only, for kernel-check's "phases"): no profiler
// reaches these machines, so the kernels time themselves. Each warp reads the SM's clock at the
// boundaries of its tile's phases and adds the cycles to that phase; at the end lane 0 of every
// warp adds its sums to dattn_phase_cycles[kernel][phase] (kernel 0 the forward, 1 the keys
// kernel, 2 the queries kernel from dS). The clock reads are issue times: a phase's cycles
// include the stalls of the instructions it issues, and its waits at barriers (the other
// warps' time). The emulator and the normal builds compile none of it.
#define PHASES 8
#if defined(PHASE_TIMING) && !defined(DEBERTA_EMULATE)
__device__ unsigned long long dattn_phase_cycles[3][PHASES];
// The 32-bit clock (a warp's kernel takes well under 2^32 cycles; differences wrap correctly)
// and 32-bit sums: half the registers of 64-bit ones.
__device__ __forceinline__ unsigned int sm_clock() {
  unsigned int t;
  asm volatile("mov.u32 %0, %%clock;" : "=r"(t));
  return t;
}
#define PHASE_BEGIN                                   \
  unsigned int ph_t = sm_clock(), ph[PHASES];         \
  _Pragma("unroll") for (int ph_k = 0; ph_k < PHASES; ++ph_k) ph[ph_k] = 0
#define PHASE(k)                          \
  do {                                    \
    const unsigned int ph_now = sm_clock(); \
    ph[k] += ph_now - ph_t;               \
    ph_t = ph_now;                        \
  } while (0)
#define PHASE_END(kernel)                                                                       \
  do {                                                                                          \
    if (threadIdx.x % 32 == 0) {                                                                \
      _Pragma("unroll") for (int ph_k = 0; ph_k < PHASES; ++ph_k)                               \
        atomicAdd(&dattn_phase_cycles[kernel][ph_k], (unsigned long long)ph[ph_k]);            \
    }                                                                                           \
  } while (0)
#else
#define PHASE_BEGIN
#define PHASE(k) ((void)0)
#define PHASE_END(kernel) ((void)0)
#endif

// Attention dropout: a counter-based hash of (seed, b, h, i, j), the same in every kernel. The
// 64-bit mix of (seed, b·H + h) is taken once per kernel (`head_key`); then only 32-bit work:
// (i, j) packed into one word (N <= 65536, a bijection), xored with the key, then murmur3's
// finalizer. One hash serves the keys j and j + 8 (j with bit 3 clear), 16 bits each: every
// kernel's lane holds both (the forward and the queries kernel in neighbouring 8-column
// blocks, the keys kernel in its two rows), so each pays half a hash per score. The score loops
// are issue-bound: a 64-bit mix per element once cost more than the rest of its work together.
// The finalizer's last step, h ^= h >> 16, leaves the upper half as it is, so `pair_hash` stops
// before it and `kept` applies it to the lower half only: the one shift serves both halves.
__device__ __forceinline__ unsigned int head_key(unsigned long long seed, long long bh) {
  unsigned long long z = seed + (unsigned long long)(bh + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return opaque((unsigned int)((z ^ (z >> 31)) >> 32));
}
// The hash of the pair (i, j), (i, j + 8), but the finalizer's last step; j has bit 3 clear.
__device__ __forceinline__ unsigned int pair_hash(unsigned int key, int i, int j) {
  unsigned int x = (((unsigned int)i << 16) | (unsigned int)j) ^ key;
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  return x;
}
// Whether the score of key j (upper: j + 8) of the pair is kept; threshold = p 2^16.
__device__ __forceinline__ bool kept(unsigned int hash, bool upper, unsigned int threshold) {
  const unsigned int hi = hash >> 16;
  return (upper ? hi : (hash ^ hi) & 0xffffu) >= threshold;
}
#define DROP_THRESHOLD(p) ((unsigned int)((p) * 65536.0))

// The kernels run 128 threads per block. The tile loaders below use cp.async; the band loader
// (tables path) issues all of a thread's global loads before its shared stores, so their
// latencies overlap instead of adding up.
#define THREADS 128

// Rows [r0, r0 + 64) of head h of batch b from a [B, N, H, D] tensor into dst [64][LDS] by
// cp.async (the caller commits and waits); rows past N are zero. By 128 threads, tid its index.
// Thread tid copies 16 bytes at column k of rows r, r + STEP, ...: one 64-bit address, then
// constant steps (a 64-bit product per copy cost ~10 instructions each).
__device__ __forceinline__ void load_tile_async(bf16* __restrict__ dst, const bf16* __restrict__ src, int b, int h,
                                                int r0, int N, int H, int tid) {
  constexpr int CHUNKS = D / 8, PER = BN * CHUNKS / THREADS, STEP = THREADS / CHUNKS;
  const int t = opaque(tid), r = t / CHUNKS, k = t % CHUNKS * 8;  // opaque: not hoisted out of loops
  const bf16* from = src + (((long long)b * N + r0 + r) * H + h) * D + k;
  const long long step = (long long)STEP * H * D;
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const bool in = r0 + r + it * STEP < N;
    cp_async16(dst + (r + it * STEP) * LDS + k, in ? from + it * step : src, in);
  }
}
__device__ __forceinline__ void load_tile_async(bf16* __restrict__ dst, const bf16* __restrict__ src, int b, int h,
                                                int r0, int N, int H) {
  load_tile_async(dst, src, b, h, r0, N, H, threadIdx.x);
}
// As `load_tile_async`, into a core-matrix tile (the layout wgmma reads without swizzle,
// kernels/wgmma.cuh; no padding, 8 KB at D = 64): row r's columns [8 c, 8 c + 8) at element
// 8 D (r / 8) + 64 c + 8 (r % 8). A warp's 32 copies are 4 columns of 8 rows, so that they fill
// the 32 banks 4 times over (by rows first, 8 columns of one row would all land in 4 banks).
// For a key tile the core matrices along a row are wgmma's K direction (LBO 128 bytes), along
// the rows its N (SBO 16 D bytes); for a value tile the other way round.
// By 128 threads, tid its index.
__device__ __forceinline__ void load_tile_cm_async(bf16* __restrict__ dst, const bf16* __restrict__ src, int b,
                                                   int h, int r0, int N, int H, unsigned int tid) {
  constexpr unsigned int CHUNKS = D / 8, PER = BN * CHUNKS / THREADS, STEP = THREADS / CHUNKS;
  const unsigned int t = opaque(tid), r = t % 8 + 8 * (t / (8 * CHUNKS)), c = t / 8 % CHUNKS;
  const bf16* from = src + (((long long)b * N + r0 + r) * H + h) * D + c * 8;
  const long long step = (long long)STEP * H * D;
  bf16* to = dst + r / 8 * 8 * D + c * 64 + r % 8 * 8;  // STEP is a multiple of 8: + 8 D STEP / 8 per copy
#pragma unroll
  for (unsigned int it = 0; it < PER; ++it) {
    const bool in = r0 + (int)(r + it * STEP) < N;
    cp_async16(to + it * STEP * D, in ? from + it * step : src, in);
  }
}
__device__ __forceinline__ void load_tile_cm_async(bf16* __restrict__ dst, const bf16* __restrict__ src, int b,
                                                   int h, int r0, int N, int H) {
  load_tile_cm_async(dst, src, b, h, r0, N, H, threadIdx.x);
}
// The A fragments of rows [row0, row0 + 16) of a core-matrix tile (`load_tile_cm_async`), as
// `load_rows` takes them from a padded one.
__device__ __forceinline__ void load_rows_cm(FragA* a, const bf16* tile, int row0) {
  const unsigned int lane = threadIdx.x % 32, m = lane >> 3, r = row0 + (lane & 7) + 8 * (m & 1);
  const bf16* p = tile + r / 8 * 8 * D + (m >> 1) * 64 + r % 8 * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm4(a[kk].x, p + kk * 128);
}

// band[r][c] = table[row0 + r][(N-1-(row0+r)) + col0 + c] for r, c < 64 (0 outside [0, N)): the
// relative term of (row0 + r, col0 + c) in a table indexed (row, N-1-row+col). Coalesced: each
// band row is a contiguous run of the table row.
__device__ __forceinline__ void load_band(bf16* __restrict__ band, const bf16* __restrict__ table, long long tb, int N,
                                          int row0, int col0) {
  const int W = 2 * N;  // row stride: 2N-1 distances, padded to 2N
  constexpr int PER = 64 * 64 / THREADS;
  const int c = threadIdx.x % 64, col = col0 + c;
  bf16 v[PER];
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const int r = it * (THREADS / 64) + threadIdx.x / 64, row = row0 + r;
    v[it] = 0;
    if (table && row < N && col < N) v[it] = table[(tb * N + row) * W + (N - 1 - row) + col];
  }
#pragma unroll
  for (int it = 0; it < PER; ++it) band[(it * (THREADS / 64) + threadIdx.x / 64) * LDR + c] = v[it];
}

// The inverse for a gradient: table[row0 + r][(N-1-(row0+r)) + col0 + c] = band[r][c] (in range).
__device__ __forceinline__ void store_band(bf16* __restrict__ table, const bf16* __restrict__ band, long long tb,
                                           int N, int row0, int col0) {
  const int W = 2 * N;
  for (int e = threadIdx.x; e < 64 * 64; e += THREADS) {
    const int r = e / 64, c = e % 64, row = row0 + r, col = col0 + c;
    if (row < N && col < N) table[(tb * N + row) * W + (N - 1 - row) + col] = band[r * LDR + c];
  }
}

// The warp's 16 rows of a [64][LDS] tile as A fragments.
__device__ __forceinline__ void load_rows(FragA* a, const bf16* p) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(a[kk], p + kk * 16, LDS);
}

// acc0 (16 x 8) += rows . p0^T and acc1 += rows . p1^T, p0 and p1 each 8 rows [8][LDS]
// (row-major) of the other operand. The two chains of mma alternate: each mma waits for the
// last one of its chain, and one chain alone left the tensor cores idle in between (ptxas put
// a NOP after each).
__device__ __forceinline__ void rows_dot_8x2(float* acc0, float* acc1, const FragA* a, const bf16* p0,
                                             const bf16* p1) {
  int kk = 0;
#pragma unroll
  for (; kk + 1 < D / 16; kk += 2) {
    FragB b0, b1, c0, c1;
    load_b_t2(b0, b1, p0 + kk * 16, LDS);
    load_b_t2(c0, c1, p1 + kk * 16, LDS);
    mma(acc0, a[kk], b0);
    mma(acc1, a[kk], c0);
    mma(acc0, a[kk + 1], b1);
    mma(acc1, a[kk + 1], c1);
  }
  if (D / 16 % 2) {
    FragB b, c;
    load_b_t(b, p0 + kk * 16, LDS);
    load_b_t(c, p1 + kk * 16, LDS);
    mma(acc0, a[kk], b);
    mma(acc1, a[kk], c);
  }
}

// acc[n8] += A . tile^T over the 16 columns kk: A the 16 x 16 slice kk of a warp's rows, tile
// NB * 8 rows [..][LDS] in shared memory.
template <int NB>
__device__ __forceinline__ void slice_times_tile_t(float (*acc)[4], const FragA& a, const bf16* tile, int kk) {
#pragma unroll
  for (int n8 = 0; n8 < NB; n8 += 2) {
    FragB b0, b1;
    load_b_t_n2(b0, b1, tile + n8 * 8 * LDS + kk * 16, LDS);
    mma(acc[n8], a, b0);
    mma(acc[n8 + 1], a, b1);
  }
}

// acc[n8] (the 16 x 8 NB block, 8 columns per n8) = rows . tile^T, rows the warp's 16 rows
// [16][LDS] and tile NB * 8 rows [..][LDS] in shared memory. Their fragments are loaded here, one
// 16-column slice at a time, rather than kept in registers across the tiles: the backward
// kernels need those registers (ldmatrix makes the reload cheap).
template <int NB>
__device__ __forceinline__ void rows_times_tile_t(float (*acc)[4], const bf16* rows, const bf16* tile) {
#pragma unroll
  for (int n8 = 0; n8 < NB; ++n8) acc[n8][0] = acc[n8][1] = acc[n8][2] = acc[n8][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA a;
    load_a(a, rows + kk * 16, LDS);
    slice_times_tile_t<NB>(acc, a, tile, kk);
  }
}

// The same with the rows' fragments already in registers (the forward keeps its queries').
template <int NB>
__device__ __forceinline__ void frags_times_tile_t(float (*acc)[4], const FragA* rows, const bf16* tile) {
#pragma unroll
  for (int n8 = 0; n8 < NB; ++n8) acc[n8][0] = acc[n8][1] = acc[n8][2] = acc[n8][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) slice_times_tile_t<NB>(acc, rows[kk], tile, kk);
}

// acc[n8] (16 x D) += A [16 x 16] . p [16][LDS] (16 rows of D, row-major).
__device__ __forceinline__ void a_times_rows(float (*acc)[4], const FragA& a, const bf16* p) {
#pragma unroll
  for (int n8 = 0; n8 < D / 8; n8 += 2) {
    FragB b0, b1;
    load_b2(b0, b1, p + n8 * 8, LDS);
    mma(acc[n8], a, b0);
    mma(acc[n8 + 1], a, b1);
  }
}

// A [16 x 16 KK] block held as accumulators (8 columns per n8) -> A fragments (16 columns per
// kk): the accumulator layout of columns 2t, 2t+1 (n8 = 2kk) and 2t+8, 2t+9 (n8 = 2kk+1) is the
// A layout, so no shared memory is needed. `pairs_to_a` from the pairs already rounded and
// packed: w[n8][0] = (x[n8][0], x[n8][1]), w[n8][1] = (x[n8][2], x[n8][3]).
template <int KK>
__device__ __forceinline__ void pairs_to_a(FragA* a, const unsigned int (*w)[2]) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) a[kk] = FragA{{w[2 * kk][0], w[2 * kk][1], w[2 * kk + 1][0], w[2 * kk + 1][1]}};
}
template <int KK>
__device__ __forceinline__ void to_a(FragA* a, float (*x)[4]) {
  unsigned int w[2 * KK][2];
#pragma unroll
  for (int n8 = 0; n8 < 2 * KK; ++n8) {
    w[n8][0] = pack(f2bf(x[n8][0]), f2bf(x[n8][1]));
    w[n8][1] = pack(f2bf(x[n8][2]), f2bf(x[n8][3]));
  }
  pairs_to_a<KK>(a, w);
}

// acc[n8] (16 x D) += W [16 x 16 KK] (A fragments) . tile [16 KK][LDS].
template <int KK>
__device__ __forceinline__ void weights_times_tile(float (*acc)[4], const FragA* w, const bf16* tile) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) a_times_rows(acc, w[kk], tile + kk * 16 * LDS);
}

// Write the accumulators acc (a warp's [16][D]) as bf16 rows row0 + g, row0 + g + 8 of head h of
// a [B, N, H, D] tensor whose tokens are ld elements apart (H * D if contiguous; the backward
// writes dq, dk, dv into one [B, N, 3, H, D] buffer), scaled by s0 and s1.
__device__ __forceinline__ void write_rows(bf16* dst, float (*acc)[4], float s0, float s1, int b, int h, int row0,
                                           int N, long long ld) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    if (row >= N) continue;
    const float s = half ? s1 : s0;
    bf16* p = dst + ((long long)b * N + row) * ld + h * D + 2 * t;
#pragma unroll
    for (int n8 = 0; n8 < D / 8; ++n8)
      *reinterpret_cast<unsigned int*>(p + n8 * 8) = pack(f2bf(acc[n8][2 * half] * s), f2bf(acc[n8][2 * half + 1] * s));
  }
}

// The column sums of a warp's 16 rows of acc (those before row N), in fp32, into the row group
// row0 / 16 of `sums`, a [B, ceil(N / 16), 3, H, D] buffer whose groups are ld elements apart, at
// the slot `sums` points to: the q, k, v projections' bias gradients, which
// `fused_attention::kernel_backward` sums over the groups (one fp32 row per 16 tokens: an eighth
// of the bytes of the bf16 dq, dk, dv that the sum over the tokens read). A lane holds columns 2t, 2t + 1 of each 8-column
// block for the rows g and g + 8: summed in the thread, then over g by three shuffles (the same
// order in every warp); lanes 0-3 write. Nothing without `sums`, or for a warp past the last row.
__device__ __forceinline__ void sum_rows(float* __restrict__ sums, float (*acc)[4], int b, int h, int row0, int N,
                                         long long ld) {
  if (sums == nullptr || row0 >= N) return;  // uniform across the warp
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const bool in_a = row0 + g < N, in_b = row0 + g + 8 < N;
  float* p = sums + ((long long)b * ((N + 15) / 16) + row0 / 16) * ld + h * D + 2 * t;
#pragma unroll
  for (int n8 = 0; n8 < D / 8; ++n8) {
    float c0 = (in_a ? acc[n8][0] : 0.f) + (in_b ? acc[n8][2] : 0.f);
    float c1 = (in_a ? acc[n8][1] : 0.f) + (in_b ? acc[n8][3] : 0.f);
#pragma unroll
    for (int m = 4; m < 32; m *= 2) {
      c0 += __shfl_xor_sync(0xffffffffu, c0, m);
      c1 += __shfl_xor_sync(0xffffffffu, c1, m);
    }
    if (g == 0) {
      CHECK_ALIGNED(p + n8 * 8, 8);
      *reinterpret_cast<float2*>(p + n8 * 8) = make_float2(c0, c1);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The softmax's exponentials as 2^(x log2 e - m log2 e): one FFMA and one MUFU per element.
// __expf is the same MUFU, plus a subtraction, a multiplication and a fix-up for subnormal
// results (which `.ftz` flushes to zero: a probability below 1e-38 is zero in bf16 anyway).
#define L2E 1.4426950408889634f
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
#else
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#endif

// Bit c: key n0 + c of batch b is in range and unmasked (c < 64). Each warp builds it from two
// ballots, in registers: the score loops test a bit instead of loading a shared byte per score.
__device__ __forceinline__ unsigned long long key_bits(const unsigned char* __restrict__ mask, int b, int n0, int N) {
  const int lane = threadIdx.x % 32, lo = n0 + lane, hi = lo + 32;
  const unsigned int a = __ballot_sync(0xffffffffu, lo < N && mask[(long long)b * N + lo]);
  const unsigned int c = __ballot_sync(0xffffffffu, hi < N && mask[(long long)b * N + hi]);
  return (unsigned long long)c << 32 | a;
}

// ---- Relative terms computed in the kernel (the `_rel` kernels) ----------------------------
// Instead of the [H, B, N, 2N] tables, these kernels read the per-distance tables themselves,
// K_r and Q_r as [H][2N][D] (row m: distance N-1-m for K_r, m-(N-1) for Q_r; row 2N-1 is
// padding), and compute the bands on the tensor cores. For query rows [i0, i0 + 64) and key
// columns [j0, j0 + 64), c2p(i, j) = q_i . K_r[N-1-i+j]: with r = i - i0, c = j - j0 that is row
// 63 - r + c of the 128-row window of K_r from N-1-(i0+63)+j0. p2c(i, j) = k_j . Q_r[N-1-j+i]
// is row 63 - c + r of the window of Q_r from N-1-(j0+63)+i0.

// Rows [m0, m0 + 64) of head h of a per-distance table into dst [64][LDS] by cp.async; rows
// outside [0, 2N-1) are zero.
__device__ __forceinline__ void load_chunk_async(bf16* __restrict__ dst, const bf16* __restrict__ table, int h, int m0,
                                                 int N) {
  constexpr int CHUNKS = D / 8, PER = BN * CHUNKS / THREADS, STEP = THREADS / CHUNKS;
  const int t = opaque(threadIdx.x), r = t / CHUNKS, k = t % CHUNKS * 8;
  const bf16* from = table + ((long long)h * 2 * N + m0 + r) * D + k;  // as load_tile_async
#pragma unroll
  for (int it = 0; it < PER; ++it) {
    const int m = m0 + r + it * STEP;
    cp_async16(dst + (r + it * STEP) * LDS + k, (unsigned)m < (unsigned)(2 * N - 1) ? from + it * STEP * D : table,
               (unsigned)m < (unsigned)(2 * N - 1));
  }
}

// The same into a core-matrix tile (as `load_tile_cm_async`; 64 rows, 8 KB at D = 64): a 128-row
// window is two, the second at dst + 64 D.
__device__ __forceinline__ void load_chunk_cm_async(bf16* __restrict__ dst, const bf16* __restrict__ table, int h,
                                                    int m0, int N) {
  constexpr unsigned int CHUNKS = D / 8, PER = BN * CHUNKS / THREADS, STEP = THREADS / CHUNKS;
  const unsigned int t = opaque(threadIdx.x), r = t % 8 + 8 * (t / (8 * CHUNKS)), c = t / 8 % CHUNKS;
  const bf16* from = table + ((long long)h * 2 * N + m0 + (int)r) * D + c * 8;
  bf16* to = dst + r / 8 * 8 * D + c * 64 + r % 8 * 8;
#pragma unroll
  for (unsigned int it = 0; it < PER; ++it) {
    const bool in = (unsigned)(m0 + (int)(r + it * STEP)) < (unsigned)(2 * N - 1);
    cp_async16(to + it * STEP * D, in ? from + it * STEP * D : table, in);
  }
}

// A tile's 128-row window, kept in two 64-row slots of shared memory ([2][64][LDS]). Along a
// kernel's tiles the window's start moves by 64 rows (dir = +1, up; -1, down), so consecutive
// windows share half their rows: the slots alternate, and after tile 0 each tile loads only
// its new half. Tile n: up, rows [0, 64) in slot n % 2 and [64, 128) in slot (n + 1) % 2; down,
// the other way round. The new half of tile n (n > 0) goes to slot (n + 1) % 2, the half that
// tile n - 1 was the last to read.
struct Window {
  const bf16* lo;  // window rows [0, 64)
  const bf16* hi;  // window rows [64, 128)
  __device__ __forceinline__ const bf16* row(int x) const { return x < 64 ? lo + x * LDS : hi + (x - 64) * LDS; }
};
// SLOT: elements from one slot to the next (64 padded rows; 64 D for the wgmma forward's
// core-matrix slots).
template <int SLOT = 64 * LDS>
__device__ __forceinline__ Window window_of(const bf16* slots, int n, int dir) {
  const bf16 *a = slots + (n & 1) * SLOT, *b = slots + ((n + 1) & 1) * SLOT;
  return dir > 0 ? Window{a, b} : Window{b, a};
}
// What tile n (window rows [start, start + 128)) lacks of its window, by cp.async.
__device__ __forceinline__ void load_window_async(bf16* slots, const bf16* table, int h, int start, int n, int dir,
                                                  int N) {
  bf16* next = slots + ((n + 1) & 1) * 64 * LDS;
  if (n == 0) load_chunk_async(slots, table, h, dir > 0 ? start : start + 64, N);
  load_chunk_async(next, table, h, dir > 0 ? start + 64 : start, N);
}
// The same, each half a core-matrix tile (`load_chunk_cm_async`) in its slot (SLOT as `window_of`).
template <int SLOT = 64 * LDS>
__device__ __forceinline__ void load_window_cm_async(bf16* slots, const bf16* table, int h, int start, int n, int dir,
                                                     int N) {
  bf16* next = slots + ((n + 1) & 1) * SLOT;
  if (n == 0) load_chunk_cm_async(slots, table, h, dir > 0 ? start : start + 64, N);
  load_chunk_cm_async(next, table, h, dir > 0 ? start + 64 : start, N);
}
// A whole window (rows [start, start + 128)) into dst [128][LDS], by cp.async: for a kernel that
// reuses the window's memory within the tile (the lean keys kernel), so keeps no half of it.
__device__ __forceinline__ void load_whole_window_async(bf16* dst, const bf16* table, int h, int start, int N) {
  load_chunk_async(dst, table, h, start, N);
  load_chunk_async(dst + 64 * LDS, table, h, start + 64, N);
}

// Where `skewed_band_t`'s product e (accumulator element) of window group n8 lands in the
// band: band row r, column c (stored at band[c][r]); false if outside it.
__device__ __forceinline__ bool skewed_at(int n8, int e, int& r, int& c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  // c = 8 k - 15 + v with k = n8 + (e >= 2) and v = 2t + g + (e & 1) in [0, 14], whatever
  // the warp: k = 0 and 10 never land in the band, 2..8 always do; only 1 and 9 check.
  const int k = n8 + (e >> 1);
  r = 16 * warp + g + (e >= 2 ? 8 : 0);
  c = 48 - 16 * warp + n8 * 8 + 2 * t + (e & 1) - 63 + r;
  return k != 0 && k != 10 && (k != 1 || c >= 0) && (k != 9 || c < 64);
}
// The window rows a warp's band reads, 48 - 16 warp + 8 n8 + (0..7) for n8 < 10: in the lo
// slot for n8 < 2 + 2 warp, else in hi. Both bases taken once per band: each group then costs
// a select (n8 < 2 and n8 >= 8 not even that), where `Window::row` took five or six
// instructions.
struct WarpRows {
  const bf16 *lo, *hi;
  int split;
  __device__ __forceinline__ const bf16* group(int n8) const { return (n8 < split ? lo : hi) + n8 * 8 * LDS; }
};
__device__ __forceinline__ WarpRows warp_rows(Window window) {
  const int warp = threadIdx.x / 32;
  return WarpRows{window.lo + (48 - 16 * warp) * LDS, window.hi + (-16 - 16 * warp) * LDS, 2 + 2 * warp};
}
// The products of window groups n8 and n8 + 1 (rows 48 - 16 warp + 8 n8, ...) with the warp's
// rows a: acc[0] and acc[1].
__device__ __forceinline__ void skewed_groups(float (*acc)[4], const FragA* a, WarpRows rows, int n8) {
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[0][e] = acc[1][e] = 0.f;
  rows_dot_8x2(acc[0], acc[1], a, rows.group(n8), rows.group(n8 + 1));
}
// The warp's 16 rows as mma B fragments, b[kk][0] rows 0-7 and b[kk][1] rows 8-15 of columns
// [16 kk, 16 kk + 16): from their A fragments' registers, or by ldmatrix from the rows [16][LDS]
// at p. A B operand is a register pair, (x[0], x[2]) and (x[1], x[3]) of A's four, so the
// registers are copied, xored with `zero` (0, from the kernel's arguments: N >> 17): plain
// copies the compiler hoists out of the tile loop and then keeps the A fragments themselves in
// B's order, rebuilding A's quadruples at every use instead (the forward: 66 moves per tile).
__device__ __forceinline__ void rows_as_b(FragB (*b)[2], const FragA* a, unsigned int zero) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    b[kk][0] = FragB{{a[kk].x[0] ^ zero, a[kk].x[2] ^ zero}};
    b[kk][1] = FragB{{a[kk].x[1] ^ zero, a[kk].x[3] ^ zero}};
  }
}
__device__ __forceinline__ void load_rows_b(FragB (*b)[2], const bf16* p) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_b_t_n2(b[kk][0], b[kk][1], p + kk * 16, LDS);
}
// The same from a core-matrix tile (`load_tile_cm_async`), rows row0 .. row0 + 15.
__device__ __forceinline__ void load_rows_b_cm(FragB (*b)[2], const bf16* tile, int row0) {
  const unsigned int lane = threadIdx.x % 32, m = lane >> 3, r = row0 + (lane & 7) + 8 * (m >> 1);
  const bf16* p = tile + r / 8 * 8 * D + (m & 1) * 64 + r % 8 * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned int x[4];
    ldsm4(x, p + kk * 128);
    b[kk][0] = FragB{{x[0], x[1]}};
    b[kk][1] = FragB{{x[2], x[3]}};
  }
}
// The products of window rows 48 - 16 warp + 16 m + (0..15) (the window as mma's A operand)
// with the warp's 16 rows b (`rows_as_b`; n tiles 0 and 1): acc[n][e] is (window row 16 m + g +
// 8 (e >= 2), row 8 n + 2 t + (e & 1)). The two n tiles' mma chains alternate (see
// `rows_dot_8x2`).
__device__ __forceinline__ void window_times_rows(float (*acc)[4], const FragB (*b)[2], WarpRows rows, int m) {
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[0][e] = acc[1][e] = 0.f;
  const bf16* p = rows.group(2 * m);  // both 8-row groups in one slot: `split` is even
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA w;
    load_a(w, p + kk * 16, LDS);
    mma(acc[0], w, b[kk][0]);
    mma(acc[1], w, b[kk][1]);
  }
}
// Where `window_times_rows`' product e of n tile n, m tile m lands in the band (band row r,
// column c); false if outside it. c = 16 m - 15 + v with v = g + 8 (e >= 2) + q in [0, 30]:
// m = 1..3 always land, m = 0 and 4 check (and none of n = 0, e < 2 at m = 0, v <= 14, or of
// n = 1, e >= 2 at m = 4, v >= 16, lands).
__device__ __forceinline__ bool skewed_at_nt(int m, int n, int e, int& r, int& c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int q = 8 * n + 2 * t + (e & 1);
  r = 16 * warp + q;
  c = 16 * m - 15 + g + (e >= 2 ? 8 : 0) + q;
  if ((m == 0 && n == 0 && e < 2) || (m == 4 && n == 1 && e >= 2)) return false;
  return (m != 0 || c >= 0) && (m != 4 || c < 64);
}
// band[r][c] = row_r . window[63 - r + c] for this warp's 16 band rows r = 16 warp + (0..15)
// and every c < 64. Those rows read window rows [48 - 16 warp, 127 - 16 warp]: 80 rows, 40 mma;
// each (r, c) is written once, by a 16-bit store. Two ways round, each free of shared-memory
// bank conflicts for its store:
//  - `skewed_band_t`, stored transposed, band[c][r], for a score loop whose lanes hold
//    neighbouring r (as the band's other user holds neighbouring c): it then reads both bands as
//    32-bit pairs, where a transposed read took one 16-bit load and a widening per score. The
//    rows are mma's A (their fragments in a), the window B: a store's lanes write 8 rows (g) of
//    4 neighbouring window rows (t), which land 73 elements apart;
//  - `skewed_band`, band[r][c]: the window is A and the rows B (b, `rows_as_b`), so a store's
//    lanes write 8 neighbouring columns (g) of 4 rows (t), 146 elements apart. With the rows as
//    A this store wrote 4 neighbouring columns of 8 rows, 73 apart: 36.5 words, so the rows'
//    words overlapped in 4 of the banks, 64 wavefronts for its 36 stores where there are 36 now.
__device__ __forceinline__ void skewed_band_t(bf16* __restrict__ band, const FragA* a, Window window) {
  const WarpRows rows = warp_rows(window);
#pragma unroll
  for (int n8 = 0; n8 < 10; n8 += 2) {
    float acc[2][4];
    skewed_groups(acc, a, rows, n8);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      int r, c;
      if (skewed_at(n8 + e / 4, e % 4, r, c)) band[c * LDR + r] = f2bf(acc[e / 4][e % 4]);
    }
  }
}
__device__ __forceinline__ void skewed_band(bf16* __restrict__ band, const FragB (*b)[2], Window window) {
  const WarpRows rows = warp_rows(window);
#pragma unroll
  for (int m = 0; m < 5; ++m) {
    float acc[2][4];
    window_times_rows(acc, b, rows, m);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      int r, c;
      if (skewed_at_nt(m, e / 4, e % 4, r, c)) band[r * LDR + c] = f2bf(acc[e / 4][e % 4]);
    }
  }
}
// `skewed_band` in two halves, for a caller whose window shares memory with the band: the
// products, rounded to bf16 and packed in pairs (v[2 m + n][e / 2]), then (after a barrier)
// stored.
__device__ __forceinline__ void skewed_products(unsigned int (*v)[2], const FragB (*b)[2], Window window) {
  const WarpRows rows = warp_rows(window);
#pragma unroll
  for (int m = 0; m < 5; ++m) {
    float acc[2][4];
    window_times_rows(acc, b, rows, m);
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      v[2 * m + n][0] = pack(f2bf(acc[n][0]), f2bf(acc[n][1]));
      v[2 * m + n][1] = pack(f2bf(acc[n][2]), f2bf(acc[n][3]));
    }
  }
}
__device__ __forceinline__ void store_skewed(bf16* __restrict__ band, const unsigned int (*v)[2]) {
#pragma unroll
  for (int mn = 0; mn < 10; ++mn)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int r, c;
      if (skewed_at_nt(mn / 2, mn % 2, e, r, c))
        band[r * LDR + c] = (bf16)(e & 1 ? v[mn][e / 2] >> 16 : v[mn][e / 2] & 0xffffu);
    }
}

__device__ __forceinline__ void zero_band(bf16* band) {
  for (int e = threadIdx.x; e < 64 * LDR; e += THREADS) band[e] = 0;
}
#define BF16_NEG_INF ((bf16)0xff80u)
// The kernels mask keys through the c2p band: `value` (-inf) where the keys that kb (`key_bits`)
// leaves out meet the tile's 64 queries, so that the score loops add it with the band instead of
// testing each score's key. Only tiles with such keys (padding, the last tile when 64 does not
// divide N) take it, by all 128 threads. T: the band is [key][query] (the keys kernels'), else
// [query][key] (the forward's).
template <bool T>
__device__ __forceinline__ void mask_keys(bf16* band, unsigned long long kb, bf16 value) {
  const int key = threadIdx.x % 64, q0 = threadIdx.x / 64 * 32;
  if (!(kb >> key & 1u))
#pragma unroll 1
    for (int i = q0; i < q0 + 32; ++i) band[T ? key * LDR + i : i * LDR + key] = value;
}
// The keys kernels': the block's own keys [kb, kb + 64), the same every tile, masked in their
// band Cb[key][query] after each tile's bands, then a barrier; blocks without masked keys pass.
// `maybe` false: the block has none (`any_masked_key`, taken once, block-uniform), so no tile
// reads its key bits again; the lean kernel has no register for even that flag, so it passes
// true and takes the bits per tile.
__device__ __forceinline__ bool any_masked_key(const unsigned char* __restrict__ mask, int b, int kb, int N) {
  return key_bits(mask, b, kb, N) != ~0ull;
}
__device__ __forceinline__ void mask_own_keys(bool maybe, bf16* Cb, const unsigned char* __restrict__ mask, int b,
                                              int kb, int N) {
  if (!maybe) return;
  const unsigned long long bits = key_bits(mask, b, kb, N);  // block-uniform
  if (bits != ~0ull) {
    mask_keys<true>(Cb, bits, BF16_NEG_INF);
    __syncthreads();
  }
}

// Stage what tile n, queries [i0, i0 + 64) x keys [j0, j0 + 64), needs of the relative terms:
// the c2p band Cb[query][key] and the p2c band Pb[key][query] from the tables, or (REL) what
// the K_r and Q_r windows lack (by cp.async: the caller commits and waits), from which
// `relative_bands` computes the bands. dir: +1 if the tiles walk the keys (K_r's window moves
// up, Q_r's down), -1 if they walk the queries.
template <bool REL>
__device__ __forceinline__ void load_relative(bf16* Cb, bf16* Pb, bf16* KRw, bf16* QRw, const bf16* c2p,
                                              const bf16* p2c, long long tb, int h, int N, int i0, int j0, int n,
                                              int dir) {
  if (REL) {
    if (c2p) load_window_async(KRw, c2p, h, N - 1 - (i0 + 63) + j0, n, dir, N);
    if (p2c) load_window_async(QRw, p2c, h, N - 1 - (j0 + 63) + i0, n, -dir, N);
  } else {
    load_band(Cb, c2p, tb, N, i0, j0);
    load_band(Pb, p2c, tb, N, j0, i0);
  }
}

// REL: the bands from the staged windows; qf the warp's 16 query rows as A fragments, Ks the
// tile's [64][LDS] key rows (each warp multiplies its 16). Ends with a barrier: every warp
// reads Pb. The forward (query rows) gets the p2c band transposed, Pb[query][key]; the keys
// kernel (`relative_bands_t`, key rows) the c2p band, Cb[key][query]: each reads both as pairs.
// zero: 0, for `rows_as_b`. CM: Ks is a core-matrix tile (the wgmma forward's).
template <bool CT, bool PT, bool CM = false>
__device__ __forceinline__ void relative_bands(bf16* Cb, bf16* Pb, Window KRw, Window QRw, bool c2p, bool p2c,
                                               const FragA* qf, const bf16* Ks, unsigned int zero) {
  if (c2p && CT) skewed_band_t(Cb, qf, KRw);
  if (c2p && !CT) {
    FragB qb[D / 16][2];
    rows_as_b(qb, qf, zero);
    skewed_band(Cb, qb, KRw);
  }
  const bf16* own = Ks + threadIdx.x / 32 * 16 * LDS;  // the warp's key rows
  if (p2c && PT) {
    FragA rows[D / 16];
    if (CM) load_rows_cm(rows, Ks, threadIdx.x / 32 * 16);
    else load_rows(rows, own);
    skewed_band_t(Pb, rows, QRw);
  }
  if (p2c && !PT) {
    FragB rows[D / 16][2];
    load_rows_b(rows, own);
    skewed_band(Pb, rows, QRw);
  }
  __syncthreads();
}
// The wgmma forward's (`fwd`'s WG): the windows' halves that tile n lacks, into the core-matrix
// slots [2][64][D] of K_r's and Q_r's windows, by cp.async, as `load_relative` into padded ones.
__device__ __forceinline__ void load_windows_cm(bf16* KRw, bf16* QRw, const bf16* c2p, const bf16* p2c, int h, int N,
                                                int i0, int j0, int n) {
  if (c2p) load_window_cm_async<64 * D>(KRw, c2p, h, N - 1 - (i0 + 63) + j0, n, 1, N);
  if (p2c) load_window_cm_async<64 * D>(QRw, p2c, h, N - 1 - (j0 + 63) + i0, n, -1, N);
}
// A band of the wgmma forward, band[r][c] (T: band[c][r]) = row_r . W[63 - r + c] for the tile's
// 64 rows r and every c < 64, as `skewed_band` (`skewed_band_t`), with both operands read from
// shared memory: A the window W (core-matrix slots; two M = 64 halves), B the rows (a
// core-matrix tile at shared address rows), each read once for the 4 warps where each warp
// loaded its 80 window rows. D is (window row 64 half + 16 warp + g (+8), row 8 j + 2 t (+1)), the
// layout `skewed_band`'s mma gave: its stores are free of bank conflicts both ways round. wgmma
// multiplies every row by all 128 window rows where a row needs 64: the warp stores only the
// 8-row groups whose products reach the band (10 of 16, warp-uniform).
// The halves are two commit groups: the first half's stores run while the second's products do.
// Any group the caller committed before completes with the first half's (`wgmma_wait<1>`).
template <bool T>
__device__ __forceinline__ void band_ss(bf16* __restrict__ band, Window w, unsigned int rows) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  float acc[2][8][4];
  wgmma_fence();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const unsigned int win = wgmma_shared(half ? w.hi : w.lo);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)  // both K-major: along K (D) 128 bytes per core matrix, along M, N 16 D
      wgmma_m64n64k16_ss(acc[half], wgmma_desc_a(win + 256 * kk, 128, 16 * D),
                         wgmma_desc_k(rows + 256 * kk, 128, 16 * D), kk > 0);
    wgmma_commit();
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (half == 0) wgmma_wait<1>();
    else wgmma_wait<0>();
    wgmma_fence_operands(acc[half]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int lo = 64 * half + 16 * warp + 8 * j;  // window row + row of the group: [lo, lo + 22]
      if (lo + 22 < 63 || lo > 126) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = 64 * half + 16 * warp + g + (e >= 2 ? 8 : 0), r = 8 * j + 2 * t + (e & 1), c = x + r - 63;
        if ((unsigned)c < 64u) band[T ? c * LDR + r : r * LDR + c] = f2bf(acc[half][j][e]);
      }
    }
  }
}
// The keys kernel's: the query rows in the tile Qs [64][LDS], the c2p band transposed.
__device__ __forceinline__ void relative_bands_t(bf16* Cb, bf16* Pb, Window KRw, Window QRw, bool c2p, bool p2c,
                                                 const bf16* Qs, const bf16* Ks) {
  FragA qf[D / 16];
  if (c2p) load_rows(qf, Qs + threadIdx.x / 32 * 16 * LDS);
  relative_bands<true, false>(Cb, Pb, KRw, QRw, c2p, p2c, qf, Ks, 0u);
}

// Shared memory of the forward: the Q tile (until each warp holds its rows' fragments, then the
// V tile), the K tile, the c2p band (queries x keys) and the p2c band (keys x queries; with REL
// queries x keys); with REL, the K_r and Q_r windows of the tile. 72 KB with REL: 3 blocks per
// SM (a separate V tile made it 81 KB, 2 blocks).
// Software pipelined (FA2's order) without more shared memory: V's tile loads while the
// scores of K's are computed; the next tile's K (and with REL the new halves of the windows)
// while the probabilities meet V.
// REL: c2p and p2c are K_r and Q_r [H][2N][D] (the `_rel` kernels), else the tables [H, B, N, 2N].
// WG (REL, D = 64, sm_90a: `dattn_fwd_rel_wg`): S = Q K^T and O += P V by wgmma, the K and V
// tiles in core-matrix layout, read from shared memory once for the 4 warps where each warp
// loaded all of both by ldmatrix (128 of the tile's 474 shared-memory wavefronts per warp).
// WGB (with WG: `dattn_fwd_rel_wgb`): the bands by wgmma too (`band_ss`), from the Q tile (kept
// in its own core-matrix tile, V in another: 74 KB, still 3 blocks per SM) and the K tile, and
// the windows in core-matrix slots: 378 -> ~274 wavefronts per warp-tile (its 80 executed band
// stores of 128 written), for ~8% more instructions (the stores' range checks): against WG
// alone, whether shared memory or issue bounds the forward.
template <bool REL, bool WG = false, bool WGB = false>
__device__ __forceinline__ void fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                    const bf16* __restrict__ v, const bf16* __restrict__ c2p,
                                    const bf16* __restrict__ p2c, const unsigned char* __restrict__ mask,
                                    bf16* __restrict__ out, float* __restrict__ lse, int H, int N, float p_drop,
                                    unsigned long long seed) {
  DYNAMIC_SMEM(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Vs = WGB ? Qs + 64 * D : Qs;  // from the first tile on (WGB: its own tile; the bands read Q)
  bf16* Ks = WGB ? Vs + 64 * D : Qs + BM * LDS;
  bf16* Cb = WGB ? Ks + 64 * D : Ks + BN * LDS;  // Cb[query][key]
  bf16* Pb = Cb + BM * LDR;                       // Pb[key][query] (tables), Pb[query][key] (REL)
  bf16* KRw = Pb + BN * LDR;                      // REL: [128][LDS] (WGB: two core-matrix slots [2][64][D])
  bf16* QRw = KRw + (WGB ? 2 * 64 * D : 2 * BN * LDS);  // REL: likewise
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const long long tb = (long long)h * (gridDim.y / H) + b;  // the tables' (head, batch) row block
  const int m_blk = blockIdx.x * BM, i0 = m_blk + warp * 16;
  const int ra = warp * 16 + g, rb = ra + 8;  // this lane's two rows within the block
  const bool oka = m_blk + ra < N && mask[(long long)b * N + m_blk + ra];
  const bool okb = m_blk + rb < N && mask[(long long)b * N + m_blk + rb];
  const unsigned int threshold = DROP_THRESHOLD(p_drop), dkey = head_key(seed, bh);
  const float inv_keep = p_drop > 0.f ? 1.f / (1.f - p_drop) : 1.f;

  if (REL && !c2p) zero_band(Cb);
  if (REL && !p2c) zero_band(Pb);
  if (WGB) {
    load_tile_cm_async(Qs, q, b, h, m_blk, N, H);
    load_tile_cm_async(Ks, k, b, h, 0, N, H);
    load_windows_cm(KRw, QRw, c2p, p2c, h, N, m_blk, 0, 0);
  } else {
    load_tile_async(Qs, q, b, h, m_blk, N, H);
    if (WG) load_tile_cm_async(Ks, k, b, h, 0, N, H);
    else load_tile_async(Ks, k, b, h, 0, N, H);
    if (REL) load_relative<true>(Cb, Pb, KRw, QRw, c2p, p2c, tb, h, N, m_blk, 0, 0, 1);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  PHASE_BEGIN;
  FragA qf[D / 16];  // the warp's queries, held: V's loads take their tile after the next barrier
  if (WGB) load_rows_cm(qf, Qs, warp * 16);
  else load_rows(qf, Qs + warp * 16 * LDS);
  float o[D / 8][4];
#pragma unroll
  for (int n8 = 0; n8 < D / 8; ++n8) o[n8][0] = o[n8][1] = o[n8][2] = o[n8][3] = 0.f;
  float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;

  for (int n0 = 0, n = 0; n0 < N; n0 += BN, ++n) {
    // The previous tile's readers of the bands and V are past its mid-tile barrier.
    if (!REL) load_relative<false>(Cb, Pb, KRw, QRw, c2p, p2c, tb, h, N, m_blk, n0, n, 1);
    const unsigned long long kb = key_bits(mask, b, n0, N);  // the same in every warp
    PHASE(7);
    cp_async_wait_all();  // this tile's K (and windows), issued mid-way through the previous tile
    if (WG) {
      fence_proxy_async();  // K, written by cp.async (the generic proxy), for wgmma's reads
      wgmma_wait_all();     // the previous tile's P V, before any warp loads V over its tile
      wgmma_fence_operands(o);
    }
    __syncthreads();
    PHASE(0);
    if (WG) load_tile_cm_async(Vs, v, b, h, n0, N, H);
    else load_tile_async(Vs, v, b, h, n0, N, H);
    cp_async_commit();
    if (WGB) {  // the bands by wgmma: c2p's rows the queries, p2c's (transposed) the keys
      if (c2p) band_ss<false>(Cb, window_of<64 * D>(KRw, n, 1), wgmma_shared(Qs));
      if (p2c) band_ss<true>(Pb, window_of<64 * D>(QRw, n, -1), wgmma_shared(Ks));
      __syncthreads();
    } else if (REL) {
      relative_bands<false, true, WG>(Cb, Pb, window_of(KRw, n, 1), window_of(QRw, n, -1), c2p, p2c, qf, Ks,
                                      (unsigned int)N >> 17);
    }
    if (kb != ~0ull) {  // block-uniform
      mask_keys<false>(Cb, kb, BF16_NEG_INF);
      __syncthreads();
    }
    PHASE(1);
    float s[BN / 8][4];
    // c2c by wgmma: K-major B, along K (D) 128 bytes per core matrix, along N 16 D. (Issued
    // before the bands, it would overlap them, but with the bands' two halves in flight the
    // registers run out: ptxas serializes every wgmma of the kernel, C7512.)
    if (WG) {
      wgmma_fence();
      const unsigned int ks = wgmma_shared(Ks);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16<0>(s, qf[kk].x, wgmma_desc_k(ks + 256 * kk, 128, 16 * D), kk > 0);
      wgmma_commit();
      wgmma_wait_all();
      wgmma_fence_operands(s);
    } else {
      frags_times_tile_t<BN / 8>(s, qf, Ks);  // c2c
    }
    PHASE(2);
    float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
    for (int n8 = 0; n8 < BN / 8; ++n8) {
      // This lane's keys c, c + 1 of rows ra, rb: the c2p band's pairs are 32-bit words, and
      // (REL) the transposed p2c band's too. A masked key's c2p is -inf (`mask_keys`); a
      // masked query's row is computed as any other and dropped at the end (inv, lse).
      const unsigned int cw[2] = {ld32(Cb + ra * LDR + n8 * 8 + 2 * t), ld32(Cb + rb * LDR + n8 * 8 + 2 * t)};
      const unsigned int bw[2] = {REL ? add_bf16x2(cw[0], ld32(Pb + ra * LDR + n8 * 8 + 2 * t)) : 0u,
                                  REL ? add_bf16x2(cw[1], ld32(Pb + rb * LDR + n8 * 8 + 2 * t)) : 0u};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e < 2 ? ra : rb, c = n8 * 8 + 2 * t + (e & 1);
        s[n8][e] += REL ? (e & 1 ? hi_f(bw[e / 2]) : lo_f(bw[e / 2]))
                        : (e & 1 ? hi_f(cw[e / 2]) : lo_f(cw[e / 2])) + bf2f(Pb[c * LDR + r]);
        if (e < 2) mx_a = fmaxf(mx_a, s[n8][e]);
        else mx_b = fmaxf(mx_b, s[n8][e]);
      }
    }
    mx_a = quad_max(mx_a);
    mx_b = quad_max(mx_b);
    // The running maxima move, and O and l are rescaled, only when some row of the warp meets a
    // score above its maximum by more than RESCALE_SLACK (FlashAttention-4's lazy rescaling; a
    // row's first scores always, m being -inf). Else the probabilities are exp(s - m) <= 2^8,
    // well inside fp32 and bf16, and O / l and lse = m + log l are what they would have been:
    // most tiles after the first skip the rescaling (its exponentials and 32 multiplications).
    if (__ballot_sync(0xffffffffu, (mx_a - m_a) * L2E > RESCALE_SLACK || (mx_b - m_b) * L2E > RESCALE_SLACK)) {
      const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
      const float al_a = new_a == NEG_INF ? 1.f : ex2((m_a - new_a) * L2E);
      const float al_b = new_b == NEG_INF ? 1.f : ex2((m_b - new_b) * L2E);
      l_a *= al_a;
      l_b *= al_b;
#pragma unroll
      for (int n8 = 0; n8 < D / 8; ++n8) {
        o[n8][0] *= al_a;
        o[n8][1] *= al_a;
        o[n8][2] *= al_b;
        o[n8][3] *= al_b;
      }
      m_a = new_a;
      m_b = new_b;
    }
    float sum_a = 0.f, sum_b = 0.f;
    // exp(-inf - m) = 0 for a masked score; a row masked so far (m = -inf) subtracts 0 instead.
    const float sub_a = m_a == NEG_INF ? 0.f : m_a * L2E, sub_b = m_b == NEG_INF ? 0.f : m_b * L2E;
    unsigned int hz[4];  // dropout: the hashes of this lane's keys in blocks n8, n8 + 1 (n8 even)
#pragma unroll
    for (int n8 = 0; n8 < BN / 8; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = ex2(fmaf(s[n8][e], L2E, -(e < 2 ? sub_a : sub_b)));
        if (e < 2) sum_a += p;
        else sum_b += p;
        float pz = p;
        if (p_drop > 0.f) {
          if (n8 % 2 == 0) hz[e] = pair_hash(dkey, m_blk + (e < 2 ? ra : rb), n0 + n8 * 8 + 2 * t + (e & 1));
          pz = kept(hz[e], n8 % 2, threshold) ? p : 0.f;  // 1 / (1 - p_drop): in inv_a, inv_b
        }
        s[n8][e] = pz;
      }
    l_a += sum_a;  // this lane's part of the row's sum: the quad's four are added after the last tile
    l_b += sum_b;
    FragA pa[BN / 16];
    to_a<BN / 16>(pa, s);
    PHASE(3);
    cp_async_wait_all();  // this tile's V
    if (WG) fence_proxy_async();
    __syncthreads();      // and every warp is done with K and the windows' old half
    // Without c2p the band is zeroed once, not rewritten per tile: its -inf go again.
    if (REL && !c2p && kb != ~0ull) mask_keys<false>(Cb, kb, 0);
    PHASE(4);
    if (n0 + BN < N) {
      if (WGB) {
        load_tile_cm_async(Ks, k, b, h, n0 + BN, N, H);
        load_windows_cm(KRw, QRw, c2p, p2c, h, N, m_blk, n0 + BN, n + 1);
      } else {
        if (WG) load_tile_cm_async(Ks, k, b, h, n0 + BN, N, H);
        else load_tile_async(Ks, k, b, h, n0 + BN, N, H);
        if (REL) load_relative<true>(Cb, Pb, KRw, QRw, c2p, p2c, tb, h, N, m_blk, n0 + BN, n + 1, 1);
      }
      cp_async_commit();
    }
    if (WG) {  // O += dropout(P) V by wgmma: MN-major B, along K (keys) 16 D bytes, along N 128
      wgmma_fence();
      const unsigned int vs = wgmma_shared(Vs);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) wgmma_m64n64k16<1>(o, pa[kk].x, wgmma_desc_mn(vs + 32 * D * kk, 16 * D, 128), 1);
      wgmma_commit();  // waited for at the next tile's first barrier (or after the last tile)
    } else {
      weights_times_tile<BN / 16>(o, pa, Vs);  // O += dropout(P) V
    }
    PHASE(5);
  }
  if (WG) {
    wgmma_wait_all();
    wgmma_fence_operands(o);
  }
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = oka && l_a > 0.f ? inv_keep / l_a : 0.f, inv_b = okb && l_b > 0.f ? inv_keep / l_b : 0.f;
  write_rows(out, o, inv_a, inv_b, b, h, i0, N, (long long)H * D);
  if (t == 0) {
    if (i0 + g < N) lse[(long long)bh * N + i0 + g] = oka ? m_a + __logf(l_a) : POS_INF;
    if (i0 + g + 8 < N) lse[(long long)bh * N + i0 + g + 8] = okb ? m_b + __logf(l_b) : POS_INF;
  }
  PHASE(6);
  PHASE_END(0);
}


#define FWD_PARAMS                                                                                              \
  const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v, const bf16 *__restrict__ c2p, \
      const bf16 *__restrict__ p2c, const unsigned char *__restrict__ mask, bf16 *__restrict__ out,                \
      float *__restrict__ lse, int H, int N, float p_drop, unsigned long long seed
// 3 blocks per SM (at most 168 registers; shared memory 36 KB, or 72 KB with REL).
KERNEL void __launch_bounds__(128, 3) dattn_fwd(FWD_PARAMS) {
  fwd<false>(q, k, v, c2p, p2c, mask, out, lse, H, N, p_drop, seed);
}
KERNEL void __launch_bounds__(128, 3) dattn_fwd_rel(FWD_PARAMS) {
  fwd<true>(q, k, v, c2p, p2c, mask, out, lse, H, N, p_drop, seed);
}
#if D == 64 && (defined(DEBERTA_EMULATE) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
// The same with c2c and P V by wgmma (`fwd`'s WG): sm_90a (the build `DEBERTA_WGMMA=forward`
// loads on an H100 or H200), head size 64 (the m64n64k16 shape: N = D for P V).
KERNEL void __launch_bounds__(128, 3) dattn_fwd_rel_wg(FWD_PARAMS) {
  fwd<true, true>(q, k, v, c2p, p2c, mask, out, lse, H, N, p_drop, seed);
}
// The same with the bands by wgmma too (`fwd`'s WGB).
KERNEL void __launch_bounds__(128, 3) dattn_fwd_rel_wgb(FWD_PARAMS) {
  fwd<true, true, true>(q, k, v, c2p, p2c, mask, out, lse, H, N, p_drop, seed);
}
#endif

// Shared memory of the backward kernels: the log-sum-exp (times log2 e; +inf for a masked or
// missing query, whose probabilities are then 0) and D_i of the tile's queries (one 64-bit load
// for both), four tiles, the c2p and p2c bands, then the dS band (tables) or its skewed copy
// DSK [64][LDK] and the K_r, Q_r windows [128][LDS] (REL).
#define LDK (2 * BN + 8)  // padded shared row of the skewed dS band
// The skewed dS [64][LDK] zeroed: a tile writes only its band, the rest must read 0.
__device__ __forceinline__ void zero_skewed(bf16* DSK) {
  for (int e = threadIdx.x; e < 64 * LDK; e += THREADS) DSK[e] = 0;
}
#define BWD_SMEM_SETUP(REL)                                                        \
  DYNAMIC_SMEM(smem);                                                              \
  float2* qstat = reinterpret_cast<float2*>(smem); /* (lse log2 e, D_i) per query */ \
  bf16* T0 = reinterpret_cast<bf16*>(qstat + 64);                                  \
  bf16* T1 = T0 + 64 * LDS;                                                        \
  bf16* T2 = T1 + 64 * LDS;                                                        \
  bf16* T3 = T2 + 64 * LDS;                                                        \
  bf16* Cb = T3 + 64 * LDS;                                                        \
  bf16* Pb = Cb + 64 * LDR;                                                        \
  bf16* DSb = Pb + 64 * LDR;                                                       \
  bf16* DSK = DSb;                         /* REL: [64][LDK] */                    \
  bf16* KRw = DSK + 64 * LDK;              /* REL: [128][LDS] */                   \
  bf16* QRw = KRw + 128 * LDS;             /* REL: [128][LDS] */                   \
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3; \
  const int bh = blockIdx.y, b = bh / H, h = bh % H;                               \
  const long long tb = (long long)h * (gridDim.y / H) + b;                         \
  const unsigned int threshold = DROP_THRESHOLD(p_drop);                          \
  const unsigned int dkey = head_key(seed, bh);                                    \
  const float inv_keep = p_drop > 0.f ? 1.f / (1.f - p_drop) : 1.f;                \
  const int ra = warp * 16 + g, rb = ra + 8;                                       \
  if (REL) zero_skewed(DSK); /* its entries outside the band stay zero */

// A (16x16) with element (r, c) at p[c * ld + r]: a column-major tile, i.e. the transpose of a
// row-major one. Transposed matrices: stored rows (c) 0-7 / 8-15 (m / 2) by r 0-7 / 8-15 (m % 2).
__device__ __forceinline__ void load_a_t(FragA& a, const bf16* p, int ld) {
  const int lane = threadIdx.x % 32, m = lane >> 3;
  ldsm4_t(a.x, p + ((lane & 7) + 8 * (m >> 1)) * ld + 8 * (m & 1));
}

// Window chunk (16 rows) of this warp's gacc[mt] in `relative_grads` within its pair's half.
__device__ __forceinline__ int gacc_chunk(int warp, int mt) { return mt == 0 ? warp % 2 : 3 - warp % 2; }

// The relative half of a backward tile (REL), from DSK, the skewed dS of the block's 64 own rows
// (DSK[r][63 - r + c] = dS[r][c] for the tile's column c, zero elsewhere), and the window W of
// the per-distance table the own rows read (W[x] is distance row m0 + x):
//  - own-row gradient: acc (the warp's 16 rows x D) += DSK[warp's rows] W, over the 80 window
//    rows those rows touch;
//  - table gradient: G = DSK^T own (128 x D; `own` the block's [64][LDS] rows), the sum over the
//    own rows of each window row, for this block's partial rows [off, off + 128) of `part`
//    ([rows][D] bf16: summed in fp32 over the 64 rows, rounded once; the sum over blocks and
//    batches, in `dattn_rel_reduce`, is fp32). Consecutive tiles overlap by 64 rows, so the two warp pairs take turns:
//    at tile k the pair k % 2 takes window rows [0, 64), which the other pair started at tile
//    k - 1 as its rows [64, 128), adds its part to what it kept in gacc and writes them (their
//    last contribution); the other pair starts rows [64, 128) in gacc. No read-modify-write,
//    each partial element written once (`flush_relative` writes the last tile's upper rows).
//    DSK[r][x] is zero unless 63 <= r + x <= 126, so of the 16 x 16 blocks (window chunk xc,
//    own chunk kk) only those with 3 <= xc + kk <= 7 are multiplied: 20 of 32. A warp's two
//    chunks are xc and 3 - xc of its half (`gacc_chunk`): 5 blocks for every warp.
//    Not with TGRAD false: `dattn_table_grads` sums the table gradient by tile diagonals.
template <bool TGRAD>
__device__ __forceinline__ void relative_grads(float (*acc)[4], float (*gacc)[D / 8][4], const bf16* DSK,
                                               Window W, const bf16* own, bf16* __restrict__ part, int off,
                                               int k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int x0 = 48 - 16 * warp;
  const WarpRows rows = warp_rows(W);  // window rows x0 + 8 n8 + (0..7): `group(n8)`
#pragma unroll
  for (int kk = 0; kk < 5; ++kk) {
    FragA a;
    load_a(a, DSK + warp * 16 * LDK + x0 + kk * 16, LDK);
    a_times_rows(acc, a, rows.group(2 * kk));
  }
  if (!TGRAD) return;
  const bool lower = warp / 2 == (k & 1);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int xc = (lower ? 0 : 4) + gacc_chunk(warp, mt), x_base = 16 * xc;
    if (!lower || k == 0)  // the pair starts these rows (lower at tile 0: nobody started them)
#pragma unroll
      for (int n8 = 0; n8 < D / 8; ++n8) gacc[mt][n8][0] = gacc[mt][n8][1] = gacc[mt][n8][2] = gacc[mt][n8][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (xc + kk < 3 || xc + kk > 7) continue;  // an all-zero block of DSK
      FragA a;
      load_a_t(a, DSK + kk * 16 * LDK + x_base, LDK);
      a_times_rows(gacc[mt], a, own + kk * 16 * LDS);  // accumulated in place: no temporary
    }
    if (lower) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        bf16* row = part + (long long)(off + x_base + g + 8 * half) * D + 2 * t;
#pragma unroll
        for (int n8 = 0; n8 < D / 8; ++n8)
          *reinterpret_cast<unsigned int*>(row + n8 * 8) =
              pack(f2bf(gacc[mt][n8][2 * half]), f2bf(gacc[mt][n8][2 * half + 1]));
      }
    }
  }
}

// `relative_grads`' own-row gradient (TGRAD false) by wgmma (the keys and queries kernels' WG):
// acc (the block's 64 rows x D, each warp its 16) += DSK W over all 128 window rows, A the warp's
// rows of the skewed dS, W a core-matrix window, its rows [0, 64) at shared address lo and
// [64, 128) at hi (MN-major B: along K, the window rows, 16 D bytes per core matrix, along N
// 128), read once for the 4 warps where each warp loaded its 80 rows. A warp's rows meet 5 of the 8 16-row steps (3 - warp to 7 - warp; their
// off-band entries zeroed, `zero_skewed_edges`); for the others, which hold no dS of its rows,
// it gives zero fragments: wgmma is the warpgroup's, every warp issues all 8.
__device__ __forceinline__ void relative_grads_wg(float (*acc)[4], const bf16* DSK, unsigned int lo, unsigned int hi) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int s0 = 0; s0 < 8; s0 += 4) {
    FragA a[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      if (s0 + s >= 3 - warp && s0 + s <= 7 - warp) load_a(a[s], DSK + warp * 16 * LDK + 16 * (s0 + s), LDK);
      else a[s] = FragA{{0u, 0u, 0u, 0u}};
    }
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_m64n64k16<1>(acc, a[s].x, wgmma_desc_mn((s0 ? hi : lo) + 32 * D * s, 16 * D, 128), 1);
    wgmma_commit();
  }
  wgmma_wait_all();
  wgmma_fence_operands(acc);
}

// After the last tile (index k, offset off): its upper pair writes the rows [off + 64, off + 128)
// it kept.
__device__ __forceinline__ void flush_relative(float (*gacc)[D / 8][4], bf16* __restrict__ part, int off, int k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  if (warp / 2 == (k & 1)) return;  // the lower pair wrote its rows already
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      bf16* row = part + (long long)(off + 64 + 16 * gacc_chunk(warp, mt) + g + 8 * half) * D + 2 * t;
#pragma unroll
      for (int n8 = 0; n8 < D / 8; ++n8)
        *reinterpret_cast<unsigned int*>(row + n8 * 8) =
            pack(f2bf(gacc[mt][n8][2 * half]), f2bf(gacc[mt][n8][2 * half + 1]));
    }
}

// The tile's dS as [query][key] (64 x 64 bf16, 8 KB, contiguous) at dst, from the keys kernel's
// skewed copy DSK[key][63 - key + query]: 16-byte stores of 8 keys each.
__device__ __forceinline__ void store_ds_tile(bf16* __restrict__ dst, const bf16* DSK) {
#pragma unroll
  for (int it = 0; it < 64 * 8 / THREADS; ++it) {
    const int ci = threadIdx.x + it * THREADS, i = ci / 8, j0 = ci % 8 * 8;
    unsigned int w[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = j0 + 2 * u;
      w[u] = pack(DSK[j * LDK + 63 - j + i], DSK[(j + 1) * LDK + 62 - j + i]);
    }
    CHECK_ALIGNED(dst + i * 64 + j0, 16);
    *reinterpret_cast<uint4*>(dst + i * 64 + j0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// The lean keys kernel's off-band zeros of the skewed dS: `relative_grads` (TGRAD false) reads
// its warp's rows r = 16 warp + i at columns [x0, x0 + 80), x0 = 48 - 16 warp, of which
// [x0, x0 + 15 - i) and [x0 + 79 - i, x0 + 80) lie off the band [63 - r, 126 - r] that the score
// loop writes. Zeroed: [x0, x0 + 16) and [x0 + 64, x0 + 80), band entries too (the score loop
// writes those after), in 16-byte stores, 2 per lane. Only this warp's rows: no barrier after.
__device__ __forceinline__ void zero_skewed_edges(bf16* DSK) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bf16* at = DSK + (16 * warp + lane / 2) * LDK + 48 - 16 * warp + lane % 2 * 64;
  CHECK_ALIGNED(at, 16);
  reinterpret_cast<uint4*>(at)[0] = make_uint4(0u, 0u, 0u, 0u);
  reinterpret_cast<uint4*>(at)[1] = make_uint4(0u, 0u, 0u, 0u);
}

// The lean keys kernel's bands (`relative_bands_t`'s, with the windows over other buffers): K_r's
// window in Kw (the skewed dS's memory), Q_r's in Qw (the two bands' memory). The p2c products
// wait in registers for every warp to be done with Q_r's window, then go to their band; the c2p
// band is written as it is computed. Ends with a barrier, then the skewed dS's off-band zeros
// over K_r's window (each warp its own rows, before its score loop writes them).
// CM: Qs and Ks are core-matrix tiles (the wgmma keys kernel's).
template <bool CM>
__device__ __forceinline__ void relative_bands_lean(bf16* Cb, bf16* Pb, bf16* DSK, Window Kw, Window Qw, bool c2p,
                                                    bool p2c, const bf16* Qs, const bf16* Ks) {
  unsigned int pv[10][2];
  if (p2c) {
    FragB kb[D / 16][2];
    if (CM) load_rows_b_cm(kb, Ks, threadIdx.x / 32 * 16);
    else load_rows_b(kb, Ks + threadIdx.x / 32 * 16 * LDS);
    skewed_products(pv, kb, Qw);
  }
  __syncthreads();  // every warp has read Q_r's window
  if (p2c) store_skewed(Pb, pv);
  if (c2p) {
    FragA qf[D / 16];
    if (CM) load_rows_cm(qf, Qs, threadIdx.x / 32 * 16);
    else load_rows(qf, Qs + threadIdx.x / 32 * 16 * LDS);
    skewed_band_t(Cb, qf, Kw);
  } else if (p2c) {
    zero_band(Cb);  // Q_r's window was there
  }
  __syncthreads();  // the bands are whole; every warp has read K_r's window
  zero_skewed_edges(DSK);
}

// Keys-major backward: this block owns keys [kb, kb + 64): dK, dV, and the p2c gradient: the
// rows d_p2c[j, .] of the table (tables), or (REL) the p2c part of dK and this block's partial
// sums of dQ_r (not with TGRAD false), and (REL, ds_out given) each tile's dS for
// `dattn_bwd_q_ds`. The warp's 16 keys are the rows of S^T = K Q^T, the tile's 64 queries its
// columns.
// LEAN (REL, TGRAD false): 72.5 KB of shared memory where the windows kept across tiles take
// 107.5 KB, so 3 blocks per SM where its 168 registers allowed 3 but the memory 2. Each tile loads
// the whole windows (not only their new halves): K_r's where the skewed dS goes later, Q_r's over
// the two bands (`relative_bands_lean`); after the score loop Q_r's window once more, over the Q
// and dO tiles, for the p2c part of dK, while the tile's dS is stored. The price: the windows
// read three times per tile from L2 (48 KB where 16 KB), and two more barriers.
// WG (LEAN, D = 64, sm_90a: `dattn_bwd_kv_rel_lean_wg`): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO
// and dK += dS^T Q by wgmma, the Q and dO tiles in core-matrix layout (in their padded tiles'
// memory), read from shared memory once for the 4 warps where each warp loaded all of both by
// ldmatrix, for each product; and dK's p2c part (`relative_grads_wg`), from Q_r's window loaded
// over those tiles in core-matrix layout. 958 -> 730 shared-memory wavefronts per warp-tile. (The
// bands by wgmma too, from core-matrix windows, were tried: wgmma multiplies a warp's rows by all
// 128 window rows, and its accumulators' skewed 16-bit stores cost ~40% more instructions per tile
// than they saved in shared-memory traffic.)
template <bool REL, bool TGRAD, bool LEAN = false, bool WG = false>
__device__ __forceinline__ void bwd_kv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const bf16* __restrict__ c2p,
                                       const bf16* __restrict__ p2c, const unsigned char* __restrict__ mask,
                                       const bf16* __restrict__ dout, const float* __restrict__ lse,
                                       const float* __restrict__ dvec, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                       bf16* __restrict__ dp2c, bf16* __restrict__ ds_out, float* __restrict__ sums,
                                       int H, int N, int ldg, float p_drop, unsigned long long seed) {
  BWD_SMEM_SETUP(REL)
  bf16 *Ks = T0, *Vs = T1, *Qs = T2, *dOs = T3;
  const int kb = blockIdx.x * BN, j0 = kb + warp * 16;
  // A masked key's scores: -inf through key_a, key_b (tables), or (REL) through the c2p band
  // (`mask_keys`, only in blocks with such keys).
  const float key_a = kb + ra < N && mask[(long long)b * N + kb + ra] ? 0.f : NEG_INF;
  const float key_b = kb + rb < N && mask[(long long)b * N + kb + rb] ? 0.f : NEG_INF;
  // REL: this block's partial dQ_r rows, [rows][D] from window row N-64-kb (see relative_grads).
  bf16* part = REL && TGRAD && dp2c ? dp2c + ((long long)bh * gridDim.x + blockIdx.x) * (gridDim.x * 64 + 64) * D : nullptr;
  const bool own_masked = REL && (LEAN || any_masked_key(mask, b, kb, N));
  if (WG) {  // wgmma's A (S^T, dP^T) from shared memory: core matrices
    load_tile_cm_async(Ks, k, b, h, kb, N, H);
    load_tile_cm_async(Vs, v, b, h, kb, N, H);
  } else {
    load_tile_async(Ks, k, b, h, kb, N, H);
    load_tile_async(Vs, v, b, h, kb, N, H);
  }
  cp_async_commit();
  cp_async_wait_all();
  if (REL && !c2p) zero_band(Cb);
  if (REL && !p2c) zero_band(Pb);
  __syncthreads();
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
  float gacc[2][D / 8][4];  // REL: the partial dQ_r rows this warp carries to the next tile
#pragma unroll
  for (int n8 = 0; n8 < D / 8; ++n8)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n8][e] = dv_acc[n8][e] = 0.f;

  PHASE_BEGIN;
  for (int m0 = 0, n = 0; m0 < N; m0 += BM, ++n) {
    __syncthreads();
    if (WG) {
      load_tile_cm_async(Qs, q, b, h, m0, N, H);
      load_tile_cm_async(dOs, dout, b, h, m0, N, H);
    } else {
      load_tile_async(Qs, q, b, h, m0, N, H);
      load_tile_async(dOs, dout, b, h, m0, N, H);
    }
    if (LEAN) {  // K_r's window where the skewed dS goes, Q_r's over the two bands
      if (c2p) load_whole_window_async(DSK, c2p, h, N - 1 - (m0 + 63) + kb, N);
      if (p2c) load_whole_window_async(Cb, p2c, h, N - 1 - (kb + 63) + m0, N);
    } else {
      load_relative<REL>(Cb, Pb, KRw, QRw, c2p, p2c, tb, h, N, m0, kb, n, -1);
    }
    cp_async_commit();
    for (int e = threadIdx.x; e < BM; e += blockDim.x) {
      const int i = m0 + e;
      const bool in = i < N;
      qstat[e] = make_float2(in && mask[(long long)b * N + i] ? lse[(long long)bh * N + i] * L2E : POS_INF,
                             in ? dvec[(long long)bh * N + i] : 0.f);
    }
    cp_async_wait_all();
    if (WG) fence_proxy_async();  // Q and dO, written by cp.async (the generic proxy), for wgmma's reads
    __syncthreads();
    PHASE(0);
    if (LEAN) relative_bands_lean<WG>(Cb, Pb, DSK, Window{DSK, DSK + 64 * LDS}, Window{Cb, Cb + 64 * LDS}, c2p, p2c, Qs, Ks);
    else if (REL) relative_bands_t(Cb, Pb, window_of(KRw, n, -1), window_of(QRw, n, 1), c2p, p2c, Qs, Ks);
    if (REL) mask_own_keys(own_masked, Cb, mask, b, kb, N);
    PHASE(1);
    // The tile's queries in two halves of 32: half the registers for S^T, dP^T and their
    // fragments, which keeps the kernel from spilling.
#pragma unroll 1
    for (int c0 = 0; c0 < BM; c0 += 32) {
      float st[4][4], dpt[4][4];
      if (WG) {  // both K-major, A (the block's keys, values) and B: along K (D) 128 bytes per core
                 // matrix, along M (keys) and N (queries) 16 D
        const unsigned int qs = wgmma_shared(Qs + c0 * D), dos = wgmma_shared(dOs + c0 * D);
        const unsigned int ks = wgmma_shared(Ks), vs = wgmma_shared(Vs);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          wgmma_m64n32k16_ss(st, wgmma_desc_a(ks + 256 * kk, 128, 16 * D), wgmma_desc_k(qs + 256 * kk, 128, 16 * D),
                             kk > 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          wgmma_m64n32k16_ss(dpt, wgmma_desc_a(vs + 256 * kk, 128, 16 * D), wgmma_desc_k(dos + 256 * kk, 128, 16 * D),
                             kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        wgmma_fence_operands<4>(st);
        wgmma_fence_operands<4>(dpt);
      } else {
        rows_times_tile_t<4>(st, Ks + warp * 16 * LDS, Qs + c0 * LDS);    // S^T = K_w Q^T
        rows_times_tile_t<4>(dpt, Vs + warp * 16 * LDS, dOs + c0 * LDS);  // dP^T = V_w dO^T
      }
      PHASE(2);
      unsigned int dsw[4][2];  // dS rounded once, in pairs: (ra; c, c + 1), (rb; c, c + 1)
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        // This lane's queries c, c + 1: their stats, and the p2c band's pairs as 32-bit words
        // (REL: the transposed c2p band's too), each loaded once (the dS stores below keep the
        // compiler from merging repeated loads).
        const int cc = c0 + n8 * 8 + 2 * t;
        const float2 qs[2] = {qstat[cc], qstat[cc + 1]};
        const unsigned int pw[2] = {ld32(Pb + ra * LDR + cc), ld32(Pb + rb * LDR + cc)};
        // REL: both bands' pairs, added (`add_bf16x2`)
        const unsigned int bw[2] = {REL ? add_bf16x2(ld32(Cb + ra * LDR + cc), pw[0]) : 0u,
                                    REL ? add_bf16x2(ld32(Cb + rb * LDR + cc), pw[1]) : 0u};
        unsigned int hz[2];  // dropout: the hashes of (c, ra), (c + 1, ra), each also (., rb = ra + 8)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e < 2 ? ra : rb, c = cc + (e & 1);  // key r, query c
          // No branch: a masked query's lse is +inf, a masked key's score -inf: p = 0.
          const float x = st[n8][e] + (REL ? (e & 1 ? hi_f(bw[e / 2]) : lo_f(bw[e / 2]))
                                           : bf2f(Cb[c * LDR + r]) + (e & 1 ? hi_f(pw[e / 2]) : lo_f(pw[e / 2])) +
                                                 (e < 2 ? key_a : key_b));
          const float p = ex2(fmaf(x, L2E, -qs[e & 1].x));
          float z = 1.f;
          if (p_drop > 0.f) {
            if (e < 2) hz[e] = pair_hash(dkey, m0 + c, kb + ra);
            z = kept(hz[e & 1], e >= 2, threshold) ? inv_keep : 0.f;
          }
          st[n8][e] = p * z;
          dpt[n8][e] = p * (dpt[n8][e] * z - qs[e & 1].y);  // dS
        }
        // The pairs' words are dS^T's A fragments and, by halves, the stored dS: one conversion
        // per pair, where the stores and the fragments each converted every score.
        dsw[n8][0] = pack(f2bf(dpt[n8][0]), f2bf(dpt[n8][1]));
        dsw[n8][1] = pack(f2bf(dpt[n8][2]), f2bf(dpt[n8][3]));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e < 2 ? ra : rb, c = cc + (e & 1);
          const bf16 ds = (bf16)(e & 1 ? dsw[n8][e / 2] >> 16 : dsw[n8][e / 2] & 0xffffu);
          if (REL) DSK[r * LDK + 63 - r + c] = ds;
          else DSb[r * LDR + c] = ds;
        }
      }
      PHASE(3);
      FragA pza[2], dsa[2];
      to_a<2>(pza, st);
      pairs_to_a<2>(dsa, dsw);
      if (WG) {  // MN-major B: along K (queries) 16 D bytes per core matrix, along N (D) 128
        const unsigned int qs = wgmma_shared(Qs + c0 * D), dos = wgmma_shared(dOs + c0 * D);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) wgmma_m64n64k16<1>(dv_acc, pza[kk].x, wgmma_desc_mn(dos + 32 * D * kk, 16 * D, 128), 1);
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) wgmma_m64n64k16<1>(dk_acc, dsa[kk].x, wgmma_desc_mn(qs + 32 * D * kk, 16 * D, 128), 1);
        wgmma_commit();  // waited for with the next half's S^T, dP^T, or after the last half
      } else {
        weights_times_tile<2>(dv_acc, pza, dOs + c0 * LDS);  // dV += dropout(P)^T dO
        weights_times_tile<2>(dk_acc, dsa, Qs + c0 * LDS);   // dK += dS^T Q
      }
      PHASE(4);
    }
    if (WG) {
      wgmma_wait_all();
      wgmma_fence_operands(dv_acc);
      wgmma_fence_operands(dk_acc);
    }
    __syncthreads();
    PHASE(5);
    if (LEAN) {
      // Q_r's window over the Q and dO tiles (contiguous), loading while dS is stored. (The
      // start through `opaque`: else the compiler keeps the first load's addresses for it, in
      // registers the score loop needs.)
      // (WG: core-matrix, for `relative_grads_wg`.)
      if (p2c && WG) {
        load_chunk_cm_async(Qs, p2c, h, (int)opaque(N - 1 - (kb + 63) + m0), N);
        load_chunk_cm_async(Qs + 64 * D, p2c, h, (int)opaque(N - 1 - (kb + 63) + m0 + 64), N);
      } else if (p2c) {
        load_whole_window_async(Qs, p2c, h, (int)opaque(N - 1 - (kb + 63) + m0), N);
      }
      cp_async_commit();
      if (ds_out) store_ds_tile(ds_out + (((long long)bh * gridDim.x + n) * gridDim.x + blockIdx.x) * 64 * 64, DSK);
      PHASE(7);
      cp_async_wait_all();
      if (WG) fence_proxy_async();
      __syncthreads();
      if (p2c && WG) relative_grads_wg(dk_acc, DSK, wgmma_shared(Qs), wgmma_shared(Qs + 64 * D));
      else if (p2c) relative_grads<false>(dk_acc, gacc, DSK, Window{Qs, dOs}, Ks, nullptr, m0, n);
      PHASE(6);
    } else if (REL) {
      // p2c(i, j) = k_j . Q_r[N-1-j+i]: dK += dS^T Q_r (skewed), dQ_r += (skewed dS)^T K.
      if (p2c) relative_grads<TGRAD>(dk_acc, gacc, DSK, window_of(QRw, n, 1), Ks, part, m0, n);
      PHASE(6);
      // dS of (query tile n, key tile blockIdx.x): [B * H][tiles][tiles][64][64].
      if (ds_out) store_ds_tile(ds_out + (((long long)bh * gridDim.x + n) * gridDim.x + blockIdx.x) * 64 * 64, DSK);
    } else if (dp2c) {
      store_band(reinterpret_cast<bf16*>(dp2c), DSb, tb, N, kb, m0);  // d_p2c[j, N-1-j+i] = dS[i, j]
    }
    PHASE(7);
  }
  if (REL && TGRAD && p2c) flush_relative(gacc, part, (gridDim.x - 1) * BM, gridDim.x - 1);
  write_rows(dk, dk_acc, 1.f, 1.f, b, h, j0, N, ldg);
  write_rows(dv, dv_acc, 1.f, 1.f, b, h, j0, N, ldg);
  sum_rows(sums ? sums + H * D : nullptr, dk_acc, b, h, j0, N, ldg);  // slot 1: k
  sum_rows(sums ? sums + 2 * H * D : nullptr, dv_acc, b, h, j0, N, ldg);  // slot 2: v
  PHASE(7);
  PHASE_END(1);
}

// Queries-major backward (tables): this block owns queries [mb, mb + 64): dQ, and the rows
// d_c2p[i, .] of the c2p table's gradient. The warp's 16 queries are the rows of S = Q K^T, the
// tile's 64 keys its columns. (With the relative terms in the kernels, `dattn_bwd_q_ds` reads
// the keys kernel's dS instead.)
__device__ __forceinline__ void bwd_q(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                      const bf16* __restrict__ v, const bf16* __restrict__ c2p,
                                      const bf16* __restrict__ p2c, const unsigned char* __restrict__ mask,
                                      const bf16* __restrict__ dout, const float* __restrict__ lse,
                                      const float* __restrict__ dvec, bf16* __restrict__ dq, bf16* __restrict__ dc2p,
                                      int H, int N, int ldg, float p_drop, unsigned long long seed) {
  BWD_SMEM_SETUP(false)
  bf16 *Qs = T0, *dOs = T1, *Ks = T2, *Vs = T3;
  const int mb = blockIdx.x * BM, i0 = mb + warp * 16;
  load_tile_async(Qs, q, b, h, mb, N, H);
  load_tile_async(dOs, dout, b, h, mb, N, H);
  cp_async_commit();
  cp_async_wait_all();
  for (int e = threadIdx.x; e < BM; e += blockDim.x) {
    const int i = mb + e;
    qstat[e] = make_float2(i < N && mask[(long long)b * N + i] ? lse[(long long)bh * N + i] * L2E : POS_INF,
                           i < N ? dvec[(long long)bh * N + i] : 0.f);
  }
  __syncthreads();
  const float lse_a = qstat[ra].x, lse_b = qstat[rb].x, dv_a = qstat[ra].y, dv_b = qstat[rb].y;
  float dq_acc[D / 8][4];
#pragma unroll
  for (int n8 = 0; n8 < D / 8; ++n8) dq_acc[n8][0] = dq_acc[n8][1] = dq_acc[n8][2] = dq_acc[n8][3] = 0.f;

  for (int n0 = 0, n = 0; n0 < N; n0 += BN, ++n) {
    __syncthreads();
    load_tile_async(Ks, k, b, h, n0, N, H);
    load_tile_async(Vs, v, b, h, n0, N, H);
    load_relative<false>(Cb, Pb, KRw, QRw, c2p, p2c, tb, h, N, mb, n0, n, 1);
    cp_async_commit();
    const unsigned long long kbits = key_bits(mask, b, n0, N);
    cp_async_wait_all();
    __syncthreads();
    // The tile's keys in two halves of 32 (as in bwd_kv).
#pragma unroll 1
    for (int c0 = 0; c0 < BN; c0 += 32) {
      const unsigned int kw = (unsigned int)(kbits >> (c0 + 2 * t));  // bit 8 n8 + (0, 1): this lane's keys
      float s[4][4], dp[4][4];
      unsigned int hz[4];  // dropout: the hashes of this lane's keys in blocks n8, n8 + 1 (n8 even)
      rows_times_tile_t<4>(s, Qs + warp * 16 * LDS, Ks + c0 * LDS);    // S = Q_w K^T
      rows_times_tile_t<4>(dp, dOs + warp * 16 * LDS, Vs + c0 * LDS);  // dP = dO_w V^T
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        // This lane's keys c, c + 1: the c2p band's pairs as 32-bit words, loaded once each.
        const int cc = c0 + n8 * 8 + 2 * t;
        const unsigned int cw[2] = {ld32(Cb + ra * LDR + cc), ld32(Cb + rb * LDR + cc)};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e < 2 ? ra : rb, c = cc + (e & 1);  // query r, key c
          // No branch: a masked query's lse is +inf (p = 0), a masked key's p is not selected.
          const float x = s[n8][e] + (e & 1 ? hi_f(cw[e / 2]) : lo_f(cw[e / 2])) + bf2f(Pb[c * LDR + r]);
          const float p = kw >> (n8 * 8 + (e & 1)) & 1u ? ex2(fmaf(x, L2E, -(e < 2 ? lse_a : lse_b))) : 0.f;
          float z = 1.f;
          if (p_drop > 0.f) {
            if (n8 % 2 == 0) hz[e] = pair_hash(dkey, mb + r, n0 + c);
            z = kept(hz[e], n8 % 2, threshold) ? inv_keep : 0.f;
          }
          const float ds = p * (dp[n8][e] * z - (e < 2 ? dv_a : dv_b));
          s[n8][e] = ds;
          DSb[r * LDR + c] = f2bf(ds);
        }
      }
      FragA dsa[2];
      to_a<2>(dsa, s);
      weights_times_tile<2>(dq_acc, dsa, Ks + c0 * LDS);  // dQ += dS K
    }
    __syncthreads();
    if (dc2p) store_band(dc2p, DSb, tb, N, mb, n0);  // d_c2p[i, N-1-i+j] = dS[i, j]
  }
  write_rows(dq, dq_acc, 1.f, 1.f, b, h, i0, N, ldg);
}

#define BWD_COMMON                                                                                          \
  const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,                         \
      const bf16 *__restrict__ c2p, const bf16 *__restrict__ p2c, const unsigned char *__restrict__ mask,     \
      const bf16 *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ dvec
// dp2c / dc2p: the table gradients as bf16 [H, B, N, 2N] (tables), or (REL) the blocks' partial
// sums of dQ_r (and in dattn_bwd_q_ds of dK_r), bf16 [B * H][blocks][64 (blocks + 1)][D], for
// dattn_rel_reduce.
// 3 blocks per SM (at most 168 registers; 64 KB of shared memory each).
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_kv(BWD_COMMON, bf16* __restrict__ dk, bf16* __restrict__ dv, bf16* __restrict__ dp2c, int H, int N,
             int ldg, float p_drop, unsigned long long seed) {
  bwd_kv<false, true>(q, k, v, c2p, p2c, mask, dout, lse, dvec, dk, dv, dp2c, nullptr, nullptr, H, N, ldg, p_drop, seed);
}
// ds: every tile's dS, bf16 [B * H][tiles][tiles][64][64], for dattn_bwd_q_ds. sums: the column
// sums of dq, dk, dv by groups of 16 rows (`sum_rows`), fp32 [B][ceil(N / 16)][3][H][D]: this kernel
// writes the k and v slots, dattn_bwd_q_ds (given q's slot) the q slot; nullptr: none. (The split
// kernels make none.)
KERNEL void __launch_bounds__(128)
dattn_bwd_kv_rel(BWD_COMMON, bf16* __restrict__ dk, bf16* __restrict__ dv, bf16* __restrict__ dp2c,
                 bf16* __restrict__ ds, float* __restrict__ sums, int H, int N, int ldg, float p_drop,
                 unsigned long long seed) {
  bwd_kv<true, true>(q, k, v, c2p, p2c, mask, dout, lse, dvec, dk, dv, dp2c, ds, sums, H, N, ldg, p_drop, seed);
}
// The same without the dQ_r partials (`dattn_table_grads` sums dQ_r by tile diagonals).
KERNEL void __launch_bounds__(128)
dattn_bwd_kv_rel_diag(BWD_COMMON, bf16* __restrict__ dk, bf16* __restrict__ dv, bf16* __restrict__ ds,
                      float* __restrict__ sums, int H, int N, int ldg, float p_drop, unsigned long long seed) {
  bwd_kv<true, false>(q, k, v, c2p, p2c, mask, dout, lse, dvec, dk, dv, nullptr, ds, sums, H, N, ldg, p_drop, seed);
}
// The same, lean (LEAN in bwd_kv): 3 blocks per SM.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_kv_rel_lean(BWD_COMMON, bf16* __restrict__ dk, bf16* __restrict__ dv, bf16* __restrict__ ds,
                      float* __restrict__ sums, int H, int N, int ldg, float p_drop, unsigned long long seed) {
  bwd_kv<true, false, true>(q, k, v, c2p, p2c, mask, dout, lse, dvec, dk, dv, nullptr, ds, sums, H, N, ldg, p_drop,
                            seed);
}
#if D == 64 && (defined(DEBERTA_EMULATE) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
// The same with the four tile products by wgmma (`bwd_kv`'s WG): sm_90a, head size 64.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_kv_rel_lean_wg(BWD_COMMON, bf16* __restrict__ dk, bf16* __restrict__ dv, bf16* __restrict__ ds,
                         float* __restrict__ sums, int H, int N, int ldg, float p_drop, unsigned long long seed) {
  bwd_kv<true, false, true, true>(q, k, v, c2p, p2c, mask, dout, lse, dvec, dk, dv, nullptr, ds, sums, H, N, ldg,
                                  p_drop, seed);
}
#endif
KERNEL void __launch_bounds__(128)
dattn_bwd_q(BWD_COMMON, bf16* __restrict__ dq, bf16* __restrict__ dc2p, int H, int N, int ldg, float p_drop,
            unsigned long long seed) {
  bwd_q(q, k, v, c2p, p2c, mask, dout, lse, dvec, dq, dc2p, H, N, ldg, p_drop, seed);
}

// A tile of dS (64 x 64 bf16, contiguous) into dst [64][LDR] by cp.async.
__device__ __forceinline__ void load_ds_async(bf16* __restrict__ dst, const bf16* __restrict__ src) {
#pragma unroll
  for (int it = 0; it < 64 * 8 / THREADS; ++it) {
    const int c = threadIdx.x + it * THREADS, r = c / 8, k = c % 8 * 8;
    cp_async16(dst + r * LDR + k, src + r * 64 + k, true);
  }
}

// The backward from the keys kernel's dS ([B * H][tiles][tiles][64][64] bf16, [query][key] per
// tile) for this block's 64 own rows, queries (dattn_bwd_q_ds) or keys (KEYS, dattn_bwd_k_ds):
// their gradient dS K (queries) or dS^T Q (keys), the relative term's part of it against the
// table they read (c2p's K_r for queries, p2c's Q_r for keys: skewed dS times the window), and
// this block's partial sums of that table's gradient (into part_out, as relative_grads writes
// them). Reading dS instead of recomputing S, both bands, P and dP took the queries kernel from
// 280 mma per tile to 136 and dropped its per-score work (exponential, dropout hash, masks).
// Shared memory: the block's own rows, the tile's other rows, dS [64][LDR], its skewed copy
// DSK[own][63 - own + other] ([64][LDK]), the table's window [128][LDS]: 62 KB, 3 blocks per SM.
// TGRAD false: no partial sums (`dattn_table_grads` sums the table gradient by tile diagonals).
// WG (queries, TGRAD false, D = 64, sm_90a: `dattn_bwd_q_ds_diag_wg`): dQ += dS K and dQ += dS K_r
// (`relative_grads_wg`) by wgmma, the K tile and K_r's window in core-matrix layout (in their
// padded slots), read once for the 4 warps: 292 -> 180 shared-memory wavefronts per warp-tile.
template <bool KEYS, bool TGRAD, bool WG = false>
__device__ __forceinline__ void from_ds(const bf16* __restrict__ own_src, const bf16* __restrict__ other_src,
                                        const bf16* __restrict__ table, const bf16* __restrict__ ds,
                                        bf16* __restrict__ out, bf16* __restrict__ part_out, float* __restrict__ sums,
                                        int H, int N, int ldg) {
  DYNAMIC_SMEM(smem);
  bf16* Own = reinterpret_cast<bf16*>(smem);
  bf16* Other = Own + 64 * LDS;
  bf16* DSs = Other + 64 * LDS;  // dS [query][key]
  bf16* DSK = DSs + 64 * LDR;    // DSK[own][63 - own + other] = dS, zero off the band
  bf16* Win = DSK + 64 * LDK;    // [128][LDS]
  const int warp = threadIdx.x / 32, tiles = gridDim.x;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int r0 = blockIdx.x * 64, row0 = r0 + warp * 16;
  // This block's partial rows of the table's gradient, [rows][D] from window row N-64-r0.
  bf16* part = TGRAD && table && part_out ? part_out + ((long long)bh * tiles + blockIdx.x) * (tiles * 64 + 64) * D : nullptr;
  const bf16* ds_bh = ds + (long long)bh * tiles * tiles * 64 * 64;
  zero_skewed(DSK);
  load_tile_async(Own, own_src, b, h, r0, N, H);
  cp_async_commit();
  float acc[D / 8][4];
  float gacc[2][D / 8][4];  // the partial table-gradient rows this warp carries to the next tile
#pragma unroll
  for (int n8 = 0; n8 < D / 8; ++n8) acc[n8][0] = acc[n8][1] = acc[n8][2] = acc[n8][3] = 0.f;

  PHASE_BEGIN;
  for (int t0 = 0, n = 0; t0 < N; t0 += 64, ++n) {
    __syncthreads();  // the previous tile's readers of Other, DSs, DSK and the window's old half are done
    if (WG) load_tile_cm_async(Other, other_src, b, h, t0, N, H);
    else load_tile_async(Other, other_src, b, h, t0, N, H);
    load_ds_async(DSs, ds_bh + (KEYS ? (long long)n * tiles + blockIdx.x : (long long)blockIdx.x * tiles + n) * 64 * 64);
    if (table && WG) load_window_cm_async(Win, table, h, N - 1 - (r0 + 63) + t0, n, 1, N);
    else if (table) load_window_async(Win, table, h, N - 1 - (r0 + 63) + t0, n, 1, N);
    cp_async_commit();
    cp_async_wait_all();
    if (WG) fence_proxy_async();  // K and the window, written by cp.async, for wgmma's reads
    __syncthreads();
    PHASE(0);
    if (table)  // the skewed copy, two scores per step
#pragma unroll
      for (int it = 0; it < 64 * 32 / THREADS; ++it) {
        const int pi = threadIdx.x + it * THREADS, x = pi / 32, y = pi % 32 * 2;
        const unsigned int w = ld32(DSs + x * LDR + y);  // dS(query x, keys y, y + 1)
        if (KEYS) {  // own keys y, y + 1
          DSK[y * LDK + 63 - y + x] = (bf16)(w & 0xffffu);
          DSK[(y + 1) * LDK + 62 - y + x] = (bf16)(w >> 16);
        } else {  // own query x
          DSK[x * LDK + 63 - x + y] = (bf16)(w & 0xffffu);
          DSK[x * LDK + 64 - x + y] = (bf16)(w >> 16);
        }
      }
    PHASE(1);
    if (WG) {  // dQ += dS K, MN-major B: along K (keys) 16 D bytes per core matrix, along N (D) 128
      FragA a[4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) load_a(a[kk], DSs + warp * 16 * LDR + kk * 16, LDR);
      const unsigned int other = wgmma_shared(Other);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_m64n64k16<1>(acc, a[kk].x, wgmma_desc_mn(other + 32 * D * kk, 16 * D, 128), 1);
      wgmma_commit();
      if (!table) {  // else in flight through the barrier below, waited for with the relative part's
        wgmma_wait_all();
        wgmma_fence_operands(acc);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {  // queries: dQ += dS K; keys: dK += dS^T Q
        FragA a;
        if (KEYS) load_a_t(a, DSs + kk * 16 * LDR + warp * 16, LDR);
        else load_a(a, DSs + warp * 16 * LDR + kk * 16, LDR);
        a_times_rows(acc, a, Other + kk * 16 * LDS);
      }
    }
    PHASE(2);
    if (table) {
      __syncthreads();  // every warp's part of DSK
      PHASE(3);
      // c2p(i, j) = q_i . K_r[N-1-i+j]: dQ += dS K_r (skewed), dK_r += (skewed dS)^T Q;
      // p2c(i, j) = k_j . Q_r[N-1-j+i]: dK += dS^T Q_r (skewed), dQ_r += (skewed dS)^T K.
      const Window w = window_of(Win, n, 1);
      if (WG) relative_grads_wg(acc, DSK, wgmma_shared(w.lo), wgmma_shared(w.hi));
      else relative_grads<TGRAD>(acc, gacc, DSK, w, Own, part, t0, n);
      PHASE(4);
    }
  }
  if (TGRAD && table) flush_relative(gacc, part, (tiles - 1) * 64, tiles - 1);
  write_rows(out, acc, 1.f, 1.f, b, h, row0, N, ldg);
  sum_rows(sums, acc, b, h, row0, N, ldg);  // q's slot (`dattn_bwd_q_ds`)
  PHASE(5);
  PHASE_END(2);
}

// Queries-major from dS (`kernel` and `kernel-split`): dQ and the partial sums of dK_r.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_q_ds(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ c2p,
               const bf16* __restrict__ ds, bf16* __restrict__ dq, bf16* __restrict__ dc2p,
               float* __restrict__ sums, int H, int N, int ldg) {
  from_ds<false, true>(q, k, c2p, ds, dq, dc2p, sums, H, N, ldg);
}
// The same without the dK_r partials.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_q_ds_diag(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ c2p,
                    const bf16* __restrict__ ds, bf16* __restrict__ dq, float* __restrict__ sums, int H, int N,
                    int ldg) {
  from_ds<false, false>(q, k, c2p, ds, dq, nullptr, sums, H, N, ldg);
}
#if D == 64 && (defined(DEBERTA_EMULATE) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
// The same by wgmma (`from_ds`' WG): sm_90a, head size 64.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_q_ds_diag_wg(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ c2p,
                       const bf16* __restrict__ ds, bf16* __restrict__ dq, float* __restrict__ sums, int H, int N,
                       int ldg) {
  from_ds<false, false, true>(q, k, c2p, ds, dq, nullptr, sums, H, N, ldg);
}
#endif

// ---- The split backward (`kernel-split`): dV and dS first, then dK and dQ from dS -------------
// The keys kernel of `kernel` (dattn_bwd_kv_rel) carries most of the backward: 312 mma per tile,
// 255 registers and 107.5 KB of shared memory, so 2 blocks per SM, too few warps to hide its
// latencies. Split, the keys kernel computes only dV and each tile's dS (dattn_bwd_v_ds), and
// dattn_bwd_k_ds gives dK from dS as dattn_bwd_q_ds gives dQ: the content part dS^T Q, the p2c
// part and the partial sums of dQ_r. Without dK and the table-gradient rows, the keys kernel
// keeps its warp's 16 key and value rows in registers, so their tiles' shared memory takes the
// queries' tiles after the first barrier, and dS goes over the p2c band (each score written by
// the one thread that read it): 72.5 KB, 3 blocks per SM. The price: dS and Q read once more.

// The tile's dS as [query][key] (64 x 64 bf16, contiguous) at dst from DSt[key][query] ([64][LDR]):
// 16-byte stores of 8 keys each.
__device__ __forceinline__ void store_ds_tile_t(bf16* __restrict__ dst, const bf16* DSt) {
#pragma unroll
  for (int it = 0; it < 64 * 8 / THREADS; ++it) {
    const int ci = threadIdx.x + it * THREADS, i = ci / 8, j0 = ci % 8 * 8;
    unsigned int w[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) w[u] = pack(DSt[(j0 + 2 * u) * LDR + i], DSt[(j0 + 2 * u + 1) * LDR + i]);
    CHECK_ALIGNED(dst + i * 64 + j0, 16);
    *reinterpret_cast<uint4*>(dst + i * 64 + j0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Keys-major, split: this block owns keys [kb, kb + 64): dV += dropout(P)^T dO, and each tile's
// dS ([B * H][tiles][tiles][64][64] bf16) for dattn_bwd_q_ds and dattn_bwd_k_ds. Shared memory:
// the queries' (lse log2 e, D_i), the Q and dO tiles (at first the block's K and V rows), the
// c2p band Cb[key][query] (transposed, as `relative_bands_t` writes it), the p2c band
// Pb[key][query] (then the tile's dS^T), the K_r and Q_r windows [128][LDS].
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_v_ds(BWD_COMMON, bf16* __restrict__ dv, bf16* __restrict__ ds_out, int H, int N, int ldg, float p_drop,
               unsigned long long seed) {
  DYNAMIC_SMEM(smem);
  float2* qstat = reinterpret_cast<float2*>(smem);
  bf16* Qs = reinterpret_cast<bf16*>(qstat + 64);
  bf16* dOs = Qs + 64 * LDS;
  bf16* Cb = dOs + 64 * LDS;
  bf16* Pb = Cb + 64 * LDR;  // the p2c band, then dS^T
  bf16* KRw = Pb + 64 * LDR;
  bf16* QRw = KRw + 128 * LDS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const unsigned int threshold = DROP_THRESHOLD(p_drop);
  const unsigned int dkey = head_key(seed, bh);
  const float inv_keep = p_drop > 0.f ? 1.f / (1.f - p_drop) : 1.f;
  const int ra = warp * 16 + g, rb = ra + 8;
  const int kb = blockIdx.x * BN, j0 = kb + warp * 16;
  const bool own_masked = any_masked_key(mask, b, kb, N);
  if (!c2p) zero_band(Cb);
  load_tile_async(Qs, k, b, h, kb, N, H);
  load_tile_async(dOs, v, b, h, kb, N, H);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  FragA kf[D / 16], vf[D / 16];  // the warp's 16 key and value rows, for the whole kernel
  load_rows(kf, Qs + warp * 16 * LDS);
  load_rows(vf, dOs + warp * 16 * LDS);
  float dv_acc[D / 8][4];
#pragma unroll
  for (int n8 = 0; n8 < D / 8; ++n8) dv_acc[n8][0] = dv_acc[n8][1] = dv_acc[n8][2] = dv_acc[n8][3] = 0.f;

  for (int m0 = 0, n = 0; m0 < N; m0 += BM, ++n) {
    __syncthreads();  // every warp holds its rows (tile 0), or is done with the previous tile
    load_tile_async(Qs, q, b, h, m0, N, H);
    load_tile_async(dOs, dout, b, h, m0, N, H);
    load_relative<true>(Cb, Pb, KRw, QRw, c2p, p2c, 0, h, N, m0, kb, n, -1);
    cp_async_commit();
    for (int e = threadIdx.x; e < BM; e += blockDim.x) {
      const int i = m0 + e;
      const bool in = i < N;
      qstat[e] = make_float2(in && mask[(long long)b * N + i] ? lse[(long long)bh * N + i] * L2E : POS_INF,
                             in ? dvec[(long long)bh * N + i] : 0.f);
    }
    cp_async_wait_all();
    __syncthreads();
    if (c2p) {  // Cb's rows are queries: each warp's 16 of them
      FragA qf[D / 16];
      load_rows(qf, Qs + warp * 16 * LDS);
      skewed_band_t(Cb, qf, window_of(KRw, n, -1));  // Cb[key][query]
    }
    if (p2c) {  // Pb's rows are the warp's own keys
      FragB kb2[D / 16][2];
      rows_as_b(kb2, kf, (unsigned int)N >> 17);
      skewed_band(Pb, kb2, window_of(QRw, n, 1));
    }
    __syncthreads();  // every warp reads all of Cb
    mask_own_keys(own_masked, Cb, mask, b, kb, N);
#pragma unroll 1
    for (int c0 = 0; c0 < BM; c0 += 32) {
      float st[4][4], dpt[4][4];
      frags_times_tile_t<4>(st, kf, Qs + c0 * LDS);    // S^T = K_w Q^T
      frags_times_tile_t<4>(dpt, vf, dOs + c0 * LDS);  // dP^T = V_w dO^T
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8) {
        // bwd_kv's scores, repeated: as one shared function they made ptxas spill 16 bytes in
        // dattn_bwd_kv. Pb's pair (r, c..c+1) is read before this thread writes dS over it.
        const int cc = c0 + n8 * 8 + 2 * t;
        const float2 qs[2] = {qstat[cc], qstat[cc + 1]};
        const unsigned int pw[2] = {p2c ? ld32(Pb + ra * LDR + cc) : 0u, p2c ? ld32(Pb + rb * LDR + cc) : 0u};
        const unsigned int bw[2] = {add_bf16x2(ld32(Cb + ra * LDR + cc), pw[0]),
                                    add_bf16x2(ld32(Cb + rb * LDR + cc), pw[1])};
        unsigned int hz[2];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e < 2 ? ra : rb, c = cc + (e & 1);  // key r, query c
          const float x = st[n8][e] + (e & 1 ? hi_f(bw[e / 2]) : lo_f(bw[e / 2]));
          const float p = ex2(fmaf(x, L2E, -qs[e & 1].x));
          float z = 1.f;
          if (p_drop > 0.f) {
            if (e < 2) hz[e] = pair_hash(dkey, m0 + c, kb + ra);
            z = kept(hz[e & 1], e >= 2, threshold) ? inv_keep : 0.f;
          }
          st[n8][e] = p * z;
          Pb[r * LDR + c] = f2bf(p * (dpt[n8][e] * z - qs[e & 1].y));
        }
      }
      FragA pza[2];
      to_a<2>(pza, st);
      weights_times_tile<2>(dv_acc, pza, dOs + c0 * LDS);  // dV += dropout(P)^T dO
    }
    __syncthreads();  // the tile's dS^T is complete
    store_ds_tile_t(ds_out + (((long long)bh * gridDim.x + n) * gridDim.x + blockIdx.x) * 64 * 64, Pb);
  }
  write_rows(dv, dv_acc, 1.f, 1.f, b, h, j0, N, ldg);
}

// Keys-major from dS (`kernel-split`): dK and the partial sums of dQ_r (as dattn_bwd_kv_rel writes
// them), the mirror image of dattn_bwd_q_ds.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_k_ds(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ p2c,
               const bf16* __restrict__ ds, bf16* __restrict__ dk, bf16* __restrict__ dp2c, int H, int N,
               int ldg) {
  // No column sums here: their code costs this kernel a spill at its 168 registers.
  from_ds<true, true>(k, q, p2c, ds, dk, dp2c, nullptr, H, N, ldg);
}
// The same without the dQ_r partials.
KERNEL void __launch_bounds__(128, 3)
dattn_bwd_k_ds_diag(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ p2c,
                    const bf16* __restrict__ ds, bf16* __restrict__ dk, int H, int N, int ldg) {
  from_ds<true, false>(k, q, p2c, ds, dk, nullptr, nullptr, H, N, ldg);
}

// D_i = dO_i . O_i for each query and head (the backward's softmax correction), fp32 [B, H, N],
// from dout and out ([B, N, H, D] bf16): D / 8 neighbouring threads per (b, n, h) row, a 16-byte
// load each, so a warp's loads are contiguous (a thread per row read 128 bytes apart: twice the
// time); fp32 sums, reduced over the row's lanes in the same order for every row.
// One pass where the tensor ops took five (two fp32 casts, the product, the sum, a permute).
KERNEL void dattn_row_dot(const bf16* __restrict__ dout, const bf16* __restrict__ out, float* __restrict__ dvec, int B,
                          int N, int H) {
  constexpr int LANES = D / 8;  // 2, 4 or 8: a power of two dividing 32
  const long long rows = (long long)B * N * H, threads = rows * LANES;
  const long long stride = (long long)gridDim.x * blockDim.x;
  // Whole warps iterate together (the shuffles need every lane): `threads` rounded up to 32.
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (threads + 31) / 32 * 32; i += stride) {
    const long long r = i / LANES;
    const int c = (int)(i % LANES);
    float acc = 0.f;
    if (r < rows) {
      const uint4* x = reinterpret_cast<const uint4*>(dout + r * D) + c;
      const uint4* y = reinterpret_cast<const uint4*>(out + r * D) + c;
      CHECK_ALIGNED(x, 16), CHECK_ALIGNED(y, 16);
      const uint4 a = *x, o = *y;
      acc = lo_f(a.x) * lo_f(o.x) + hi_f(a.x) * hi_f(o.x) + lo_f(a.y) * lo_f(o.y) + hi_f(a.y) * hi_f(o.y);
      acc += lo_f(a.z) * lo_f(o.z) + hi_f(a.z) * hi_f(o.z) + lo_f(a.w) * lo_f(o.w) + hi_f(a.w) * hi_f(o.w);
    }
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (r < rows && c == 0) {
      const long long h = r % H, n = r / H % N, b = r / ((long long)H * N);
      dvec[(b * H + h) * N + n] = acc;
    }
  }
}

// The table gradient from the backward kernels' partial sums (REL, bf16): out[h][m][d] (fp32
// [H][2N][D], row 2N-1 zero) = sum over batches b and blocks k of part[b, h, k][m - (N-64-64k)]
// where that row is in the block's window [0, 64 (blocks + 1)), summed in fp32. One writer per
// element; a thread sums 4 consecutive d (8-byte loads; at D = 64 a warp reads two rows, 256
// contiguous bytes, per block), over only the blocks whose window holds row m, block by block,
// the batches inner.
__device__ __forceinline__ int floor_div64(int y) { return y >= 0 ? y / 64 : -((-y + 63) / 64); }
KERNEL void dattn_rel_reduce(const bf16* __restrict__ part, float* __restrict__ out, int B, int H, int N) {
  const int blocks = (N + 63) / 64, rows = 64 * blocks + 64;
  const long long total = (long long)H * 2 * N * (D / 4);
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const int d = idx % (D / 4) * 4, m = (idx / (D / 4)) % (2 * N), h = idx / ((long long)(D / 4) * 2 * N);
    // Block k holds row m at 64 k - a (a = N - 64 - m): in [0, rows) for k in [k0, k1).
    const int a = N - 64 - m;
    const int k0 = max(0, floor_div64(a + 63)), k1 = min(blocks, floor_div64(a + rows + 63));
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const long long per_b = (long long)H * blocks * rows * D;  // part's stride between batches
    if (m < 2 * N - 1)
      for (int k = k0; k < k1; ++k) {
        const bf16* row = part + (long long)h * blocks * rows * D + ((long long)k * rows + 64 * k - a) * D + d;
        CHECK_ALIGNED(row, 8);
        // Batches inner, unrolled by 4: four independent loads per step to overlap.
#pragma unroll 4
        for (int b = 0; b < B; ++b) {
          const uint2 v = *reinterpret_cast<const uint2*>(row + b * per_b);
          acc.x += lo_f(v.x), acc.y += hi_f(v.x), acc.z += lo_f(v.y), acc.w += hi_f(v.y);
        }
      }
    CHECK_ALIGNED(out + ((long long)h * 2 * N + m) * D + d, 16);
    *reinterpret_cast<float4*>(out + ((long long)h * 2 * N + m) * D + d) = acc;
  }
}

// ---- The table gradients by tile diagonals (`DEBERTA_TABLE_GRADS=diagonals`, the default) -----
// The tiles of one diagonal, query tile n and key tile n + o, all add to the same 127 rows of
// each table: with i', j' the local query and key, c2p's row N-1-i+j is N - 64 + 64 o + e for
// e = 63 - i' + j', and p2c's row N-1-j+i is N - 64 - 64 o + e' for e' = 63 - j' + i'. So a block
// that owns whole diagonals of one head sums over its batches and the diagonal's tiles
//   G_c[e] = sum_i' dS[i'][i' + e - 63] q_i'  and  G_p[e'] = sum_j' dS[j' + e' - 63][j'] k_j'
// (the skewed dS transposed times the tile's own rows, as `relative_grads` does) in fp32
// registers and writes each once. Where the keys and queries kernels wrote bf16 partials for
// every block (0.9 GB a layer at batch 32 x 512) that `dattn_rel_reduce` read back, this reads
// each dS tile once more (0.4 GB) and writes [128][D] fp32 per diagonal and batch chunk.
// Grid: (tiles, H, ceil(B / TG_BATCHES)). Block x = o takes the diagonals o (tiles - o tiles per
// batch) and, for o > 0, o - tiles (o tiles): every block has `tiles` tiles per batch.
// 256 threads: warps 0-3 sum G_c, warps 4-7 G_p, each warp two 16-row chunks of the 128 whose
// blocks of the skewed dS hold 5 non-zero 16 x 16 blocks between them (`gacc_chunk`'s pairs).
// Out: fp32 [chunks][H][2 tiles - 1][128][D]: G_c of diagonal o at index o + tiles - 1, G_p at
// tiles - 1 - o (where its rows start, 64 apart); null: that table is absent.
// `dattn_table_grads_sum` then adds the two diagonals that hold each row, and the chunks.
// Shared memory: Q and K tiles, double-buffered ([2][2][64][LDS]), the two skewed copies of
// dS, DSC[i'][e] and DSP[j'][e'] ([64][LDK] each, zero off the band): 70 KB at D = 64.
#define TG_BATCHES 8
#define TG_THREADS 256
// The next tile of a block's walk (batch b, query tile n on diagonal od: key tile n + od): the
// diagonal's next tile, else its first in the next batch, else the block's second diagonal
// od - tiles from its first batch. Counters, not divisions (a division by a variable is ~20
// instructions).
__device__ __forceinline__ void next_diagonal_tile(int& b, int& n, int& od, int b0, int nb, int tiles) {
  if (++n < tiles - max(od, 0)) return;
  if (++b < b0 + nb) {
    n = max(-od, 0);
    return;
  }
  od -= tiles, b = b0, n = -od;
}
// The 16-byte word of a dS tile (row i, columns j0 .. j0 + 7: word 8 i + j0 / 8) that the block's
// word c in [0, 512) takes: a warp's 32 words are rows i, i + 2, i + 4, i + 6, 8 words each.
// Their stores into DSC[i][63 - i + j] then fill the 32 banks once; from four consecutive rows
// (135 elements, 67.5 words apart) rows 1 and 2 shared banks, 32 wavefronts for 16 stores.
__device__ __forceinline__ int tile_word(int c) {
  return (8 * (c >> 6) + 2 * ((c >> 3) & 3) + ((c >> 5) & 1)) * 8 + (c & 7);
}
// WG (D = 64, sm_90a: `dattn_table_grads_wg`): the products by wgmma, each warpgroup (warps 0-3,
// 4-7) multiplying its table's 128 rows as two 64-row halves (a warp's chunks w and 4 + w), B the
// Q or K tile in core-matrix layout, read once for the 4 warps where each warp loaded its 5
// blocks' rows: 8 wgmma where each warp ran 40 mma, a warp's zero blocks given as zero fragments.
template <bool WG>
__device__ __forceinline__ void table_grads(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ ds, float* __restrict__ gc,
                                            float* __restrict__ gp, int B, int H, int N) {
  DYNAMIC_SMEM(smem);
  bf16* QK = reinterpret_cast<bf16*>(smem);  // [buffer][Q, K][64][LDS]
  bf16* DSC = QK + 4 * 64 * LDS;             // DSC[i'][63 - i' + j'] = dS[i'][j']
  bf16* DSP = DSC + 64 * LDK;                // DSP[j'][63 - j' + i'] = dS[i'][j']
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int tiles = gridDim.x, o = blockIdx.x, h = blockIdx.y, b0 = blockIdx.z * TG_BATCHES;
  const bool keys = warp >= 4;  // this warp sums G_p from K, else G_c from Q
  float* out = keys ? gp : gc;
  const int w4 = warp % 4;
  // The warp's two 16-row chunks of the 128: 0 and 3, 1 and 2, 4 and 7, 5 and 6 (WG: w4 and
  // 4 + w4, the rows wgmma gives it).
  const int xc[2] = {WG ? w4 : (w4 / 2) * 4 + w4 % 2, WG ? 4 + w4 : (w4 / 2) * 4 + 3 - w4 % 2};
  for (int e = threadIdx.x; e < 2 * 64 * LDK; e += TG_THREADS) DSC[e] = 0;
  const int nb = min(TG_BATCHES, B - b0), total = nb * tiles, switch_at = nb * (tiles - o);
  float acc[2][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int n8 = 0; n8 < D / 8; ++n8) acc[mt][n8][0] = acc[mt][n8][1] = acc[mt][n8][2] = acc[mt][n8][3] = 0.f;
  // The tile's dS as 16-byte words: 512 per tile, `tile_word` of threadIdx.x and threadIdx.x + 256.
  uint4 w[2];
  // Kept in registers (`opaque`): else recomputed per tile, +26 instructions.
  const int word[2] = {(int)opaque(tile_word(threadIdx.x)), (int)opaque(tile_word(threadIdx.x + TG_THREADS))};
  int b = b0, n = 0, od = o;  // the next tile to fetch
  auto fetch = [&](int buffer) {
    const int m = n + od;
    if (WG)
      load_tile_cm_async(QK + (2 * buffer + keys) * 64 * LDS, keys ? k : q, b, h, (keys ? m : n) * 64, N, H,
                         threadIdx.x % 128);
    else
      load_tile_async(QK + (2 * buffer + keys) * 64 * LDS, keys ? k : q, b, h, (keys ? m : n) * 64, N, H,
                      threadIdx.x % 128);
    const bf16* src = ds + (((long long)(b * H + h) * tiles + n) * tiles + m) * 64 * 64;
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const bf16* at = src + word[x] * 8;
      CHECK_ALIGNED(at, 16);
      w[x] = *reinterpret_cast<const uint4*>(at);
    }
    next_diagonal_tile(b, n, od, b0, nb, tiles);
  };
  fetch(0);
  cp_async_commit();
  for (int it = 0; it < total; ++it) {
    __syncthreads();  // the previous tile's readers of DSC, DSP and the other buffer are done
#pragma unroll
    for (int x = 0; x < 2; ++x) {  // dS(i, j0 .. j0 + 7) into both skewed copies
      const int i = word[x] / 8, j0 = word[x] % 8 * 8;
      const unsigned int words[4] = {w[x].x, w[x].y, w[x].z, w[x].w};
#pragma unroll
      for (int y = 0; y < 8; ++y) {
        const bf16 v = (bf16)(words[y / 2] >> (16 * (y & 1)));
        const int j = j0 + y;
        DSC[i * LDK + 63 - i + j] = v;
        DSP[j * LDK + 63 - j + i] = v;
      }
    }
    if (it + 1 < total) fetch((it + 1) & 1);  // in flight during this tile's products
    cp_async_commit();
    cp_async_wait_prior();  // this tile's Q and K have landed
    if (WG) fence_proxy_async();  // for wgmma's reads of them
    __syncthreads();
    if (out && WG) {  // MN-major B: along K (the tile's rows) 16 D bytes per core matrix, along N 128
      const bf16* S = keys ? DSP : DSC;
      const unsigned int rows = wgmma_shared(QK + (2 * (it & 1) + keys) * 64 * LDS);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        FragA a[4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (xc[mt] + kk < 3 || xc[mt] + kk > 7) a[kk] = FragA{{0u, 0u, 0u, 0u}};  // an all-zero block
          else load_a_t(a[kk], S + kk * 16 * LDK + 16 * xc[mt], LDK);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n64k16<1>(acc[mt], a[kk].x, wgmma_desc_mn(rows + 32 * D * kk, 16 * D, 128), 1);
        wgmma_commit();
        wgmma_wait_all();
        wgmma_fence_operands(acc[mt]);
      }
    } else if (out) {
      const bf16* S = keys ? DSP : DSC;
      const bf16* R = QK + (2 * (it & 1) + keys) * 64 * LDS;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (xc[mt] + kk < 3 || xc[mt] + kk > 7) continue;  // an all-zero block of the skewed dS
          FragA a;
          load_a_t(a, S + kk * 16 * LDK + 16 * xc[mt], LDK);
          a_times_rows(acc[mt], a, R + kk * 16 * LDS);
        }
    }
    if (out && (it + 1 == switch_at || it + 1 == total)) {  // a diagonal's last tile: write its sums
      const int od = it + 1 == switch_at ? o : o - tiles;
      float* base = out + (((long long)blockIdx.z * H + h) * (2 * tiles - 1) + (keys ? tiles - 1 - od : od + tiles - 1)) * 128 * D;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int n8 = 0; n8 < D / 8; ++n8) {
            float* p = base + (16 * xc[mt] + g + 8 * half) * D + n8 * 8 + 2 * t;
            CHECK_ALIGNED(p, 8);
            *reinterpret_cast<float2*>(p) = make_float2(acc[mt][n8][2 * half], acc[mt][n8][2 * half + 1]);
            acc[mt][n8][2 * half] = acc[mt][n8][2 * half + 1] = 0.f;
          }
    }
  }
}
KERNEL void __launch_bounds__(TG_THREADS, 2)
dattn_table_grads(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ ds,
                  float* __restrict__ gc, float* __restrict__ gp, int B, int H, int N) {
  table_grads<false>(q, k, ds, gc, gp, B, H, N);
}
#if D == 64 && (defined(DEBERTA_EMULATE) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
// The same by wgmma (`table_grads`' WG): sm_90a, head size 64.
KERNEL void __launch_bounds__(TG_THREADS, 2)
dattn_table_grads_wg(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ ds,
                     float* __restrict__ gc, float* __restrict__ gp, int B, int H, int N) {
  table_grads<true>(q, k, ds, gc, gp, B, H, N);
}
#endif

// out[h][m][d] (fp32 [H][2N][D], row 2N-1 zero) from dattn_table_grads' sums: distance m is row
// p = m + 64 tiles - N of the padded table, which diagonals u = p / 64 - 1 and p / 64 hold at their
// rows p - 64 u; summed with the batch chunks, in fp32. A thread per 4 consecutive d.
KERNEL void dattn_table_grads_sum(const float* __restrict__ part, float* __restrict__ out, int chunks, int H, int N) {
  const int tiles = (N + 63) / 64, U = 2 * tiles - 1;
  const long long total = (long long)H * 2 * N * (D / 4);
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const int d = idx % (D / 4) * 4, m = (idx / (D / 4)) % (2 * N), h = idx / ((long long)(D / 4) * 2 * N);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const int p = m + 64 * tiles - N;
    if (m < 2 * N - 1)
      for (int c = 0; c < chunks; ++c)
        for (int u = max(0, p / 64 - 1); u <= min(U - 1, p / 64); ++u) {
          const float4 v = load4(part + ((((long long)c * H + h) * U + u) * 128 + p - 64 * u) * D + d);
          acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
        }
    store4(out + ((long long)h * 2 * N + m) * D + d, acc);
  }
}

// The dropout mask the kernels apply, [B, H, N, N] u8 (1 = kept), for tests against the reference.
KERNEL void dattn_dropout_mask(unsigned char* keep_out, long long total, int N, float p_drop,
                                unsigned long long seed) {
  const unsigned int threshold = DROP_THRESHOLD(p_drop);
  const long long nn = (long long)N * N;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long bh = idx / nn, ij = idx % nn;
    const int i = (int)(ij / N), j = (int)(ij % N);
    keep_out[idx] = kept(pair_hash(head_key(seed, bh), i, j & ~8), j & 8, threshold) ? 1 : 0;
  }
}
