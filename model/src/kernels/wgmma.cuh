// Hopper's warpgroup mma (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate":
// wgmma.mma_async, sm_90a only). One instruction of a warpgroup (4 warps, 128 threads) computes
// D [64 x N] += A [64 x 16] B [16 x N]: A from registers (each warp its 16 rows, in mma.sync's A
// fragment layout), B read from shared memory through a descriptor, once for the 4 warps, where
// mma.sync has each warp load its own B fragments (`ldmatrix`): the attention kernels' shared
// memory traffic is mostly those loads (docs/performance.md, twentieth session). D's layout per
// warp is mma.sync's C layout repeated over N / 8: d[j][e] is (row 16 warp + g + 8 (e >= 2),
// column 8 j + 2 t + (e & 1)).
//
// B without swizzle ("interleave"): core matrices of 8 rows x 16 bytes, each 128 contiguous
// bytes. In bytes from the descriptor's start, after CUTLASS's canonical layouts
// (cute/atom/mma_traits_sm90_gmma.hpp; LBO the leading-, SBO the stride-dimension byte offset):
//   K-major (B^T stored [n][k], as a key tile [key][d] is for S = Q K^T), TRANS_B = 0:
//     B(k, n) at (n % 8) * 16 + (k % 8) * 2 + (n / 8) * SBO + (k / 8) * LBO;
//   MN-major (B stored [k][n], as a value tile [key][d] is for O = P V), TRANS_B = 1:
//     B(k, n) at (k % 8) * 16 + (n % 8) * 2 + (n / 8) * SBO + (k / 8) * LBO.
// The emulator reads B this way (emulate.cpp); `wgmma_probe` checks on the GPU that the
// hardware does too.

// The emulator models the asynchrony: the accumulators are unusable from the issue until a
// wgmma_wait covering its group, the shared memory read must not change until then, a
// wgmma_fence must come before the first wgmma after a wait, and the four warps of a warpgroup
// must issue the same wgmma with the same descriptors.

// The descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 the start address, 16-29 LBO,
// 32-45 SBO, each in 16-byte units; base offset (49-51) and layout (62-63: 0, no swizzle) zero.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned int start, unsigned int lbo, unsigned int sbo) {
  return (unsigned long long)((start & 0x3ffffu) >> 4) | (unsigned long long)((lbo & 0x3ffffu) >> 4) << 16 |
         (unsigned long long)((sbo & 0x3ffffu) >> 4) << 32;
}
// The kernels' descriptors, by layout: core matrices `along_k` bytes apart along K and
// `along_mn` along M or N, in LBO and SBO as the PTX ISA and CUTLASS have them. Should
// `wgmma-probe` find the hardware reading a layout's two fields the other way round, the GPU
// build can swap them for that layout (`DEBERTA_WGMMA_SWAP`): WGMMA_SWAP_K for B K-major,
// WGMMA_SWAP_MN for B MN-major, WGMMA_SWAP_A for A from shared memory. The emulator reads them
// as intended, and is never built with a swap.
#ifdef WGMMA_SWAP_K
#define WGMMA_K_SWAPPED true
#else
#define WGMMA_K_SWAPPED false
#endif
#ifdef WGMMA_SWAP_MN
#define WGMMA_MN_SWAPPED true
#else
#define WGMMA_MN_SWAPPED false
#endif
#ifdef WGMMA_SWAP_A
#define WGMMA_A_SWAPPED true
#else
#define WGMMA_A_SWAPPED false
#endif
__device__ __forceinline__ unsigned long long wgmma_desc_k(unsigned int start, unsigned int along_k,
                                                          unsigned int along_n) {
  return WGMMA_K_SWAPPED ? wgmma_desc(start, along_n, along_k) : wgmma_desc(start, along_k, along_n);
}
__device__ __forceinline__ unsigned long long wgmma_desc_mn(unsigned int start, unsigned int along_k,
                                                           unsigned int along_n) {
  return WGMMA_MN_SWAPPED ? wgmma_desc(start, along_n, along_k) : wgmma_desc(start, along_k, along_n);
}
__device__ __forceinline__ unsigned long long wgmma_desc_a(unsigned int start, unsigned int along_k,
                                                          unsigned int along_m) {
  return WGMMA_A_SWAPPED ? wgmma_desc(start, along_m, along_k) : wgmma_desc(start, along_k, along_m);
}

#ifdef DEBERTA_EMULATE
__device__ __forceinline__ unsigned int wgmma_shared(const void* p) { return emu_shared_offset(p); }
__device__ __forceinline__ void wgmma_fence() { emu_wgmma_fence(); }
__device__ __forceinline__ void wgmma_commit() { emu_wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { emu_wgmma_wait(N); }
__device__ __forceinline__ void fence_proxy_async() {}
template <int NJ = 8>
__device__ __forceinline__ void wgmma_fence_operands(float (*)[4]) {}
// d = (accumulate ? d : 0) + A B, m64n64k16 (and m64n32k16), bf16 in, fp32 accumulate.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16(float (*d)[4], const unsigned int* a, unsigned long long desc,
                                                int accumulate) {
  emu_wgmma(&d[0][0], a, desc, accumulate, TRANS_B, 64);
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n32k16(float (*d)[4], const unsigned int* a, unsigned long long desc,
                                                int accumulate) {
  emu_wgmma(&d[0][0], a, desc, accumulate, TRANS_B, 32);
}
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (*d)[4], unsigned long long adesc, unsigned long long bdesc,
                                                   int accumulate) {
  emu_wgmma_ss(&d[0][0], adesc, bdesc, accumulate, 64);
}
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (*d)[4], unsigned long long adesc, unsigned long long bdesc,
                                                   int accumulate) {
  emu_wgmma_ss(&d[0][0], adesc, bdesc, accumulate, 32);
}
#else
// The shared-memory address the descriptor takes (the state space's own, 32-bit).
__device__ __forceinline__ unsigned int wgmma_shared(const void* p) {
  return (unsigned int)__cvta_generic_to_shared(p);
}
// Before a warpgroup's first wgmma reads registers (A, D) that other instructions wrote.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Every committed group but the N latest has completed: their accumulators may be read.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores (the generic proxy), made visible to wgmma's reads
// (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving the accumulators' reads or writes across a wgmma wait (NJ
// groups of 8 columns: N / 8).
template <int NJ = 8>
__device__ __forceinline__ void wgmma_fence_operands(float (*d)[4]) {
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
// The accumulators d[j][e] as the asm's first operands (in, out), and their registers in the
// instruction: 16 for N = 32, 32 for N = 64.
#define WGMMA_D16(d)                                                                                            \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),     \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), \
      "+f"(d[3][2]), "+f"(d[3][3])
#define WGMMA_D32(d)                                                                                            \
  WGMMA_D16(d), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]),      \
      "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), \
      "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define WGMMA_D16_REGS "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
#define WGMMA_D32_REGS                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
// a: the warp's A fragment (4 registers, mma.sync's layout).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16(float (*d)[4], const unsigned int* a, unsigned long long desc,
                                                int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      WGMMA_D32_REGS
      "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"
      : WGMMA_D32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TRANS_B), "r"(accumulate));
}
// A from shared memory too, through adesc: both K-major (A [64][16] as core matrices of 8 rows
// of A x 16 bytes of K, like a K-major B's), no transposes.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (*d)[4], unsigned long long adesc, unsigned long long bdesc,
                                                   int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      WGMMA_D32_REGS
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : WGMMA_D32(d)
      : "l"(adesc), "l"(bdesc), "r"(accumulate));
}
// The same, N = 32: d[4][4].
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (*d)[4], unsigned long long adesc, unsigned long long bdesc,
                                                   int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      WGMMA_D16_REGS
      "%16, %17, p, 1, 1, 0, 0;\n}\n"
      : WGMMA_D16(d)
      : "l"(adesc), "l"(bdesc), "r"(accumulate));
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n32k16(float (*d)[4], const unsigned int* a, unsigned long long desc,
                                                int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %22, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      WGMMA_D16_REGS
      "{%16, %17, %18, %19}, %20, p, 1, 1, %21;\n}\n"
      : WGMMA_D16(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TRANS_B), "r"(accumulate));
}
#endif
__device__ __forceinline__ void wgmma_wait_all() { wgmma_wait<0>(); }
