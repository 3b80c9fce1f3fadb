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
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparrow_C, CPU, m) {
  m.impl("rms_norm_fwd", &sparrow::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &sparrow::rms_norm_bwd_cpu);
}

#ifdef SPARROW_WITH_CUDA
TORCH_LIBRARY_IMPL(sparrow_C, CUDA, m) {
  m.impl("rms_norm_fwd", &sparrow::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &sparrow::rms_norm_bwd_cuda);
}
#endif
