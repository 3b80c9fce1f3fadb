// Rotary position embeddings (rotate-half) on CUDA: q and k of a token rotated by one block row in one launch.
//
// Each thread owns one (head, vector of pairs): it loads N = 16 / sizeof(T) channels of the first half and the
// matching N of the second half as 16-byte vectors, and the cos/sin of those pairs (fp32, read once per token
// and served from L1 to every head). q heads and k heads share the work index, so GQA's unequal head counts
// need no second launch. Layouts that are not 16-byte aligned fall back to one pair per thread.
// Same light-header policy as rms_norm.cu.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "ops.h"

namespace sparrow {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct Strides {
  int64_t b, t, h;
};

template <typename T, int N>
__device__ __forceinline__ void rotate_pack(const T* src, T* dst, int64_t half, int col, const float* c,
                                            const float* s, float sign) {
  using P = Pack<T, N>;
  const P a = *reinterpret_cast<const P*>(src + col);
  const P b = *reinterpret_cast<const P*>(src + half + col);
  P out1, out2;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float x1 = static_cast<float>(a.v[j]), x2 = static_cast<float>(b.v[j]);
    const float cs = c[col + j], sn = sign * s[col + j];
    out1.v[j] = static_cast<T>(x1 * cs - x2 * sn);
    out2.v[j] = static_cast<T>(x2 * cs + x1 * sn);
  }
  *reinterpret_cast<P*>(dst + col) = out1;
  *reinterpret_cast<P*>(dst + half + col) = out2;
}

// blockDim = (threads over head x pack work, tokens per block). cos/sin: float32 (cos_batch, seq, half).
template <typename T, int N>
__global__ void rope_kernel(const T* __restrict__ q, const T* __restrict__ k, T* q_out, T* k_out,
                            const float* __restrict__ cos, const float* __restrict__ sin, Strides sq, Strides sk,
                            Strides sqo, Strides sko, int64_t tokens, int64_t seq, int hq, int hk, int64_t half,
                            int64_t dim, bool per_batch_table, bool copy_rest, float sign) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= tokens) return;
  const int64_t b = token / seq, t = token % seq;
  const int64_t table_row = (per_batch_table ? b * seq : 0) + t;
  const float* c = cos + table_row * half;
  const float* s = sin + table_row * half;
  const int packs = static_cast<int>(half / N);
  const int work = (hq + hk) * packs;
  for (int i = threadIdx.x; i < work; i += blockDim.x) {
    const int head = i / packs, col = (i % packs) * N;
    if (head < hq) {
      rotate_pack<T, N>(q + b * sq.b + t * sq.t + head * sq.h, q_out + b * sqo.b + t * sqo.t + head * sqo.h, half, col,
                        c, s, sign);
    } else {
      const int kh = head - hq;
      rotate_pack<T, N>(k + b * sk.b + t * sk.t + kh * sk.h, k_out + b * sko.b + t * sko.t + kh * sko.h, half, col,
                        c, s, sign);
    }
  }
  if (copy_rest) {  // partial rotary, out of place: the tail channels pass through
    const int64_t rest = dim - 2 * half;
    for (int64_t i = threadIdx.x; i < (hq + hk) * rest; i += blockDim.x) {
      const int head = static_cast<int>(i / rest);
      const int64_t col = 2 * half + i % rest;
      if (head < hq) {
        q_out[b * sqo.b + t * sqo.t + head * sqo.h + col] = q[b * sq.b + t * sq.t + head * sq.h + col];
      } else {
        const int kh = head - hq;
        k_out[b * sko.b + t * sko.t + kh * sko.h + col] = k[b * sk.b + t * sk.t + kh * sk.h + col];
      }
    }
  }
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void launch(const at::Tensor& q, const at::Tensor& k, at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& cos,
            const at::Tensor& sin, bool backward) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), seq = q.size(1), dim = q.size(3);
  const int hq = static_cast<int>(q.size(2)), hk = static_cast<int>(k.size(2));
  const int64_t tokens = batch * seq;
  if (tokens == 0) return;
  // The tables are tokens x half floats, small beside q and k; one layout keeps the kernel simple.
  const at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  const int64_t half = c.size(-1);
  const bool per_batch = c.dim() == 3 && batch > 1;
  const bool copy_rest = 2 * half < dim && q_out.data_ptr() != q.data_ptr();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    bool vec = half % kVec == 0;
    const at::Tensor* tensors[] = {&q, &k, &q_out, &k_out};
    for (const at::Tensor* t : tensors) {
      vec = vec && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
      for (int d = 0; d < 3; ++d) vec = vec && t->stride(d) % kVec == 0;
    }
    const int n = vec ? kVec : 1;
    const int64_t work = (hq + hk) * (half / n);
    const int tx = static_cast<int>(std::min<int64_t>(256, (work + 31) / 32 * 32));
    const int ty = std::max(1, 256 / tx);
    const dim3 block(tx, ty);
    const int64_t grid = (tokens + ty - 1) / ty;
    const float sign = backward ? -1.f : 1.f;
    auto args = [&](auto kernel) {
      kernel<<<grid, block, 0, stream>>>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(),
                                         k_out.data_ptr<scalar_t>(), c.data_ptr<float>(), s.data_ptr<float>(),
                                         strides_of(q), strides_of(k), strides_of(q_out), strides_of(k_out), tokens,
                                         seq, hq, hk, half, dim, per_batch, copy_rest, sign);
    };
    if (vec) args(rope_kernel<scalar_t, kVec>); else args(rope_kernel<scalar_t, 1>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool backward) {
  check_rope_args(q, k, cos, sin);
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  launch(q, k, q_out, k_out, cos, sin, backward);
  return {q_out, k_out};
}

void rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_rope_args(q, k, cos, sin);
  launch(q, k, q, k, cos, sin, backward);
}

}  // namespace sparrow
