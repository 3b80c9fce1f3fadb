// Reference-quality CPU kernels for RMSNorm. They exist so that the whole native path (build,
// TORCH_LIBRARY registration, fake tensors, autograd, opcheck) is exercised on machines without a GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"

namespace sparrow {

void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D (rows, hidden) tensor, got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(x.is_contiguous(), "x: expected a contiguous tensor");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1), "weight: expected shape (", x.size(1),
                    ",), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight: expected a contiguous tensor");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight: dtype ", weight.scalar_type(),
                    " does not match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight: on ", weight.device(), " but x is on ", x.device());
  auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "x: dtype must be float32, bfloat16 or float16, got ", dtype);
}

void check_fused_add_rms_norm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight) {
  check_rms_norm_args(x, weight);
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
                    "residual: expected the shape and dtype of x");
  TORCH_CHECK_VALUE(residual.is_contiguous(), "residual: expected a contiguous tensor");
  TORCH_CHECK_VALUE(residual.device() == x.device(), "residual: on ", residual.device(), " but x is on ", x.device());
}

void check_rms_norm_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum) {
  check_rms_norm_args(x, weight);
  if (grad_sum.has_value() && grad_sum->defined()) {
    TORCH_CHECK_VALUE(grad_sum->sizes() == x.sizes() && grad_sum->scalar_type() == x.scalar_type(),
                      "grad_sum: expected the shape and dtype of x");
    TORCH_CHECK_VALUE(grad_sum->is_contiguous(), "grad_sum: expected a contiguous tensor");
    TORCH_CHECK_VALUE(grad_sum->device() == x.device(), "grad_sum: on ", grad_sum->device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
                    "grad_y: expected the shape and dtype of x");
  TORCH_CHECK_VALUE(grad_y.is_contiguous(), "grad_y: expected a contiguous tensor");
  TORCH_CHECK_VALUE(rstd.dim() == 1 && rstd.size(0) == x.size(0) && rstd.scalar_type() == at::kFloat,
                    "rstd: expected float32 of shape (", x.size(0), ",)");
}

namespace {

template <typename scalar_t>
void rms_norm_fwd_impl(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y, at::Tensor& rstd) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * hidden;
      float sum_sq = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        float v = static_cast<float>(xr[i]);
        sum_sq += v * v;
      }
      float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + static_cast<float>(eps));
      rp[r] = inv;
      for (int64_t i = 0; i < hidden; ++i) {
        yp[r * hidden + i] = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv * static_cast<float>(wp[i]));
      }
    }
  });
}

template <typename scalar_t>
void add_impl(const at::Tensor& x, const at::Tensor& residual, at::Tensor& summed) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual.data_ptr<scalar_t>();
  scalar_t* sp = summed.data_ptr<scalar_t>();
  at::parallel_for(0, x.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sp[i] = static_cast<scalar_t>(static_cast<float>(xp[i]) + static_cast<float>(rp[i]));
  });
}

template <typename scalar_t>
void rms_norm_bwd_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& rstd, const scalar_t* dsp, at::Tensor& grad_x, at::Tensor& grad_w_f32) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  const scalar_t* gp = grad_y.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const float* rp = rstd.data_ptr<float>();
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  // Each chunk of rows accumulates its own dW partial; partials are summed afterwards, so the result does not
  // depend on scheduling beyond float summation order within a chunk.
  const int64_t chunk = 64;
  const int64_t num_chunks = (rows + chunk - 1) / chunk;
  at::Tensor partial = at::zeros({std::max<int64_t>(num_chunks, 1), hidden}, x.options().dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t c = cbegin; c < cend; ++c) {
      float* part = pp + c * hidden;
      for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
        const float inv = rp[r];
        float dot = 0.f;  // sum_i dy_i * w_i * x_i
        for (int64_t i = 0; i < hidden; ++i) {
          dot += static_cast<float>(gp[r * hidden + i]) * static_cast<float>(wp[i]) * static_cast<float>(xp[r * hidden + i]);
        }
        const float coef = dot * inv * inv * inv / static_cast<float>(hidden);
        for (int64_t i = 0; i < hidden; ++i) {
          const float xv = static_cast<float>(xp[r * hidden + i]);
          const float gv = static_cast<float>(gp[r * hidden + i]);
          const float extra = dsp ? static_cast<float>(dsp[r * hidden + i]) : 0.f;
          gxp[r * hidden + i] = static_cast<scalar_t>(gv * static_cast<float>(wp[i]) * inv - coef * xv + extra);
          part[i] += gv * xv * inv;
        }
      }
    }
  });
  grad_w_f32.copy_(partial.sum(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cpu",
                                  [&] { rms_norm_fwd_impl<scalar_t>(x, weight, eps, y, rstd); });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd_cpu(const at::Tensor& x,
                                                                          const at::Tensor& residual,
                                                                          const at::Tensor& weight, double eps) {
  check_fused_add_rms_norm_args(x, residual, weight);
  at::Tensor summed = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm_fwd_cpu",
                                  [&] { add_impl<scalar_t>(x, residual, summed); });
  auto [y, rstd] = rms_norm_fwd_cpu(summed, weight, eps);
  return {y, summed, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& grad_sum) {
  check_rms_norm_bwd_args(grad_y, x, weight, rstd, grad_sum);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  const bool has_ds = grad_sum.has_value() && grad_sum->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    const scalar_t* dsp = has_ds ? grad_sum->data_ptr<scalar_t>() : nullptr;
    rms_norm_bwd_impl<scalar_t>(grad_y, x, weight, rstd, dsp, grad_x, grad_w);
  });
  return {grad_x, grad_w.to(weight.scalar_type())};
}

}  // namespace sparrow
