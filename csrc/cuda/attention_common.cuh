// Argument checks and small helpers shared by attention_fwd.cu and attention_bwd.cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace sparrow {
namespace attn {

// Every 16-bit row is moved as 16-byte vectors: strides must be multiples of 8 elements and bases 16-byte aligned.
inline void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected (batch, seq, heads, head_dim), got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, ": on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
                    ": the cuda attention kernels take bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, ": dtype ", t.scalar_type(), " must match q dtype ",
                    q.scalar_type());
  TORCH_CHECK_VALUE(t.size(3) == 64 || t.size(3) == 128, name, ": head_dim ", t.size(3),
                    " not supported by the cuda attention kernels (64, 128)");
  TORCH_CHECK_VALUE(t.stride(3) == 1, name, ": needs unit stride along head_dim, got ", t.strides());
  TORCH_CHECK_VALUE(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0, name,
                    ": strides must be multiples of 8 elements, got ", t.strides());
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, name, ": must be 16-byte aligned");
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  check_tensor("q", q, q);
  check_tensor("k", k, q);
  check_tensor("v", v, q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "v: shape ", v.sizes(), " must match k shape ", k.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(3) == q.size(3), "k: shape ", k.sizes(),
                    " does not match q shape ", q.sizes());
  TORCH_CHECK_VALUE(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "k: kv_heads (", k.size(2),
                    ") must divide q heads (", q.size(2), ")");
  TORCH_CHECK_VALUE(!causal || q.size(1) <= k.size(1), "q: causal attention needs q_len <= kv_len");
}

struct Strides {
  int64_t b, t, h;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace attn
}  // namespace sparrow
