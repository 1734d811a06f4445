// The AdamW update (torch.optim.AdamW's: bias-corrected, decoupled decay) over flat fp32 buffers,
// one pass that reads the weights, gradients and moments and writes weights and moments
// (model/src/adamw.rs; the optimizer is the worker's `optim::FlatAdamW`). Compiled at run time by
// NVRTC and, as C++, by the CPU emulator (emulate.cpp).
//
// 16-byte loads and stores: the four buffers are views at the same offset of allocations aligned
// alike (the caller checks), so the elements before p's first 16-byte boundary go one at a time,
// then float4s, then the tail one at a time. 28 bytes move per element; scalar 4-byte accesses
// kept too few bytes in flight to reach HBM's bandwidth.
//
// `control`, when not null, is the device's decision for this update (fp32 [4]: the gradients'
// factor, 1 to apply or 0 to skip, the two bias corrections), computed by tensor ops from the
// loss and the global norm on the device: the step needs no read-back to skip a non-finite
// update. It overrides gscale, bc1 and bc2.
//
// `p16`, when not null, is the weights' compute copy (bf16, at the same element offset as p in
// a buffer aligned alike: `weight_copies`): the updated weights are written there too, rounded
// as a cast rounds them, so the model's hand-written segments read the copy where they cast the
// weights at every use (2 more bytes per element here against 6 per cast).

// The update of one element.
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, float beta1, float beta2,
                                              float eps, float step, float shrink, float bc2, float gscale) {
  const float gi = g * gscale;  // the clip factor, applied on the fly
  m = beta1 * m + (1.f - beta1) * gi;
  v = beta2 * v + (1.f - beta2) * gi * gi;
  p = p * shrink - step * m / (sqrtf(v / bc2) + eps);
}

KERNEL void adamw_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                       float* __restrict__ v, long long n, float lr, float beta1, float beta2, float eps, float wd,
                       float bc1, float bc2, float gscale, const float* __restrict__ control,
                       bf16* __restrict__ p16) {
  if (control) {
    if (control[1] == 0.f) return;  // skipped: weights and moments stay as they are
    gscale = control[0], bc1 = control[2], bc2 = control[3];
  }
  const float step = lr / bc1, shrink = 1.f - lr * wd;
  const long long misaligned = (long long)((reinterpret_cast<unsigned long long>(p) / 4) % 4);
  const long long head = misaligned == 0 ? 0 : (4 - misaligned < n ? 4 - misaligned : n);
  const long long quads = (n - head) / 4;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  // The head (at most 3 elements) and the tail (at most 3), one element per thread.
  const long long tail = head + 4 * quads;
  if (tid < head) {
    adamw_element(p[tid], g[tid], m[tid], v[tid], beta1, beta2, eps, step, shrink, bc2, gscale);
    if (p16) p16[tid] = f2bf(p[tid]);
  }
  if (tid < n - tail) {
    const long long i = tail + tid;
    adamw_element(p[i], g[i], m[i], v[i], beta1, beta2, eps, step, shrink, bc2, gscale);
    if (p16) p16[i] = f2bf(p[i]);
  }
  float4* p4 = reinterpret_cast<float4*>(p + head);
  const float4* g4 = reinterpret_cast<const float4*>(g + head);
  float4* m4 = reinterpret_cast<float4*>(m + head);
  float4* v4 = reinterpret_cast<float4*>(v + head);
  for (long long q = tid; q < quads; q += stride) {
    float4 pq = p4[q], mq = m4[q], vq = v4[q];
    const float4 gq = g4[q];
    adamw_element(pq.x, gq.x, mq.x, vq.x, beta1, beta2, eps, step, shrink, bc2, gscale);
    adamw_element(pq.y, gq.y, mq.y, vq.y, beta1, beta2, eps, step, shrink, bc2, gscale);
    adamw_element(pq.z, gq.z, mq.z, vq.z, beta1, beta2, eps, step, shrink, bc2, gscale);
    adamw_element(pq.w, gq.w, mq.w, vq.w, beta1, beta2, eps, step, shrink, bc2, gscale);
    p4[q] = pq, m4[q] = mq, v4[q] = vq;
    if (p16) store4(p16 + head + 4 * q, pq);
  }
}
