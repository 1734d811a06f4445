// libtorch ops that tch 0.24 does not wrap, for the hand-written backwards of the segment tape.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cstring>
#include <exception>

namespace {
void report(const std::exception& e, char* err, size_t len) {
  if (len == 0) return;
  std::strncpy(err, e.what(), len - 1);
  err[len - 1] = 0;
}
}  // namespace

// LayerNorm's backward over the last dimension from x̂ (the normalised input) and 1/σ instead of
// the input: libtorch's fused kernel, given x̂ as the input with mean 0 and 1/σ 1, returns
// dγ and dβ as they are and dx without its factor 1/σ, which is applied here.
// dy, xhat: [..., D]; rstd: [..., 1]; weight: [D]. Out: new tensors dx, dweight, dbias.
// Returns 0, or 1 with the message in err.
extern "C" int deberta_layer_norm_backward(const at::Tensor* dy, const at::Tensor* xhat, const at::Tensor* rstd,
                                           const at::Tensor* weight, at::Tensor** dx, at::Tensor** dweight,
                                           at::Tensor** dbias, char* err, size_t errlen) {
  try {
    const int64_t d = weight->size(0);
    auto grads = at::native_layer_norm_backward(*dy, *xhat, {d}, at::zeros_like(*rstd), at::ones_like(*rstd),
                                                *weight, at::zeros_like(*weight), {true, true, true});
    *dx = new at::Tensor(std::get<0>(grads).mul_(*rstd));
    *dweight = new at::Tensor(std::get<1>(grads));
    *dbias = new at::Tensor(std::get<2>(grads));
    return 0;
  } catch (const std::exception& e) {
    report(e, err, errlen);
    return 1;
  }
}

// Whether CUDA autocast is on in this thread. tch's `at_autocast_is_enabled` calls the
// deprecated `at::autocast::is_enabled()`, which warns at every call.
extern "C" bool deberta_cuda_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCUDA); }
