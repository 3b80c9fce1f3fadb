// Declarations of every native op in sparrow._C. They are registered in one place,
// csrc/torch_bindings.cpp, under the `sparrow_C` torch library namespace.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include <tuple>

namespace sparrow {

// RMSNorm over the last dimension of a contiguous (rows, hidden) input.
// Returns (y, rstd) with rstd fp32 of shape (rows,), saved for the backward pass.
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd);
#ifdef SPARROW_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd);
#endif

// Shared argument checks: every violation is a ValueError (TORCH_CHECK_VALUE) naming the argument.
void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight);
void check_rms_norm_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd);

}  // namespace sparrow
