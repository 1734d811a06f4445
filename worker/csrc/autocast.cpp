// tch's `autocast` only switches autocasting on; libtorch's CUDA autocast dtype defaults to
// fp16. The trainer's bf16 mode needs the dtype set once, which tch does not expose.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

extern "C" void deberta_set_cuda_autocast_bf16() {
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
}

extern "C" int deberta_cuda_autocast_dtype_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 1 : 0;
}

// The fp32 matmuls a bf16 run still has (outside autocast: the relative tables' projections) on
// TF32 tensor cores: torch.set_float32_matmul_precision("high").
extern "C" void deberta_set_tf32_matmul(int on) {
  at::globalContext().setFloat32MatmulPrecision(on ? "high" : "highest");
}

extern "C" int deberta_tf32_matmul_is_on() {
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST ? 1 : 0;
}
