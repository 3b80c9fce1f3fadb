// Flash attention backward on CUDA: FA2's recomputation (P from Q, K and the forward's log-sum-exp, never
// stored), split like FA2 into a dK/dV kernel (one block per 16 keys of a kv head, looping over every query
// row of every query head of the GQA group, so dK/dV need neither atomics nor a reduction pass) and a dQ
// kernel (one block per 16 query rows), after a delta = rowsum(dO * O) pass.
//
// This is the straightforward fp32 CUDA-core version, not a tensor-core one: 8 lanes share each key (or
// query) row, each holding D/8 of its channels in registers, and the row of the other side streams through
// shared memory one position at a time. It is exact to fp32 and simple to check; it is far from FA2 speed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention_common.cuh"
#include "ops.h"

namespace sparrow {
namespace {

using attn::Strides;

constexpr int kRows = 16;         // key rows (dK/dV) or query rows (dQ) per block
constexpr int kLanesPerRow = 8;   // lanes sharing one row; consecutive, so they sit in one warp
constexpr int kThreads = kRows * kLanesPerRow;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// Also in attention_fwd.cu: each .cu compiles (and is statically checked) alone; force-inlined, so free to repeat.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int off = kLanesPerRow / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]: one warp per query row.
template <typename T, int D>
__global__ void attention_bwd_delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                           float* __restrict__ delta, Strides sdo, Strides so, int heads, int tq,
                                           int64_t rows) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int i = r % tq, h = (r / tq) % heads, b = r / (int64_t(tq) * heads);
  const T* dor = grad_out + b * sdo.b + h * sdo.h + int64_t(i) * sdo.t;
  const T* orow = out + b * so.b + h * so.h + int64_t(i) * so.t;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_float(dor[d]) * to_float(orow[d]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[r] = acc;  // (B, H, Tq) contiguous: r is exactly its flat index
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ grad_out,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
    Strides sq, Strides sk, Strides sv, Strides sdo, Strides sdk, Strides sdv, int heads, int kv_heads, int tq,
    int tk, float scale, float qk_scale, bool causal) {
  constexpr int kPer = D / kLanesPerRow;
  __shared__ float sQ[D];
  __shared__ float sDO[D];
  const int n0 = blockIdx.x * kRows;
  const int b = blockIdx.y / kv_heads, kh = blockIdx.y % kv_heads, group = heads / kv_heads;
  const int j = n0 + threadIdx.x / kLanesPerRow, sub = threadIdx.x % kLanesPerRow;
  const bool key_ok = j < tk;
  const int diag = tk - tq;

  float kr[kPer], vr[kPer], dkr[kPer], dvr[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int d = sub + c * kLanesPerRow;
    kr[c] = key_ok ? to_float(k[b * sk.b + kh * sk.h + int64_t(j) * sk.t + d]) : 0.f;
    vr[c] = key_ok ? to_float(v[b * sv.b + kh * sv.h + int64_t(j) * sv.t + d]) : 0.f;
    dkr[c] = 0.f;
    dvr[c] = 0.f;
  }
  // Query row i sees key j iff j <= i + diag: rows before n0 - diag see none of this block's keys.
  const int lo = causal ? max(0, n0 - diag) : 0;
  for (int g = 0; g < group; ++g) {
    const int h = kh * group + g;
    const T* qh = q + b * sq.b + h * sq.h;
    const T* doh = grad_out + b * sdo.b + h * sdo.h;
    const float* lse_h = lse + (int64_t(b) * heads + h) * tq;
    const float* delta_h = delta + (int64_t(b) * heads + h) * tq;
    for (int i = lo; i < tq; ++i) {
      __syncthreads();  // the previous row is no longer read
      for (int d = threadIdx.x; d < D; d += kThreads) {
        sQ[d] = to_float(qh[int64_t(i) * sq.t + d]);
        sDO[d] = to_float(doh[int64_t(i) * sdo.t + d]);
      }
      __syncthreads();
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        const int d = sub + c * kLanesPerRow;
        s += kr[c] * sQ[d];
        dp += vr[c] * sDO[d];
      }
      s = row_sum(s);
      dp = row_sum(dp);
      const bool visible = key_ok && (!causal || j <= i + diag);
      const float p = visible ? exp2f(s * qk_scale - lse_h[i]) : 0.f;
      const float ds = p * (dp - delta_h[i]);
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        const int d = sub + c * kLanesPerRow;
        dvr[c] += p * sDO[d];
        dkr[c] += ds * sQ[d];
      }
    }
  }
  if (!key_ok) return;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int d = sub + c * kLanesPerRow;
    dk[b * sdk.b + kh * sdk.h + int64_t(j) * sdk.t + d] = from_float<T>(dkr[c] * scale);
    dv[b * sdv.b + kh * sdv.h + int64_t(j) * sdv.t + d] = from_float<T>(dvr[c]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ grad_out,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, Strides sq, Strides sk,
    Strides sv, Strides sdo, Strides sdq, int heads, int kv_heads, int tq, int tk, float scale, float qk_scale,
    bool causal) {
  constexpr int kPer = D / kLanesPerRow;
  __shared__ float sK[D];
  __shared__ float sV[D];
  const int m0 = blockIdx.x * kRows;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads, kh = h / (heads / kv_heads);
  const int i = m0 + threadIdx.x / kLanesPerRow, sub = threadIdx.x % kLanesPerRow;
  const bool row_ok = i < tq;
  const int diag = tk - tq;
  float qr[kPer], dor[kPer], dqr[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int d = sub + c * kLanesPerRow;
    qr[c] = row_ok ? to_float(q[b * sq.b + h * sq.h + int64_t(i) * sq.t + d]) : 0.f;
    dor[c] = row_ok ? to_float(grad_out[b * sdo.b + h * sdo.h + int64_t(i) * sdo.t + d]) : 0.f;
    dqr[c] = 0.f;
  }
  const float lse_i = row_ok ? lse[(int64_t(b) * heads + h) * tq + i] : 0.f;
  const float delta_i = row_ok ? delta[(int64_t(b) * heads + h) * tq + i] : 0.f;
  const T* kh_ptr = k + b * sk.b + kh * sk.h;
  const T* vh_ptr = v + b * sv.b + kh * sv.h;
  const int hi = causal ? min(tk, m0 + kRows + diag) : tk;
  // The dK/dV kernel's step with roles swapped: kept apart so each holds its own row in registers, the other in smem.
  for (int j = 0; j < hi; ++j) {
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += kThreads) {
      sK[d] = to_float(kh_ptr[int64_t(j) * sk.t + d]);
      sV[d] = to_float(vh_ptr[int64_t(j) * sv.t + d]);
    }
    __syncthreads();
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int d = sub + c * kLanesPerRow;
      s += qr[c] * sK[d];
      dp += dor[c] * sV[d];
    }
    s = row_sum(s);
    dp = row_sum(dp);
    const bool visible = row_ok && (!causal || j <= i + diag);
    const float p = visible ? exp2f(s * qk_scale - lse_i) : 0.f;
    const float ds = p * (dp - delta_i);
#pragma unroll
    for (int c = 0; c < kPer; ++c) dqr[c] += ds * sK[sub + c * kLanesPerRow];
  }
  if (!row_ok) return;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    dq[b * sdq.b + h * sdq.h + int64_t(i) * sdq.t + sub + c * kLanesPerRow] = from_float<T>(dqr[c] * scale);
  }
}

template <typename T, int D>
void launch_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                bool causal, float scale, cudaStream_t stream) {
  const int batch = q.size(0), tq = q.size(1), heads = q.size(2), tk = k.size(1), kv_heads = k.size(2);
  auto delta = at::empty(lse.sizes(), lse.options());
  const int64_t rows = int64_t(batch) * heads * tq;
  constexpr int kDeltaWarps = 8;
  attention_bwd_delta_kernel<T, D><<<(rows + kDeltaWarps - 1) / kDeltaWarps, kDeltaWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(grad_out.data_ptr()), reinterpret_cast<const T*>(out.data_ptr()),
      delta.data_ptr<float>(), attn::strides_of(grad_out), attn::strides_of(out), heads, tq, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float qk_scale = scale * attn::kLog2e;
  attention_bwd_dkdv_kernel<T, D><<<dim3((tk + kRows - 1) / kRows, batch * kv_heads), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(grad_out.data_ptr()),
      lse.data_ptr<float>(), delta.data_ptr<float>(), reinterpret_cast<T*>(dk.data_ptr()),
      reinterpret_cast<T*>(dv.data_ptr()), attn::strides_of(q), attn::strides_of(k), attn::strides_of(v),
      attn::strides_of(grad_out), attn::strides_of(dk), attn::strides_of(dv), heads, kv_heads, tq, tk, scale,
      qk_scale, causal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attention_bwd_dq_kernel<T, D><<<dim3((tq + kRows - 1) / kRows, batch * heads), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(grad_out.data_ptr()),
      lse.data_ptr<float>(), delta.data_ptr<float>(), reinterpret_cast<T*>(dq.data_ptr()), attn::strides_of(q),
      attn::strides_of(k), attn::strides_of(v), attn::strides_of(grad_out), attn::strides_of(dq), heads, kv_heads,
      tq, tk, scale, qk_scale, causal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale) {
  attn::check_qkv(q, k, v, causal);
  attn::check_tensor("grad_out", grad_out, q);
  attn::check_tensor("out", out, q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out, out: shapes ",
                    grad_out.sizes(), ", ", out.sizes(), " must match q shape ", q.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                        lse.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1)}),
                    "lse: expected a contiguous float32 (batch, heads, q_len) tensor from attention_fwd");
  c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const float s = float(scale);
  if (q.size(3) == 64) {
    bf16 ? launch_bwd<__nv_bfloat16, 64>(grad_out, q, k, v, out, lse, dq, dk, dv, causal, s, stream)
         : launch_bwd<__half, 64>(grad_out, q, k, v, out, lse, dq, dk, dv, causal, s, stream);
  } else {
    bf16 ? launch_bwd<__nv_bfloat16, 128>(grad_out, q, k, v, out, lse, dq, dk, dv, causal, s, stream)
         : launch_bwd<__half, 128>(grad_out, q, k, v, out, lse, dq, dk, dv, causal, s, stream);
  }
  return {dq, dk, dv};
}

}  // namespace sparrow
