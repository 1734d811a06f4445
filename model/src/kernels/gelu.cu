// GELU's backward with its forward recomputed, for the FFN's hand-written backward
// (model/src/gelu.rs). From h and df = dL/d gelu(h), both [rows, cols]:
//   f  = gelu(h)       the operand of W2's weight gradient (act(h) is not kept in forward),
//   dh = df gelu'(h)   h's gradient,
//   part[blockIdx.y][c] = the column sums of dh over the block's rows (b1's gradient; the caller
//                         sums the blocks),
// reading h and df once. libtorch takes three passes: gelu, gelu_backward, then the column sum of
// dh. The exact (erf) GELU as libtorch computes it, in fp32: gelu(x) = x Φ(x),
// gelu'(x) = Φ(x) + x φ(x), Φ(x) = (1 + erf(x / √2)) / 2, φ(x) = exp(-x² / 2) / √(2π).
//
// One thread per 4 columns, a block per `per_block` rows and 4 blockDim.x columns: cols % 4 == 0.
// h, df, f, dh are bf16 or fp32 (the `_bf16` and `_f32` entry points), contiguous; part fp32.

// bf16, f2bf, bf2f, load4, store4 and KERNEL: kernels/bf16.cuh, prepended.

// The value a store of v keeps: b1's gradient sums dh as stored, the bits the W1 GEMMs read, as
// libtorch's sum of the stored dh does.
__device__ __forceinline__ float stored(float v, const float*) { return v; }
__device__ __forceinline__ float stored(float v, const bf16*) { return bf2f(f2bf(v)); }

__device__ __forceinline__ void gelu_and_grad(float x, float g, float& f, float& d) {
  const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
  f = x * cdf;
  d = g * (cdf + x * pdf);
}

template <class T>
__device__ __forceinline__ void gelu_bwd(const T* __restrict__ h, const T* __restrict__ df, T* __restrict__ f,
                                         T* __restrict__ dh, float* __restrict__ part, long long rows, int cols,
                                         int per_block) {
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (c >= cols) return;
  const long long r0 = (long long)blockIdx.y * per_block;
  const long long r1 = r0 + per_block < rows ? r0 + per_block : rows;
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
  for (long long r = r0; r < r1; ++r) {
    const long long at = r * cols + c;
    const float4 x = load4(h + at), g = load4(df + at);
    float4 y, d;
    gelu_and_grad(x.x, g.x, y.x, d.x);
    gelu_and_grad(x.y, g.y, y.y, d.y);
    gelu_and_grad(x.z, g.z, y.z, d.z);
    gelu_and_grad(x.w, g.w, y.w, d.w);
    store4(f + at, y);
    store4(dh + at, d);
    sum.x += stored(d.x, dh);
    sum.y += stored(d.y, dh);
    sum.z += stored(d.z, dh);
    sum.w += stored(d.w, dh);
  }
  store4(part + (long long)blockIdx.y * cols + c, sum);
}

KERNEL void gelu_bwd_bf16(const bf16* __restrict__ h, const bf16* __restrict__ df, bf16* __restrict__ f,
                          bf16* __restrict__ dh, float* __restrict__ part, long long rows, int cols, int per_block) {
  gelu_bwd(h, df, f, dh, part, rows, cols, per_block);
}
KERNEL void gelu_bwd_f32(const float* __restrict__ h, const float* __restrict__ df, float* __restrict__ f,
                         float* __restrict__ dh, float* __restrict__ part, long long rows, int cols, int per_block) {
  gelu_bwd(h, df, f, dh, part, rows, cols, per_block);
}
