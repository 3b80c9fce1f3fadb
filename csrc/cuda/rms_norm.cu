// RMSNorm and fused residual-add + RMSNorm, forward and backward, on CUDA.
//
// The fast path keeps the whole row in registers and moves it in 16-byte vectors, so x (and the residual)
// cross HBM exactly once per pass: a warp per row when the row is short (one block per row would leave most of
// the block idle), a block per row otherwise, up to kItems vectors per thread and as many threads as the kernel's
// registers allow (max_block_threads). Rows that are not a whole number of vectors, misaligned pointers and rows
// longer than that take a looped scalar kernel that re-reads the row from L2 (__launch_bounds__(1024): it can
// always have the threads loop_threads asks for).
//
// Backward: a persistent grid capped at 2x the SM count walks the rows; each block accumulates one fp32 dW
// partial in registers and writes it once, so the second reduction reads grid x hidden floats regardless of the
// number of rows, in a fixed order (deterministic dW).
//
// Light headers on purpose: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare CUDA toolkit
// may lack, and every header here costs compile time on 2-core machines.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "ops.h"

namespace sparrow {
namespace {

constexpr int kWarp = 32;
constexpr int kItems = 8;           // vectors per thread on the register-resident forward path
constexpr int kItemsBwd = 4;        // and on the backward path (more live arrays)
constexpr int kWarpRowMaxVecs = 128;  // rows of at most this many vectors get a warp each
constexpr int kWarpsPerBlock = 8;   // rows per block on the warp-per-row path

template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

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

// ------------------------------------------------------------------------------- register-resident path
// WARP_ROW: blockDim.x = kWarpsPerBlock * 32 and warp w of block b owns row b * kWarpsPerBlock + w.
// Otherwise blockDim.x threads own row blockIdx.x.
template <typename T, bool WARP_ROW, bool HAS_RES>
__global__ void rms_norm_fwd_vec_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                                        T* __restrict__ y, T* __restrict__ sum_out, float* __restrict__ rstd,
                                        int64_t rows, int hidden, float eps) {
  using V = Vec<T>;
  constexpr int N = V::N;
  __shared__ float shared[kWarp];
  const int lane = WARP_ROW ? threadIdx.x % kWarp : threadIdx.x;
  const int width = WARP_ROW ? kWarp : blockDim.x;
  const int64_t row = WARP_ROW ? static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp : blockIdx.x;
  if (WARP_ROW && row >= rows) return;  // whole warps leave together, so the shuffles below stay full
  const int nvec = hidden / N;
  const V* xr = reinterpret_cast<const V*>(x + row * hidden);
  const V* rr = reinterpret_cast<const V*>(res + row * hidden);
  V* sr = reinterpret_cast<V*>(sum_out + row * hidden);
  float vals[kItems][N];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int vi = i * width + lane;
    if (vi < nvec) {
      V xv = xr[vi];
      if constexpr (HAS_RES) {
        const V rv = rr[vi];
#pragma unroll
        for (int j = 0; j < N; ++j) xv.v[j] = static_cast<T>(to_float(xv.v[j]) + to_float(rv.v[j]));
        sr[vi] = xv;  // the norm sees the sum rounded to T, as the returned residual stream
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        vals[i][j] = to_float(xv.v[j]);
        sum_sq += vals[i][j] * vals[i][j];
      }
    }
  }
  const float total = WARP_ROW ? warp_sum(sum_sq) : block_sum(sum_sq, shared);
  const float inv = rsqrtf(total / static_cast<float>(hidden) + eps);
  if (lane == 0) rstd[row] = inv;
  const V* wv = reinterpret_cast<const V*>(w);
  V* yr = reinterpret_cast<V*>(y + row * hidden);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int vi = i * width + lane;
    if (vi < nvec) {
      const V wt = wv[vi];
      V out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = static_cast<T>(vals[i][j] * inv * to_float(wt.v[j]));
      yr[vi] = out;
    }
  }
}

// Four vectors per thread at most: x_hat, dy and the dW partial all stay in registers (96 floats for bf16),
// and w is re-read from L1 rather than held, which would spill.
template <typename T, bool WARP_ROW, bool HAS_DS>
__global__ void rms_norm_bwd_vec_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                        const float* __restrict__ rstd, const T* __restrict__ ds, T* __restrict__ dx,
                                        float* __restrict__ dw_partial, int64_t rows, int hidden) {
  using V = Vec<T>;
  constexpr int N = V::N;
  constexpr int kI = kItemsBwd;
  extern __shared__ float dyn_shared[];  // WARP_ROW: kWarpsPerBlock x hidden dW partials, else kWarp floats
  const int lane = WARP_ROW ? threadIdx.x % kWarp : threadIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int width = WARP_ROW ? kWarp : blockDim.x;
  const int rows_per_step = WARP_ROW ? kWarpsPerBlock : 1;
  const int nvec = hidden / N;
  const V* wv = reinterpret_cast<const V*>(w);
  float dw[kI][N];
#pragma unroll
  for (int i = 0; i < kI; ++i) {
#pragma unroll
    for (int j = 0; j < N; ++j) dw[i][j] = 0.f;
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_step; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_step) {
    const int64_t row = base + (WARP_ROW ? warp : 0);
    if (WARP_ROW && row >= rows) continue;  // warp-uniform; no block-wide sync on this path
    const V* xr = reinterpret_cast<const V*>(x + row * hidden);
    const V* dyr = reinterpret_cast<const V*>(dy + row * hidden);
    const float inv = rstd[row];
    float xh[kI][N], g[kI][N];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kI; ++i) {
      const int vi = i * width + lane;
      if (vi < nvec) {
        const V xv = xr[vi], gv = dyr[vi], wt = wv[vi];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          xh[i][j] = to_float(xv.v[j]) * inv;
          g[i][j] = to_float(gv.v[j]);
          dot += g[i][j] * to_float(wt.v[j]) * xh[i][j];
        }
      }
    }
    const float mean_dot = (WARP_ROW ? warp_sum(dot) : block_sum(dot, dyn_shared)) / static_cast<float>(hidden);
    V* dxr = reinterpret_cast<V*>(dx + row * hidden);
    const V* dsr = reinterpret_cast<const V*>(ds + row * hidden);
#pragma unroll
    for (int i = 0; i < kI; ++i) {
      const int vi = i * width + lane;
      if (vi < nvec) {
        const V wt = wv[vi];
        V extra{};
        if constexpr (HAS_DS) extra = dsr[vi];
        V out;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          float d = inv * (g[i][j] * to_float(wt.v[j]) - xh[i][j] * mean_dot);
          if constexpr (HAS_DS) d += to_float(extra.v[j]);
          out.v[j] = static_cast<T>(d);
          dw[i][j] += g[i][j] * xh[i][j];
        }
        dxr[vi] = out;
      }
    }
  }
  float* part = dw_partial + static_cast<int64_t>(blockIdx.x) * hidden;
  if constexpr (WARP_ROW) {
    // Sum the warps' partials in a fixed order through shared memory, so dW is deterministic.
    float* mine = dyn_shared + warp * hidden;
#pragma unroll
    for (int i = 0; i < kI; ++i) {
      const int vi = i * width + lane;
      if (vi < nvec) {
#pragma unroll
        for (int j = 0; j < N; ++j) mine[vi * N + j] = dw[i][j];
      }
    }
    __syncthreads();
    for (int col = threadIdx.x; col < hidden; col += blockDim.x) {
      float acc = 0.f;
      for (int wi = 0; wi < kWarpsPerBlock; ++wi) acc += dyn_shared[wi * hidden + col];
      part[col] = acc;
    }
  } else {
    // Same register walk as the WARP_ROW branch, stored straight to the partial: one row per block, no cross-warp sum.
#pragma unroll
    for (int i = 0; i < kI; ++i) {
      const int vi = i * width + lane;
      if (vi < nvec) {
#pragma unroll
        for (int j = 0; j < N; ++j) part[vi * N + j] = dw[i][j];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ looped path
template <typename T, bool HAS_RES>
__global__ void __launch_bounds__(1024) rms_norm_fwd_loop_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                                         T* __restrict__ y, T* __restrict__ sum_out, float* __restrict__ rstd,
                                         int64_t hidden, float eps) {
  __shared__ float shared[kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = (HAS_RES ? sum_out : x) + row * hidden;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v;
    if constexpr (HAS_RES) {
      const T s = static_cast<T>(to_float(x[row * hidden + i]) + to_float(res[row * hidden + i]));
      sum_out[row * hidden + i] = s;
      v = to_float(s);
    } else {
      v = to_float(xr[i]);
    }
    sum_sq += v * v;
  }
  // Each thread re-reads only elements it wrote itself, so no barrier is needed before the second pass.
  const float inv = rsqrtf(block_sum(sum_sq, shared) / static_cast<float>(hidden) + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  T* yr = y + row * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = static_cast<T>(to_float(xr[i]) * inv * to_float(w[i]));
}

template <typename T, bool HAS_DS>
__global__ void __launch_bounds__(1024) rms_norm_bwd_loop_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ rstd, const T* __restrict__ ds, T* __restrict__ dx,
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
      float d = gv * to_float(w[i]) * inv - coef * xv;
      if constexpr (HAS_DS) d += to_float(ds[row * hidden + i]);
      dxr[i] = static_cast<T>(d);
      part[i] += gv * xv * inv;  // each block owns its partial row: no atomics
    }
  }
}

// Column sums of the (num_partials, hidden) partials: 32 columns x 16 row-groups per block, so every load is
// coalesced and the row walk is split 16 ways.
template <typename T>
__global__ void __launch_bounds__(kWarp * 16) reduce_partials_kernel(const float* __restrict__ partial, T* __restrict__ dw, int64_t num_partials,
                                       int64_t hidden) {
  __shared__ float tile[16][kWarp + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  float acc = 0.f;
  if (col < hidden) {
    for (int64_t p = threadIdx.y; p < num_partials; p += blockDim.y) acc += partial[p * hidden + col];
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float total = 0.f;
    for (int r = 0; r < 16; ++r) total += tile[r][threadIdx.x];
    dw[col] = static_cast<T>(total);
  }
}

int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

int loop_threads(int64_t hidden) {
  int threads = 128;
  while (threads < 1024 && threads * 8 < hidden) threads *= 2;
  return threads;
}

bool aligned16(const at::Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// How a row of `hidden` elements of `elem` bytes is processed.
struct Plan {
  bool vec = false;       // register-resident path
  bool warp_row = false;  // one warp per row
  int threads = 0;
};

// The most threads a block of `kernel` can have: its registers (fixed when it was compiled) against the SM's
// register file. A launch above it fails with "too many resources requested for launch", as the backward's
// block-per-row kernel did on an H200 (bf16, hidden 8192: 146-153 registers a thread at 512 threads).
// Asked once per kernel and device (the launch is the hot path; the answer depends only on the code the
// device runs), then read from a per-kernel table.
template <auto kernel>
int max_block_threads(int device) {
  static std::array<std::atomic<int>, 64> known{};  // 0: not asked yet
  const bool cached = device >= 0 && device < static_cast<int>(known.size());
  if (cached) {
    if (const int threads = known[device].load(std::memory_order_relaxed)) return threads;
  }
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int threads = attr.maxThreadsPerBlock / kWarp * kWarp;
  if (cached) known[device].store(threads, std::memory_order_relaxed);
  return threads;
}

// `block_threads`: max_block_threads of the block-per-row kernel that would run the row.
Plan plan_for(int64_t hidden, int64_t elem, int items, int block_threads,
              std::initializer_list<const at::Tensor*> tensors) {
  Plan plan;
  const int64_t per_vec = 16 / elem;
  bool ok = hidden % per_vec == 0 && hidden / per_vec <= int64_t{items} * block_threads;
  for (const at::Tensor* t : tensors) ok = ok && aligned16(*t);
  if (!ok) {
    plan.threads = loop_threads(hidden);
    return plan;
  }
  plan.vec = true;
  const int64_t nvec = hidden / per_vec;
  if (nvec <= kWarpRowMaxVecs && nvec <= int64_t{items} * kWarp) {
    plan.warp_row = true;
    plan.threads = kWarpsPerBlock * kWarp;
  } else {
    // About two vectors per thread: enough loads in flight per thread, and enough threads per row.
    // Stops at block_threads at the latest, as nvec <= items * block_threads.
    plan.threads = static_cast<int>(std::clamp<int64_t>((nvec / 2 + kWarp - 1) / kWarp * kWarp, 64, block_threads));
    while (static_cast<int64_t>(plan.threads) * items < nvec) plan.threads += kWarp;
  }
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& x, const at::Tensor* residual,
                                                        const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor summed = residual ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  const int64_t rows = x.size(0), hidden = x.size(1);
  if (rows == 0) return {y, summed, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor empty;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* sp = residual ? summed.data_ptr<scalar_t>() : nullptr;
    float* rs = rstd.data_ptr<float>();
    const float e = static_cast<float>(eps);
    const int h = static_cast<int>(hidden);
    auto launch = [&](auto has_res) {
      constexpr bool R = decltype(has_res)::value;
      const Plan plan = plan_for(hidden, x.element_size(), kItems,
                                 max_block_threads<rms_norm_fwd_vec_kernel<scalar_t, false, R>>(x.get_device()),
                                 {&x, residual ? residual : &empty, &weight, &y, &summed});
      if (plan.vec && plan.warp_row) {
        const int64_t grid = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
        rms_norm_fwd_vec_kernel<scalar_t, true, R><<<grid, plan.threads, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, e);
      } else if (plan.vec) {
        rms_norm_fwd_vec_kernel<scalar_t, false, R><<<rows, plan.threads, 0, stream>>>(xp, rp, wp, yp, sp, rs, rows, h, e);
      } else {
        rms_norm_fwd_loop_kernel<scalar_t, R><<<rows, plan.threads, 0, stream>>>(xp, rp, wp, yp, sp, rs, hidden, e);
      }
    };
    if (residual) launch(std::true_type{}); else launch(std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, summed, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight);
  auto [y, summed, rstd] = fwd_impl(x, nullptr, weight, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_fwd_cuda(const at::Tensor& x,
                                                                           const at::Tensor& residual,
                                                                           const at::Tensor& weight, double eps) {
  check_fused_add_rms_norm_args(x, residual, weight);
  return fwd_impl(x, &residual, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& grad_sum) {
  check_rms_norm_bwd_args(grad_y, x, weight, rstd, grad_sum);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::empty_like(weight);
  if (rows == 0) return {grad_x, grad_w.zero_()};
  const bool has_ds = grad_sum.has_value() && grad_sum->defined();
  const at::Tensor ds = has_ds ? *grad_sum : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* dsp = has_ds ? ds.data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = grad_x.data_ptr<scalar_t>();
    const float* rs = rstd.data_ptr<float>();
    const int h = static_cast<int>(hidden);
    auto launch = [&](auto has_ds_t) {
      constexpr bool D = decltype(has_ds_t)::value;
      const Plan plan = plan_for(hidden, x.element_size(), kItemsBwd,
                                 max_block_threads<rms_norm_bwd_vec_kernel<scalar_t, false, D>>(x.get_device()),
                                 {&grad_y, &x, &weight, &grad_x, &ds});
      const int64_t rows_per_step = plan.warp_row ? kWarpsPerBlock : 1;
      const int64_t grid = std::min<int64_t>((rows + rows_per_step - 1) / rows_per_step, 2 * sm_count(x.get_device()));
      at::Tensor partial = at::empty({grid, hidden}, x.options().dtype(at::kFloat));
      float* pp = partial.data_ptr<float>();
      if (plan.vec && plan.warp_row) {
        const size_t smem = sizeof(float) * kWarpsPerBlock * hidden;
        auto kernel = rms_norm_bwd_vec_kernel<scalar_t, true, D>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        kernel<<<grid, plan.threads, smem, stream>>>(gp, xp, wp, rs, dsp, dxp, pp, rows, h);
      } else if (plan.vec) {
        rms_norm_bwd_vec_kernel<scalar_t, false, D><<<grid, plan.threads, sizeof(float) * kWarp, stream>>>(
            gp, xp, wp, rs, dsp, dxp, pp, rows, h);
      } else {
        rms_norm_bwd_loop_kernel<scalar_t, D><<<grid, plan.threads, 0, stream>>>(gp, xp, wp, rs, dsp, dxp, pp, rows, hidden);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // The partials stay alive until this kernel has read them: the caching allocator reuses their memory only
      // for later work on the same stream.
      reduce_partials_kernel<scalar_t><<<(hidden + kWarp - 1) / kWarp, dim3(kWarp, 16), 0, stream>>>(
          pp, grad_w.data_ptr<scalar_t>(), grid, hidden);
    };
    if (has_ds) launch(std::true_type{}); else launch(std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_w};
}

}  // namespace sparrow
