// A probe of wgmma (kernels/wgmma.cuh) on the GPU, before any attention kernel relies on it
// (`deberta-worker wgmma-probe`, model/src/wgmma_probe.rs): no device session has run a wgmma
// yet, and its operand layouts and descriptor (from the PTX ISA and CUTLASS, not from a run)
// are easy to get wrong in ways only the hardware shows. One warpgroup computes
//   d [64][64] (fp32, row-major) = a [64][64] B,
// a row-major bf16, B (bf16, 64 x 64) given as b: mn_major = 0, b[n][k] (K-major, as a key
// tile); mn_major = 1, b[k][n] (MN-major, as a value tile). B goes to shared memory as core
// matrices: K-major, core matrix (n / 8, k / 8) at 1,024 (n / 8) + 128 (k / 8) bytes, so LBO
// (between core matrices along K) = 128 and SBO (along N) = 1,024; MN-major, core matrix
// (k / 8, n / 8) at 1,024 (k / 8) + 128 (n / 8), LBO = 1,024, SBO = 128. Four k16 steps, each
// starting 2 LBO further. swap != 0 puts LBO's value in SBO's field and SBO's in LBO's: should
// the hardware read the fields the other way round, that case is the one that matches.
// mode 2: A from shared memory too (as the forward's bands read their windows), K-major like a
// K-major B, at byte 16,384, B K-major as intended; swap applies to A's descriptor.
// 128 threads, one block, 24 KB of dynamic shared memory: B's 8 KB, room for the swapped
// descriptors' reads past it (never written, so they read garbage, not outside the block's),
// and A's 8 KB.

KERNEL void __launch_bounds__(128, 1)
wgmma_probe(const bf16* __restrict__ a, const bf16* __restrict__ b, float* __restrict__ d, int mode, int swap) {
  DYNAMIC_SMEM(smem);
  bf16* B = reinterpret_cast<bf16*>(smem);
  bf16* As = B + 2 * 64 * 64;
  const int mn_major = mode == 1;
  for (int e = threadIdx.x; e < 64 * 64; e += 128) {
    const int k = mn_major ? e / 64 : e % 64, n = mn_major ? e % 64 : e / 64;
    const int at = mn_major ? (k / 8 * 8 + n / 8) * 64 + k % 8 * 8 + n % 8 : (n / 8 * 8 + k / 8) * 64 + n % 8 * 8 + k % 8;
    B[at] = b[e];
    if (mode == 2) {  // a (m = e / 64, k = e % 64) as core matrices (m / 8, k / 8) at 1,024 (m / 8) + 128 (k / 8)
      const int m = e / 64, k = e % 64;
      As[(m / 8 * 8 + k / 8) * 64 + m % 8 * 8 + k % 8] = a[e];
    }
  }
  fence_proxy_async();  // the stores above, for wgmma's reads
  __syncthreads();
  const unsigned int along_k = mn_major ? 1024 : 128, along_n = mn_major ? 128 : 1024;
  const unsigned int lbo = swap && mode < 2 ? along_n : along_k, sbo = swap && mode < 2 ? along_k : along_n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  // The warp's rows of a as A fragments (mma.sync's layout), straight from global memory.
  unsigned int af[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int r = 16 * warp + g + (x & 1) * 8, c = 16 * kk + 2 * t + (x >> 1) * 8;
      af[kk][x] = pack(a[r * 64 + c], a[r * 64 + c + 1]);
    }
  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const unsigned int start = wgmma_shared(B);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const unsigned long long desc = wgmma_desc(start + 2 * kk * along_k, lbo, sbo);
    if (mode == 2)  // A: along K 128 bytes per core matrix, along M 1,024 (swapped: the other way)
      wgmma_m64n64k16_ss(acc, wgmma_desc(wgmma_shared(As) + 256 * kk, swap ? 1024 : 128, swap ? 128 : 1024), desc,
                         kk > 0);
    else if (mn_major) wgmma_m64n64k16<1>(acc, af[kk], desc, kk > 0);
    else wgmma_m64n64k16<0>(acc, af[kk], desc, kk > 0);
  }
  wgmma_commit();
  wgmma_wait_all();
  wgmma_fence_operands(acc);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) d[(16 * warp + g + (e >> 1) * 8) * 64 + 8 * j + 2 * t + (e & 1)] = acc[j][e];
}
