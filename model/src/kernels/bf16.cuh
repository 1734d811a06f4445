// What every kernel source here shares: bf16 as its bit pattern (NVRTC ships none of CUDA's
// headers), its conversions, and the defaults of the two macros the CPU emulator redefines.
// Rust prepends this file to each source (`concat!`); the emulator includes it before each.

// The CPU emulator (emulate.cpp, tests) compiles the sources as C++ with its own definitions of
// these two, of `emu_f2bf` and of the PTX instructions the kernels use.
#ifndef KERNEL
#define KERNEL extern "C" __global__
#endif
#ifndef DYNAMIC_SMEM
#define DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
// A vector access of `bytes` at p, which the GPU faults on unless p is aligned to them ("misaligned
// address"); the emulator checks it, the GPU build compiles nothing for it.
#ifndef CHECK_ALIGNED
#define CHECK_ALIGNED(p, bytes) ((void)0)
#endif

typedef unsigned short bf16;

__device__ __forceinline__ float bf2f(bf16 h) { return __uint_as_float(((unsigned int)h) << 16); }
// cvt.rn.bf16.f32: round to nearest, ties to even.
#ifdef DEBERTA_EMULATE
__device__ __forceinline__ bf16 f2bf(float f) { return emu_f2bf(f); }
#else
__device__ __forceinline__ bf16 f2bf(float f) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}
#endif
__device__ __forceinline__ unsigned int pack(bf16 lo, bf16 hi) { return (unsigned int)lo | ((unsigned int)hi << 16); }
// The two bf16 of a 32-bit word (a 32-bit load of an even column: the low half is that column).
__device__ __forceinline__ float lo_f(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_f(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }
// Four consecutive elements (16 bytes of fp32, 8 of bf16; aligned) as a float4, and back (bf16:
// rounded to nearest even).
__device__ __forceinline__ float4 load4(const float* p) {
  CHECK_ALIGNED(p, 16);
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 load4(const bf16* p) {
  CHECK_ALIGNED(p, 8);
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  return make_float4(lo_f(w.x), hi_f(w.x), lo_f(w.y), hi_f(w.y));
}
__device__ __forceinline__ void store4(float* p, float4 v) {
  CHECK_ALIGNED(p, 16);
  *reinterpret_cast<float4*>(p) = v;
}
__device__ __forceinline__ void store4(bf16* p, float4 v) {
  CHECK_ALIGNED(p, 8);
  *reinterpret_cast<uint2*>(p) = make_uint2(pack(f2bf(v.x), f2bf(v.y)), pack(f2bf(v.z), f2bf(v.w)));
}
