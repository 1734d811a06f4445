// tch's `autocast` only switches autocasting on; libtorch's CUDA autocast dtype defaults to
// fp16. The trainer's bf16 mode needs the dtype set once, which tch does not expose.
#include <ATen/autocast_mode.h>

extern "C" void deberta_set_cuda_autocast_bf16() {
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
}

extern "C" int deberta_cuda_autocast_dtype_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 1 : 0;
}
