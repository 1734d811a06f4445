// Dropout + residual + LayerNorm after a row-parallel dense layer (HF's SelfOutput / Output), one
// pass each way over [rows, d] (model/src/residual_norm.rs). Compiled at run time by NVRTC and, as
// C++, by the CPU emulator (emulate.cpp).
//   o = dropout(z + bias),  x = o + res,  y = γ x̂ + β,  x̂ = (x − μ) r,  r = 1 / sqrt(var(x) + eps)
// libtorch takes five passes over fp32 [rows, d] tensors for the forward (bias, dropout with a
// stored byte mask, residual, LayerNorm) and some eight for the backward; these kernels read
// each input once and write each output once. The dropout mask is a hash of (seed, row, column),
// recomputed in backward: nothing stored.
//
// One block per row (grid-stride), one float4 of columns per thread: blockDim.x >= d / 4. The
// row stays in registers; its mean and variance are two block reductions (two-pass variance,
// as exact as libtorch's Welford). Dynamic shared memory: 512 bytes for the reductions, and in
// backward 48 bytes per thread for its column sums. z (and dz) are bf16 or fp32 (the `_bf16`
// and `_f32` entry points); everything else fp32, contiguous.

// bf16, f2bf, pack, lo_f, hi_f, load4, store4, KERNEL and DYNAMIC_SMEM: kernels/bf16.cuh,
// prepended.
#define RLN_MAX_THREADS 1024


// Dropout: each row's key is a 64-bit mix of (seed, row) (splitmix64's finalizer), taken once
// per row; columns 2m and 2m + 1 share one 32-bit hash of m (murmur3's finalizer of m ^ key, a
// bijection of m), 16 bits each. Kept where those bits are >= p 2^16.
__device__ __forceinline__ unsigned row_key(unsigned long long seed, long long row) {
  unsigned long long z = seed + (unsigned long long)(row + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return (unsigned)((z ^ (z >> 31)) >> 32);
}
__device__ __forceinline__ unsigned column_pair_hash(unsigned key, int pair) {
  unsigned x = (unsigned)pair ^ key;
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  return x ^ (x >> 16);
}
// The mask of columns c..c+3 (c a multiple of 4) of the row with `key`, as 0 or `scale`.
__device__ __forceinline__ float4 keep4(unsigned key, int c, unsigned threshold, float scale) {
  const unsigned a = column_pair_hash(key, c / 2), b = column_pair_hash(key, c / 2 + 1);
  return make_float4((a & 0xffffu) >= threshold ? scale : 0.f, (a >> 16) >= threshold ? scale : 0.f,
                     (b & 0xffffu) >= threshold ? scale : 0.f, (b >> 16) >= threshold ? scale : 0.f);
}
#define RLN_THRESHOLD(p) ((unsigned)((p) * 65536.0f))

__device__ __forceinline__ float hsum(float4 v) { return (v.x + v.y) + (v.z + v.w); }

// The sum of (a, b) over the block, in every thread. `red` holds 32 float2 of shared memory; the
// caller alternates two such buffers, so that one barrier per reduction suffices (a thread
// writes one buffer only after every thread has passed the barrier of the reduction that read
// it last). Summed in warp order: every thread gets the same bits.
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = make_float2(a, b);
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  for (int w = 0; w < (int)blockDim.x / 32; ++w) s.x += red[w].x, s.y += red[w].y;
  return s;
}

// y = LayerNorm(dropout(z + bias) + res), rstd[row] = r; and y16 = y in bf16 where given (the next
// sublayer's GEMM operand, which would otherwise cost a pass casting y).
template <class Z>
__device__ __forceinline__ void rln_fwd(const Z* __restrict__ z, const float* __restrict__ bias,
                                        const float* __restrict__ res, const float* __restrict__ gamma,
                                        const float* __restrict__ beta, float* __restrict__ y,
                                        bf16* __restrict__ y16, float* __restrict__ rstd, long long rows, int d,
                                        float eps, float p_drop, unsigned long long seed) {
  DYNAMIC_SMEM(smem);
  float2* red = reinterpret_cast<float2*>(smem);  // [2][32]
  const int c = 4 * threadIdx.x;
  const bool mine = c < d;
  const unsigned threshold = RLN_THRESHOLD(p_drop);
  const float scale = 1.f / (1.f - p_drop), inv_d = 1.f / (float)d;
  int parity = 0;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mine) {
      // The parameters are read again per row (L1 hits), not held: registers decide how many
      // rows an SM keeps in flight.
      const float4 v = load4(z + r * d + c), q = load4(res + r * d + c), b = load4(bias + c);
      x = make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w);
      if (p_drop > 0.f) {
        const float4 k = keep4(row_key(seed, r), c, threshold, scale);
        x = make_float4(x.x * k.x, x.y * k.y, x.z * k.z, x.w * k.w);
      }
      x = make_float4(x.x + q.x, x.y + q.y, x.z + q.z, x.w + q.w);
    }
    const float mean = block_sum2(hsum(x), 0.f, red + 32 * parity).x * inv_d;
    parity ^= 1;
    const float4 e = make_float4(x.x - mean, x.y - mean, x.z - mean, x.w - mean);
    const float sq = mine ? (e.x * e.x + e.y * e.y) + (e.z * e.z + e.w * e.w) : 0.f;
    const float var = block_sum2(sq, 0.f, red + 32 * parity).x * inv_d;
    parity ^= 1;
    const float rs = rsqrtf(var + eps);
    if (mine) {
      const float4 g = load4(gamma + c), be = load4(beta + c);
      const float4 out = make_float4(e.x * rs * g.x + be.x, e.y * rs * g.y + be.y, e.z * rs * g.z + be.z,
                                     e.w * rs * g.w + be.w);
      store4(y + r * d + c, out);
      if (y16) store4(y16 + r * d + c, out);
    }
    if (threadIdx.x == 0) rstd[r] = rs;
  }
}

// From dL/dy (dy, plus dy2 where given: the gradient's bf16 part from the next sublayer's input
// projections, summed here instead of by a pass of its own), the output y and rstd: ds = dL/dx (the residual's gradient) and dz = dL/dz; the
// column sums of dz (the bias's gradient), dy x̂ (γ's) and dy (β's) over this block's rows go to
// part[blockIdx.x][0..3][d], which the caller sums over blocks (no atomics: the same bits every
// run). x̂ = (y − β) / γ: exact while no γ is 0 (as Apex's memory-efficient LayerNorm).
//   ds = r (g − mean(g) − x̂ mean(g x̂)),  g = γ dy
template <class Z>
__device__ __forceinline__ void rln_bwd(const float* __restrict__ dy, const bf16* __restrict__ dy2,
                                        const float* __restrict__ y,
                                        const float* __restrict__ rstd, const float* __restrict__ gamma,
                                        const float* __restrict__ beta, float* __restrict__ ds, Z* __restrict__ dz,
                                        float* __restrict__ part, long long rows, int d, float p_drop,
                                        unsigned long long seed) {
  DYNAMIC_SMEM(smem);
  float2* red = reinterpret_cast<float2*>(smem);  // [2][32]
  // This thread's column sums of dz, dy x̂ and dy, in shared memory (each thread its own
  // float4s): in registers they would cost the rows an SM keeps in flight.
  float4* acc = reinterpret_cast<float4*>(smem + 2 * 32 * sizeof(float2)) + 3 * threadIdx.x;
  const int c = 4 * threadIdx.x;
  const bool mine = c < d;
  const unsigned threshold = RLN_THRESHOLD(p_drop);
  const float scale = 1.f / (1.f - p_drop), inv_d = 1.f / (float)d;
  acc[0] = acc[1] = acc[2] = make_float4(0.f, 0.f, 0.f, 0.f);
  int parity = 0;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    float4 xh = make_float4(0.f, 0.f, 0.f, 0.f), g = xh;
    if (mine) {
      float4 dyv = load4(dy + r * d + c);
      const float4 yv = load4(y + r * d + c);
      if (dy2) {
        const float4 e = load4(dy2 + r * d + c);
        dyv = make_float4(dyv.x + e.x, dyv.y + e.y, dyv.z + e.z, dyv.w + e.w);
      }
      const float4 ga = load4(gamma + c), be = load4(beta + c);
      xh = make_float4(__fdividef(yv.x - be.x, ga.x), __fdividef(yv.y - be.y, ga.y), __fdividef(yv.z - be.z, ga.z),
                       __fdividef(yv.w - be.w, ga.w));
      g = make_float4(dyv.x * ga.x, dyv.y * ga.y, dyv.z * ga.z, dyv.w * ga.w);
      float4 a = acc[1], b = acc[2];
      acc[1] = make_float4(a.x + dyv.x * xh.x, a.y + dyv.y * xh.y, a.z + dyv.z * xh.z, a.w + dyv.w * xh.w);
      acc[2] = make_float4(b.x + dyv.x, b.y + dyv.y, b.z + dyv.z, b.w + dyv.w);
    }
    const float gx = (g.x * xh.x + g.y * xh.y) + (g.z * xh.z + g.w * xh.w);
    const float2 s = block_sum2(hsum(g), gx, red + 32 * parity);
    parity ^= 1;
    if (!mine) continue;
    const float rs = rstd[r], mg = s.x * inv_d, mgx = s.y * inv_d;
    const float4 dx = make_float4(rs * (g.x - mg - xh.x * mgx), rs * (g.y - mg - xh.y * mgx),
                                  rs * (g.z - mg - xh.z * mgx), rs * (g.w - mg - xh.w * mgx));
    store4(ds + r * d + c, dx);
    float4 dzv = dx;
    if (p_drop > 0.f) {
      const float4 k = keep4(row_key(seed, r), c, threshold, scale);
      dzv = make_float4(dx.x * k.x, dx.y * k.y, dx.z * k.z, dx.w * k.w);
    }
    store4(dz + r * d + c, dzv);
    const float4 a = acc[0];
    acc[0] = make_float4(a.x + dzv.x, a.y + dzv.y, a.z + dzv.z, a.w + dzv.w);
  }
  if (mine) {
    float* out = part + (long long)blockIdx.x * 3 * d + c;
    store4(out, acc[0]);
    store4(out + d, acc[1]);
    store4(out + 2 * d, acc[2]);
  }
}

#define RLN_ENTRY_POINTS(suffix, Z)                                                                              \
  KERNEL void __launch_bounds__(RLN_MAX_THREADS)                                                                 \
      rln_fwd_##suffix(const Z* z, const float* bias, const float* res, const float* gamma, const float* beta,     \
                       float* y, bf16* y16, float* rstd, long long rows, int d, float eps, float p_drop,         \
                       unsigned long long seed) {                                                                \
    rln_fwd<Z>(z, bias, res, gamma, beta, y, y16, rstd, rows, d, eps, p_drop, seed);                             \
  }                                                                                                              \
  KERNEL void __launch_bounds__(RLN_MAX_THREADS)                                                                 \
      rln_bwd_##suffix(const float* dy, const bf16* dy2, const float* y, const float* rstd, const float* gamma,    \
                       const float* beta, float* ds, Z* dz, float* part, long long rows, int d, float p_drop,    \
                       unsigned long long seed) {                                                                \
    rln_bwd<Z>(dy, dy2, y, rstd, gamma, beta, ds, dz, part, rows, d, p_drop, seed);                              \
  }
RLN_ENTRY_POINTS(bf16, bf16)
RLN_ENTRY_POINTS(f32, float)

// The dropout mask of `rows` x d (d a multiple of 4) for `seed`, 1 = kept: for tests.
KERNEL void rln_dropout_mask(unsigned char* keep, long long rows, int d, float p_drop, unsigned long long seed) {
  const unsigned threshold = RLN_THRESHOLD(p_drop);
  for (long long r = blockIdx.x; r < rows; r += gridDim.x)
    for (int c = 4 * threadIdx.x; c < d; c += 4 * blockDim.x) {
      const float4 k = keep4(row_key(seed, r), c, threshold, 1.f);
      keep[r * d + c] = k.x != 0.f, keep[r * d + c + 1] = k.y != 0.f;
      keep[r * d + c + 2] = k.z != 0.f, keep[r * d + c + 3] = k.w != 0.f;
    }
}
