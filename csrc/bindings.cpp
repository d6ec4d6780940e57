// Registers the CUDA backend's ops as torch.ops.twins_kernels_cuda.*; the kernels live in one .cu per op.
#include <Python.h>
#include <torch/library.h>

#include "outputs.h"
#include "twins_kernels.h"

// Importing twins_kernels._C loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA backend of twins_kernels", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(twins_kernels_cuda, m) {
  m.def("peg_conv3x3(Tensor x, Tensor weight, Tensor? bias, int height, int width, bool flip_weight) -> Tensor");
  m.def("peg_weight_grad(Tensor grad_out, Tensor x, int height, int width) -> Tensor");
  m.def(
      "lsa_forward(Tensor qkv, Tensor qkv_bias, int height, int width, int ws, int num_heads, float scale, "
      "bool mask_padding) -> (Tensor, Tensor)");
  m.def(
      "lsa_backward(Tensor grad_out, Tensor qkv, Tensor qkv_bias, Tensor out, Tensor lse, int height, int width, "
      "int ws, int num_heads, float scale, bool mask_padding) -> (Tensor, Tensor)");
  m.def("gsa_attention_forward(Tensor q, Tensor kv, int num_heads, float scale) -> (Tensor, Tensor)");
  m.def(
      "gsa_attention_backward(Tensor grad_out, Tensor q, Tensor kv, Tensor out, Tensor lse, int num_heads, "
      "float scale) -> (Tensor, Tensor)");
  // no tensor arguments, so one kernel for every dispatch key
  m.def("device_code_version(int device) -> int", &twins_kernels::device_code_version);
  // outputs.h: NaN-filled outputs, for tests (twins_kernels.ops.common.poisoned_outputs)
  m.def("set_poison_outputs(bool enabled) -> ()", [](bool enabled) { twins_kernels::poison_outputs() = enabled; });
}

TORCH_LIBRARY_IMPL(twins_kernels_cuda, CUDA, m) {
  m.impl("peg_conv3x3", &twins_kernels::peg_conv3x3);
  m.impl("peg_weight_grad", &twins_kernels::peg_weight_grad);
  m.impl("lsa_forward", &twins_kernels::lsa_forward);
  m.impl("lsa_backward", &twins_kernels::lsa_backward);
  m.impl("gsa_attention_forward", &twins_kernels::gsa_attention_forward);
  m.impl("gsa_attention_backward", &twins_kernels::gsa_attention_backward);
}
