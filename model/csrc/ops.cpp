// libtorch ops that tch 0.24 does not wrap, for the hand-written backwards of the segment tape.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>

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

// Whether autocast is on in this thread for CUDA (cuda != 0) or the CPU. tch's
// `at_autocast_is_enabled` calls the deprecated `at::autocast::is_enabled()`, which warns at
// every call, and reads CUDA's only.
extern "C" bool deberta_autocast_enabled(int cuda) {
  return at::autocast::is_autocast_enabled(cuda ? at::kCUDA : at::kCPU);
}

// Autocast on or off for CUDA (cuda != 0) or the CPU, one nesting level in; returns the previous
// switch. The CPU's in bf16, for the tests where the CPU stands in for CUDA (`nn::autocast`);
// CUDA's dtype is the trainer's (`precision.rs`). tch's `autocast` does the same through the
// deprecated `at::autocast::is_enabled()`/`set_enabled()`, each of which warns at every call:
// thousands of lines a step on the GPU. Leaving the outermost level clears autocast's cache of
// cast weights: a cached cast would outlive the optimizer step that changes its weight.
extern "C" bool deberta_autocast_enter(int cuda, bool on) {
  const auto device = cuda ? at::kCUDA : at::kCPU;
  const bool prev = at::autocast::is_autocast_enabled(device);
  if (!cuda) at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  at::autocast::set_autocast_enabled(device, on);
  at::autocast::increment_nesting();
  return prev;
}

extern "C" void deberta_autocast_leave(int cuda, bool prev) {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(cuda ? at::kCUDA : at::kCPU, prev);
}

// Counting the warnings libtorch raises on this thread (tests): a handler that counts them
// and passes each on to the one it replaced.
namespace {
struct CountingHandler : c10::WarningHandler {
  c10::WarningHandler* next = nullptr;
  uint64_t count = 0;
  void process(const c10::Warning& warning) override {
    ++count;
    if (next) next->process(warning);
  }
};
thread_local CountingHandler counting_handler;
}  // namespace

extern "C" void deberta_warnings_count_start() {
  counting_handler.count = 0;
  counting_handler.next = c10::WarningUtils::get_warning_handler();
  c10::WarningUtils::set_warning_handler(&counting_handler);
}

extern "C" uint64_t deberta_warnings_count_stop() {
  c10::WarningUtils::set_warning_handler(counting_handler.next);
  return counting_handler.count;
}

// Counting the ATen operators a step dispatches (`profile`): each is host work and, on CUDA,
// usually a kernel launch, which is what the small tensors of a step cost. A global
// RecordFunction callback (the profiler's hook) counts, on every thread (autograd's device
// threads too), all operators and those called from outside any other (`top`: what the program
// itself asked for; the rest are their inner calls). Registered on first use and then kept
// (removing one is not safe while other threads dispatch), disabled while counting is off, so
// the operators then skip it. Switch it between steps: a thread inside an operator at the
// switch would miss an end and count its next operators as inner calls.
namespace {
std::atomic<bool> counting{false};
std::atomic<uint64_t> top_ops{0}, all_ops{0}, cast_ops{0};
thread_local int depth = 0;
thread_local uint64_t thread_top = 0, thread_all = 0, thread_casts = 0;
thread_local bool top_is_to = false;  // the running top-level operator is `aten::to`
// The top-level operators by name, while `naming` (a profile that asks which operators): the
// lock is only taken then.
std::atomic<bool> naming{false};
std::mutex names_mutex;
std::map<std::string, uint64_t> top_names;

std::unique_ptr<at::ObserverContext> op_start(const at::RecordFunction& fn) {
  if (counting.load(std::memory_order_relaxed)) {
    all_ops.fetch_add(1, std::memory_order_relaxed);
    ++thread_all;
    // A conversion the program asked for that copies: a top-level `to` of another kind calls
    // `_to_copy` (one of its own kind does not). Not those inside other operators: on the CPU
    // an elementwise operator or a sum over mixed kinds converts its inputs by such a copy,
    // where CUDA converts inside the kernel, and the counts are to be the same on both.
    const bool to_copy = std::strcmp(fn.name(), "aten::_to_copy") == 0;
    if (depth == 0) top_is_to = std::strcmp(fn.name(), "aten::to") == 0;
    if (to_copy && (depth == 0 || (depth == 1 && top_is_to))) {
      cast_ops.fetch_add(1, std::memory_order_relaxed);
      ++thread_casts;
    }
    if (depth == 0) {
      top_ops.fetch_add(1, std::memory_order_relaxed);
      ++thread_top;
      if (naming.load(std::memory_order_relaxed)) {
        std::lock_guard<std::mutex> lock(names_mutex);
        ++top_names[fn.name()];
      }
    }
  }
  ++depth;
  return nullptr;
}

void op_end(const at::RecordFunction&, at::ObserverContext*) { --depth; }
}  // namespace

// Switch counting on or off (registering the callback the first time).
extern "C" void deberta_count_ops(bool on) {
  static const at::CallbackHandle handle = at::addGlobalCallback(
      at::RecordFunctionCallback(op_start, op_end).needsInputs(false).scopes({at::RecordScope::FUNCTION}));
  counting.store(on);
  if (on) {
    at::reenableCallback(handle);
  } else {
    at::disableCallback(handle);
  }
}

// The counts so far, of every thread (global) or of this one: operators called from outside any
// other, all, and the casts the program asked for (see op_start).
extern "C" void deberta_op_counts(bool global, uint64_t* top, uint64_t* all, uint64_t* casts) {
  *top = global ? top_ops.load() : thread_top;
  *all = global ? all_ops.load() : thread_all;
  *casts = global ? cast_ops.load() : thread_casts;
}

// Name the top-level operators counted from now on (on), or stop naming.
extern "C" void deberta_name_ops(bool on) { naming.store(on); }

// The top-level operators named since the last call, as "name\tcount\n" lines in a malloc'd
// string the caller frees (`deberta_free`); the tally starts again.
extern "C" char* deberta_take_op_names() {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(names_mutex);
    for (const auto& [name, n] : top_names) out += name + "\t" + std::to_string(n) + "\n";
    top_names.clear();
  }
  char* buf = static_cast<char*>(std::malloc(out.size() + 1));
  std::memcpy(buf, out.c_str(), out.size() + 1);
  return buf;
}

extern "C" void deberta_free(char* p) { std::free(p); }

// A trace of what runs, by libtorch's own profiler (Kineto: the operators on the host and, with
// `cuda`, every kernel on the GPU with its launch, ours through the driver API included), saved
// as a Chrome trace by `deberta_trace_stop`. `deberta_trace_mark` records a zero-length range
// named `name` on the host timeline: the bench marks where each segment of the step ends, and a
// kernel is charged to the first mark after its launch. Returns 0, or 1 with the message in err.
extern "C" int deberta_trace_start(bool cuda, char* err, size_t errlen) {
  try {
    using torch::profiler::impl::ActivityType;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) activities.insert(ActivityType::CUDA);
    const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    report(e, err, errlen);
    return 1;
  }
}

extern "C" void deberta_trace_mark(const char* name) {
  at::RecordFunction fn(at::RecordScope::USER_SCOPE);
  if (fn.isActive()) fn.before(name);
}

extern "C" int deberta_trace_stop(const char* path, char* err, size_t errlen) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler was not running");
    result->save(path);
    return 0;
  } catch (const std::exception& e) {
    report(e, err, errlen);
    return 1;
  }
}
