// Flash attention forward on tensor cores (WMMA 16x16x16, bf16/fp16 in, fp32 accumulate), FA2 scheme.
//
// One block of 4 warps per (64 query rows, batch x head); each warp owns 16 query rows for the whole kernel,
// so the online softmax needs no cross-warp reduction. Per 64-key tile: the block stages K and V in shared
// memory, each warp computes its 16x64 score tile S = Q K^T with WMMA, turns it into P with the online
// softmax (two lanes per row, base-2 exponentials with log2(e) folded into the scale), rescales its O rows
// and accumulates O += P V with WMMA. WMMA fragments have no documented element-to-row mapping, so S and O
// round-trip through shared memory for the per-row softmax work; that is the price of WMMA over raw
// mma.sync, and the reason this kernel is simpler than, not as fast as, FA2.
//
// Causal masks are bottom-right aligned (query i of Tq sees key j of Tk iff j <= i + Tk - Tq); key tiles
// entirely above the diagonal are skipped. Saves the base-2 log-sum-exp (scaled units) for the backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "attention_common.cuh"
#include "ops.h"

namespace sparrow {
namespace {

using namespace nvcuda;
using attn::Strides;

constexpr int kBM = 64;  // query rows per block
constexpr int kBN = 64;  // keys per tile
constexpr int kWarps = kBM / 16;
constexpr int kThreads = kWarps * 32;

template <int D>
struct FwdSmem {
  // Row pads keep WMMA's ldm a multiple of 8 (16-bit) / 4 (fp32) elements while shifting banks between rows.
  static constexpr int kLdT = D + 8;     // Q, K, V rows (16-bit)
  static constexpr int kLdP = kBN + 8;   // P rows (16-bit)
  static constexpr int kLdS = kBN + 4;   // S rows (fp32)
  static constexpr int kLdO = D + 4;     // O rows (fp32)
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + size_t(kBM) * kLdT * 2;
  static constexpr size_t kV = kK + size_t(kBN) * kLdT * 2;
  static constexpr size_t kP = kV + size_t(kBN) * kLdT * 2;
  static constexpr size_t kS = kP + size_t(kBM) * kLdP * 2;
  static constexpr size_t kO = kS + size_t(kBM) * kLdS * 4;
  static constexpr size_t kM = kO + size_t(kBM) * kLdO * 4;
  static constexpr size_t kL = kM + kBM * 4;
  static constexpr size_t kBytes = kL + kBM * 4;
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Copies `rows` rows of D 16-bit elements (row stride `stride` elements) into shared memory with row pitch
// `ld`, zero-filling rows >= valid, in 16-byte vectors.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t stride,
                                          int rows, int valid) {
  constexpr int kVecs = D / 8;
  for (int i = threadIdx.x; i < rows * kVecs; i += kThreads) {
    const int r = i / kVecs, c = (i % kVecs) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
    float* __restrict__ lse, Strides sq, Strides sk, Strides sv, Strides so, int heads, int group, int tq, int tk,
    float qk_scale, bool causal) {
  using S = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + S::kQ);
  T* sK = reinterpret_cast<T*>(smem + S::kK);
  T* sV = reinterpret_cast<T*>(smem + S::kV);
  T* sP = reinterpret_cast<T*>(smem + S::kP);
  float* sS = reinterpret_cast<float*>(smem + S::kS);
  float* sO = reinterpret_cast<float*>(smem + S::kO);
  float* sM = reinterpret_cast<float*>(smem + S::kM);
  float* sL = reinterpret_cast<float*>(smem + S::kL);

  const int m0 = blockIdx.x * kBM;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads, kh = h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int diag = tk - tq;
  const T* qb = q + b * sq.b + h * sq.h + int64_t(m0) * sq.t;
  const T* kb = k + b * sk.b + kh * sk.h;
  const T* vb = v + b * sv.b + kh * sv.h;

  load_tile<T, D>(sQ, S::kLdT, qb, sq.t, kBM, tq - m0);
  for (int i = threadIdx.x; i < kBM * S::kLdO; i += kThreads) sO[i] = 0.f;
  if (threadIdx.x < kBM) {
    sM[threadIdx.x] = -INFINITY;
    sL[threadIdx.x] = 0.f;
  }

  const int hi = causal ? min(tk, m0 + kBM + diag) : tk;
  const int r0 = warp * 16;
  // Two lanes per row, each owning half of the row's 64 scores and half of its D outputs.
  const int row = r0 + lane / 2, half = lane % 2;
  const int limit = causal ? min(m0 + row + diag, tk - 1) : tk - 1;

  for (int n0 = 0; n0 < hi; n0 += kBN) {
    __syncthreads();  // the previous tile's K/V are no longer read
    load_tile<T, D>(sK, S::kLdT, kb + int64_t(n0) * sk.t, sk.t, kBN, tk - n0);
    load_tile<T, D>(sV, S::kLdT, vb + int64_t(n0) * sv.t, sv.t, kBN, tk - n0);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
#pragma unroll
    for (int nt = 0; nt < kBN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, sQ + r0 * S::kLdT + kk * 16, S::kLdT);
        wmma::load_matrix_sync(bf, sK + nt * 16 * S::kLdT + kk * 16, S::kLdT);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(sS + r0 * S::kLdS + nt * 16, acc, S::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on this lane's half row.
    float* srow = sS + row * S::kLdS + half * (kBN / 2);
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < kBN / 2; ++c) {
      const int col = n0 + half * (kBN / 2) + c;
      const float s = col <= limit ? srow[c] * qk_scale : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = sM[row];
    const float m_new = fmaxf(m_old, mx);
    // A row that has seen no key keeps -inf; subtracting 0 avoids inf - inf.
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_old - m_safe);
    float sum = 0.f;
    T* prow = sP + row * S::kLdP + half * (kBN / 2);
#pragma unroll 8
    for (int c = 0; c < kBN / 2; ++c) {
      const float p = exp2f(srow[c] - m_safe);
      const T pt = from_float<T>(p);
      prow[c] = pt;
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    float* orow = sO + row * S::kLdO + half * (D / 2);
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();  // both lanes of the pair have read sM[row]
    if (half == 0) {
      sM[row] = m_new;
      sL[row] = sL[row] * alpha + sum;
    }
    __syncwarp();

    // Same WMMA tile loop as S = Q K^T, other operands/layout: written out so each fragment type stays a constant.
    // O += P V.
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sO + r0 * S::kLdO + dt * 16, S::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(a, sP + r0 * S::kLdP + kk * 16, S::kLdP);
        wmma::load_matrix_sync(bf, sV + kk * 16 * S::kLdT + dt * 16, S::kLdT);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(sO + r0 * S::kLdO + dt * 16, acc, S::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncwarp();

  const int qi = m0 + row;
  if (qi < tq) {
    const float l = sL[row];
    const float inv = l == 0.f ? 0.f : 1.f / l;
    T* out = o + b * so.b + h * so.h + int64_t(qi) * so.t + half * (D / 2);
    const float* orow = sO + row * S::kLdO + half * (D / 2);
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) out[c] = from_float<T>(orow[c] * inv);
    if (half == 0) lse[(int64_t(b) * heads + h) * tq + qi] = sM[row] + log2f(l == 0.f ? 1.f : l);
  }
}

template <typename T, int D>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& lse,
                bool causal, float qk_scale, cudaStream_t stream) {
  const int tq = q.size(1), heads = q.size(2);
  const size_t smem = FwdSmem<D>::kBytes;
  auto kernel = attention_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid((tq + kBM - 1) / kBM, q.size(0) * heads);
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<T*>(o.data_ptr()), lse.data_ptr<float>(),
      attn::strides_of(q), attn::strides_of(k), attn::strides_of(v), attn::strides_of(o), heads,
      heads / k.size(2), tq, k.size(1), qk_scale, causal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale) {
  attn::check_qkv(q, k, v, causal);
  c10::cuda::CUDAGuard guard(q.device());
  auto o = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.size(1) == 0) return {o.zero_(), lse.fill_(-INFINITY)};
  const float qk_scale = float(scale) * attn::kLog2e;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (q.size(3) == 64) {
    bf16 ? launch_fwd<__nv_bfloat16, 64>(q, k, v, o, lse, causal, qk_scale, stream)
         : launch_fwd<__half, 64>(q, k, v, o, lse, causal, qk_scale, stream);
  } else {
    bf16 ? launch_fwd<__nv_bfloat16, 128>(q, k, v, o, lse, causal, qk_scale, stream)
         : launch_fwd<__half, 128>(q, k, v, o, lse, causal, qk_scale, stream);
  }
  return {o, lse};
}

}  // namespace sparrow
