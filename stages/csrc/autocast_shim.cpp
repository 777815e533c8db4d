// Autocast for CPU and CUDA: matmuls and attention in bfloat16 on fp32
// weights (PyTorch's torch.autocast). tch exposes only the CUDA switch.
//
// The weight cast cache stays off: a stage runs in one autocast region
// while its optimiser updates the weights in place, and a cached bfloat16
// copy would go stale.

#include <ATen/autocast_mode.h>

namespace {
c10::DeviceType device_type(int cuda) { return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }
}  // namespace

extern "C" {

// Turns bfloat16 autocast on for the device type; returns 1 if it was on.
int rlhf_autocast_enter(int cuda) {
  try {
    auto d = device_type(cuda);
    int was = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    at::autocast::set_autocast_cache_enabled(false);
    at::autocast::set_autocast_dtype(d, at::kBFloat16);
    at::autocast::set_autocast_enabled(d, true);
    at::autocast::increment_nesting();
    return was;
  } catch (...) {
    return -1;
  }
}

// Restores the state `rlhf_autocast_enter` returned.
void rlhf_autocast_exit(int cuda, int was) {
  try {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device_type(cuda), was == 1);
  } catch (...) {
  }
}

}  // extern "C"
