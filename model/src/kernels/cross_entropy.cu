// The MLM head's cross-entropy over the vocabulary (model/src/cross_entropy.rs), one block per
// row of the logits [rows, cols] (this rank's vocabulary columns, bf16 or fp32: the `_bf16` and
// `_f32` entry points). z = logit + bias[c], the logit widened to fp32 before the fp32 bias is
// added, as libtorch adds a bf16 product and an fp32 bias. Columns >= `real` are the
// vocabulary's padding: out of the softmax, their gradient 0. target[row] is the row's target
// column on this rank (outside [0, real): another rank's).
//   ce_stats: stats[row] = (m, s, t): the row's max of z, the sum of exp(z - m), and z at the
//             target column (0 if the column is not this rank's). One pass over the logits
//             where libtorch took eight (cast, mask, max, subtract, exp, sum, gather, log).
//   ce_grad:  dz[row][c] = scale[row] (exp(z - lse[row]) - [c = target]): the gradient of
//             scale · (lse - z_target) for every row; dz may be the logits themselves (each
//             element is read, then written, by the same thread).
// The block's threads take 4 columns at a time: cols % 4 == 0.

// bf16, bf2f, f2bf, load4, store4 and KERNEL: kernels/bf16.cuh, prepended.

#define CE_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(bf16 x) { return bf2f(x); }

// (m, s) <- the pair of the union: s sums exp(x - m) over its elements.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == CE_NEG_INF) return;  // both empty
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

// One more element x: one exponential.
__device__ __forceinline__ void add_one(float& m, float& s, float x) {
  if (x > m) {
    s = s * __expf(m - x) + 1.f;
    m = x;
  } else {
    s += __expf(x - m);
  }
}

template <class T>
__device__ __forceinline__ void ce_stats(const T* __restrict__ logits, const float* __restrict__ bias,
                                         const long long* __restrict__ target, float* __restrict__ stats, int cols,
                                         int real) {
  DYNAMIC_SMEM(smem);
  float2* red = reinterpret_cast<float2*>(smem);  // a pair per warp
  const long long row = blockIdx.x;
  const T* z = logits + row * cols;
  float m = CE_NEG_INF, s = 0.f;
  for (int c = 4 * threadIdx.x; c < real; c += 4 * blockDim.x) {
    const float4 x = load4(z + c), b = load4(bias + c);
    add_one(m, s, x.x + b.x);
    if (c + 1 < real) add_one(m, s, x.y + b.y);
    if (c + 2 < real) add_one(m, s, x.z + b.z);
    if (c + 3 < real) add_one(m, s, x.w + b.w);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = make_float2(m, s);
  __syncthreads();
  if (threadIdx.x == 0) {
    // The warps' pairs in warp order: the same bits whatever the schedule.
    m = CE_NEG_INF, s = 0.f;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) merge(m, s, red[w].x, red[w].y);
    const long long t = target[row];
    const float zt = t >= 0 && t < real ? widen(z[t]) + bias[t] : 0.f;
    stats[3 * row] = m;
    stats[3 * row + 1] = s;
    stats[3 * row + 2] = zt;
  }
}

template <class T>
__device__ __forceinline__ void ce_grad(const T* logits, const float* __restrict__ bias,
                                        const long long* __restrict__ target, const float* __restrict__ lse,
                                        const float* __restrict__ scale, T* dz, int cols, int real) {
  const long long row = blockIdx.x;
  const long long t = target[row];
  const float l = lse[row], g = scale[row];
  const T* z = logits + row * cols;
  T* d = dz + row * cols;
  for (int c = 4 * threadIdx.x; c < cols; c += 4 * blockDim.x) {
    const float4 x = load4(z + c), b = load4(bias + c);
    const float v[4] = {x.x + b.x, x.y + b.y, x.z + b.z, x.w + b.w};
    float o[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      o[k] = c + k < real ? g * (__expf(v[k] - l) - (c + k == t ? 1.f : 0.f)) : 0.f;
    store4(d + c, make_float4(o[0], o[1], o[2], o[3]));
  }
}

KERNEL void ce_stats_bf16(const bf16* __restrict__ logits, const float* __restrict__ bias,
                          const long long* __restrict__ target, float* __restrict__ stats, int cols, int real) {
  ce_stats(logits, bias, target, stats, cols, real);
}
KERNEL void ce_stats_f32(const float* __restrict__ logits, const float* __restrict__ bias,
                         const long long* __restrict__ target, float* __restrict__ stats, int cols, int real) {
  ce_stats(logits, bias, target, stats, cols, real);
}
KERNEL void ce_grad_bf16(const bf16* logits, const float* __restrict__ bias, const long long* __restrict__ target,
                         const float* __restrict__ lse, const float* __restrict__ scale, bf16* dz, int cols, int real) {
  ce_grad(logits, bias, target, lse, scale, dz, cols, real);
}
KERNEL void ce_grad_f32(const float* logits, const float* __restrict__ bias, const long long* __restrict__ target,
                        const float* __restrict__ lse, const float* __restrict__ scale, float* dz, int cols, int real) {
  ce_grad(logits, bias, target, lse, scale, dz, cols, real);
}
