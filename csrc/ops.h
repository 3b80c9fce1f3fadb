// Declarations of every native op in sparrow._C. They are registered in one place,
// csrc/torch_bindings.cpp, under the `sparrow_C` torch library namespace.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace sparrow {

// RMSNorm over the last dimension of a contiguous (rows, hidden) input.
// Returns (y, rstd) with rstd fp32 of shape (rows,), saved for the backward pass.
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
// grad_sum, when given, is added to grad_x: it is the gradient reaching the residual stream (x + residual) of
// fused_add_rms_norm, whose backward is this op applied to the saved sum.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& grad_sum);
// Returns (rms_norm(x + residual), x + residual, rstd); the norm is of the sum rounded to x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd_cpu(const at::Tensor& x,
                                                                          const at::Tensor& residual,
                                                                          const at::Tensor& weight, double eps);
// Rotate-half RoPE of q (batch, seq, heads, head_dim) and k (batch, seq, kv_heads, head_dim), unit stride along
// head_dim, by cos/sin of shape (seq, half) or (batch, seq, half); channels past 2 * half pass through.
// `backward` rotates by the negated angle (the gradient). rope_ writes into q and k.
std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward);
void rope_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool backward);
#ifdef SPARROW_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& grad_sum);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd_cuda(const at::Tensor& x,
                                                                           const at::Tensor& residual,
                                                                           const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool backward);
void rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool backward);
// Flash attention, q (batch, q_len, heads, head_dim), k/v (batch, kv_len, kv_heads, head_dim), bf16/fp16, head_dim
// 64 or 128, causal bottom-right aligned. Returns (out, lse) with lse fp32 (batch, heads, q_len), base 2, in units
// of scale * log2(e) * q.k, saved for attention_bwd, which returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale);
#endif

// Shared argument checks: every violation is a ValueError (TORCH_CHECK_VALUE) naming the argument.
void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight);
void check_fused_add_rms_norm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight);
void check_rms_norm_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum);
void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace sparrow
