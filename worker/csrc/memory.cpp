// The CUDA caching allocator's statistics: what torch.cuda.max_memory_allocated() reads (the
// HF baseline's peak_mem_gib), which tch does not expose. Through c10's device-allocator
// interface, so no CUDA header is needed to build it.
#include <c10/core/CachingDeviceAllocator.h>

namespace {
c10::DeviceAllocator* cuda_allocator() {
  auto* a = c10::GetAllocator(c10::DeviceType::CUDA);
  return a ? dynamic_cast<c10::DeviceAllocator*>(a) : nullptr;
}
}  // namespace

// out: allocated bytes now, allocated peak, reserved bytes now, reserved peak. Returns 0, or 1
// when there is no CUDA caching allocator or it fails (no GPU).
extern "C" int deberta_cuda_memory_stats(int device, long long* out) {
  try {
    auto* a = cuda_allocator();
    if (!a) return 1;
    const auto s = a->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.allocated_bytes[all].peak;
    out[2] = s.reserved_bytes[all].current;
    out[3] = s.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return 1;
  }
}

// Start the peaks again from the current values (torch.cuda.reset_peak_memory_stats).
extern "C" int deberta_cuda_reset_peak_memory(int device) {
  try {
    auto* a = cuda_allocator();
    if (!a) return 1;
    a->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 1;
  }
}
