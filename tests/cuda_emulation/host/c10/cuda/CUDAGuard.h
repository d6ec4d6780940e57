// The device guard csrc/'s host code takes: one emulated device, the CPU, so there is nothing to switch.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

}  // namespace c10::cuda
