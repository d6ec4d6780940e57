// Outputs of the CUDA ops, allocated here so that tests can poison them: under
// twins_kernels.ops.common.poisoned_outputs() (which sets the flag through the set_poison_outputs op)
// every output and partial buffer a kernel writes starts as NaN, so an element it never writes fails
// parity instead of passing with whatever the caching allocator left there (another run's result of
// the same shape, say).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>

namespace twins_kernels {

inline bool& poison_outputs() {
  static bool enabled = false;
  return enabled;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto out = at::empty(sizes, options);
  if (poison_outputs() && out.is_floating_point()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace twins_kernels
