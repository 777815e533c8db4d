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

// 1 if bfloat16 autocast is on for the device type (this thread).
int rlhf_autocast_enabled(int cuda) {
  try {
    return at::autocast::is_autocast_enabled(device_type(cuda)) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// While on, autocast keeps the bfloat16 copy it makes of each trainable
// fp32 weight (sampling: the weights do not change between decode steps, and
// casting all of them for every token costs more than the token's matmuls).
// Off drops the copies, so that no later step reads a stale one.
void rlhf_autocast_weight_cache(int on) {
  try {
    at::autocast::set_autocast_cache_enabled(on != 0);
    if (!on) {
      at::autocast::clear_cache();
    }
  } catch (...) {
  }
}

}  // extern "C"
