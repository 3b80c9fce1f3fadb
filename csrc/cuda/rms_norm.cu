// RMSNorm forward and backward on CUDA.
//
// Forward: one block per row; the row is read once for the sum of squares and again (from L1/L2) to write y.
// Backward: a persistent grid capped near 2x the SM count walks the rows; each block keeps one fp32 dW partial
// row, so the second reduction reads grid x hidden floats regardless of how many rows there are.
// Light headers on purpose: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare CUDA toolkit
// may lack, and every header here costs compile time on 2-core machines.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"

namespace sparrow {
namespace {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the total. `shared` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
  float total = (threadIdx.x < num_warps) ? shared[threadIdx.x] : 0.f;
  if (warp == 0) total = warp_sum(total);
  if (threadIdx.x == 0) shared[0] = total;
  __syncthreads();
  total = shared[0];
  __syncthreads();  // shared may be reused by the caller's next reduction
  return total;
}

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                    float* __restrict__ rstd, int64_t hidden, float eps) {
  __shared__ float shared[kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(xr[i]);
    sum_sq += v * v;
  }
  const float inv = rsqrtf(block_sum(sum_sq, shared) / static_cast<float>(hidden) + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    yr[i] = static_cast<T>(to_float(xr[i]) * inv * to_float(w[i]));
  }
}

template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                    const float* __restrict__ rstd, T* __restrict__ dx,
                                    float* __restrict__ dw_partial, int64_t rows, int64_t hidden) {
  __shared__ float shared[kWarp];
  float* part = dw_partial + static_cast<int64_t>(blockIdx.x) * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) part[i] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    T* dxr = dx + row * hidden;
    const float inv = rstd[row];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dot += to_float(dyr[i]) * to_float(w[i]) * to_float(xr[i]);
    const float coef = block_sum(dot, shared) * inv * inv * inv / static_cast<float>(hidden);
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      const float xv = to_float(xr[i]), gv = to_float(dyr[i]);
      dxr[i] = static_cast<T>(gv * to_float(w[i]) * inv - coef * xv);
      part[i] += gv * xv * inv;  // each block owns its partial row: no atomics
    }
  }
}

template <typename T>
__global__ void reduce_partials_kernel(const float* __restrict__ partial, T* __restrict__ dw, int64_t num_partials,
                                       int64_t hidden) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= hidden) return;
  float acc = 0.f;
  for (int64_t p = 0; p < num_partials; ++p) acc += partial[p * hidden + col];
  dw[col] = static_cast<T>(acc);
}

int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

int threads_for(int64_t hidden) {
  int threads = 128;
  while (threads < 1024 && threads * 8 < hidden) threads *= 2;
  return threads;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  const int64_t rows = x.size(0), hidden = x.size(1);
  if (rows == 0) return {y, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    rms_norm_fwd_kernel<scalar_t><<<rows, threads_for(hidden), 0, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<float>(), hidden,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm_bwd_args(grad_y, x, weight, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::empty_like(weight);
  if (rows == 0) return {grad_x, grad_w.zero_()};
  const int sms = sm_count(x.get_device());
  const int64_t grid = std::min<int64_t>(rows, 2 * sms);
  at::Tensor partial = at::empty({grid, hidden}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    rms_norm_bwd_kernel<scalar_t><<<grid, threads_for(hidden), 0, stream>>>(
        grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rstd.data_ptr<float>(),
        grad_x.data_ptr<scalar_t>(), partial.data_ptr<float>(), rows, hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 256;
    reduce_partials_kernel<scalar_t><<<(hidden + threads - 1) / threads, threads, 0, stream>>>(
        partial.data_ptr<float>(), grad_w.data_ptr<scalar_t>(), grid, hidden);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_w};
}

}  // namespace sparrow
