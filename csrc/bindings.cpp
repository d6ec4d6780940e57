// Registers the CUDA backend's ops as torch.ops.twins_kernels_cuda.*; the kernels live in one .cu per op.
#include <Python.h>
#include <torch/library.h>

#include "twins_kernels.h"

// Importing twins_kernels._C loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA backend of twins_kernels", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(twins_kernels_cuda, m) {
  m.def("peg_conv3x3(Tensor x, Tensor weight, Tensor? bias, int height, int width, bool flip_weight) -> Tensor");
  m.def("peg_weight_grad(Tensor grad_out, Tensor x, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(twins_kernels_cuda, CUDA, m) {
  m.impl("peg_conv3x3", &twins_kernels::peg_conv3x3);
  m.impl("peg_weight_grad", &twins_kernels::peg_weight_grad);
}
