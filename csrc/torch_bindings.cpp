// The single place where every native op of sparrow._C is declared and bound to its kernels.
// Python adds fake (meta) implementations and autograd in sparrow/ops/cuda_backend.py.
#include <Python.h>

#include "ops.h"

// Importing sparrow._C as a Python module runs the static TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Sparrow's native CUDA/C++ kernels (torch.ops.sparrow_C).", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(sparrow_C, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, Tensor? grad_sum=None) -> (Tensor, Tensor)");
  m.def("fused_add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward=False) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool backward=False) -> ()");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparrow_C, CPU, m) {
  m.impl("rms_norm_fwd", &sparrow::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &sparrow::rms_norm_bwd_cpu);
  m.impl("fused_add_rms_norm_fwd", &sparrow::fused_add_rms_norm_fwd_cpu);
  m.impl("rope", &sparrow::rope_cpu);
  m.impl("rope_", &sparrow::rope_inplace_cpu);
}

#ifdef SPARROW_WITH_CUDA
TORCH_LIBRARY_IMPL(sparrow_C, CUDA, m) {
  m.impl("rms_norm_fwd", &sparrow::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &sparrow::rms_norm_bwd_cuda);
  m.impl("fused_add_rms_norm_fwd", &sparrow::fused_add_rms_norm_fwd_cuda);
  m.impl("rope", &sparrow::rope_cuda);
  m.impl("rope_", &sparrow::rope_inplace_cuda);
  m.impl("attention_fwd", &sparrow::attention_fwd_cuda);
  m.impl("attention_bwd", &sparrow::attention_bwd_cuda);
}
#endif
