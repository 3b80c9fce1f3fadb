// Reference-quality CPU kernels for RoPE, so the native path (registration, fakes, autograd, opcheck) is
// exercised on machines without a GPU. Also holds the argument checks shared with csrc/cuda/rope.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops.h"

namespace sparrow {

void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected (batch, seq, heads, head_dim), got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "k: expected (batch, seq, kv_heads, head_dim) matching q ", q.sizes(), ", got ", k.sizes());
  auto dtype = q.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "q: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(k.scalar_type() == dtype, "k: dtype ", k.scalar_type(), " does not match q dtype ", dtype);
  TORCH_CHECK_VALUE(q.stride(3) == 1 || q.size(3) == 1, "q: expected unit stride along head_dim");
  TORCH_CHECK_VALUE(k.stride(3) == 1 || k.size(3) == 1, "k: expected unit stride along head_dim");
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes(), "sin: shape ", sin.sizes(), " does not match cos shape ", cos.sizes());
  TORCH_CHECK_VALUE(cos.is_floating_point() && sin.is_floating_point(), "cos: expected floating-point cos and sin");
  const bool per_batch = cos.dim() == 3 && cos.size(0) == q.size(0) && cos.size(1) == q.size(1);
  const bool shared = cos.dim() == 2 && cos.size(0) == q.size(1);
  TORCH_CHECK_VALUE(per_batch || shared, "cos: expected (seq, half) or (batch, seq, half) for q ", q.sizes(),
                    ", got ", cos.sizes());
  TORCH_CHECK_VALUE(cos.size(-1) >= 1 && 2 * cos.size(-1) <= q.size(3), "cos: last dim must be in [1, head_dim / 2]");
  for (const at::Tensor* t : {&k, &cos, &sin}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), (t == &k ? "k" : t == &cos ? "cos" : "sin"), ": on ", t->device(),
                      " but q is on ", q.device());
  }
}

namespace {

// cos/sin as contiguous float32 (batch or 1, seq, half): the kernels index them with one layout.
at::Tensor table(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat).contiguous();
  return f.dim() == 2 ? f.unsqueeze(0) : f;
}

template <typename scalar_t>
void rotate(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), dim = x.size(3), half = cos.size(2);
  const bool per_batch = cos.size(0) > 1;  // else one table shared by the batch
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float sign = backward ? -1.f : 1.f;
  const bool same = xp == op;
  at::parallel_for(0, batch * seq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / seq, t = token % seq;
      const float* c = cp + ((per_batch ? b : 0) * seq + t) * half;
      const float* s = sp + ((per_batch ? b : 0) * seq + t) * half;
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t* xr = xp + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
        scalar_t* orow = op + b * out.stride(0) + t * out.stride(1) + h * out.stride(2);
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(xr[i]), x2 = static_cast<float>(xr[i + half]);
          const float sn = sign * s[i];
          orow[i] = static_cast<scalar_t>(x1 * c[i] - x2 * sn);
          orow[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * sn);
        }
        if (!same) {
          for (int64_t i = 2 * half; i < dim; ++i) orow[i] = xr[i];
        }
      }
    }
  });
}

void rope_into(const at::Tensor& q, const at::Tensor& k, at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& cos,
               const at::Tensor& sin, bool backward) {
  const at::Tensor c = table(cos), s = table(sin);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cpu", [&] {
    rotate<scalar_t>(q, q_out, c, s, backward);
    rotate<scalar_t>(k, k_out, c, s, backward);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward) {
  check_rope_args(q, k, cos, sin);
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  rope_into(q, k, q_out, k_out, cos, sin, backward);
  return {q_out, k_out};
}

void rope_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_rope_args(q, k, cos, sin);
  rope_into(q, k, q, k, cos, sin, backward);
}

}  // namespace sparrow
