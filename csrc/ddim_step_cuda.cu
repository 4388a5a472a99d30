// The fused DDIM step + Gaussian log-density on CUDA: the two functions ddim_step.h declares,
// called by ddim_step.cpp with checked, prepared inputs (see ddim_step.h).
//
//   e    = u + w (c - u)    (guidance; without c, e = u)
//   mean = cx[b] x + ce[b] e,   prev = mean + sigma[b] noise
//   logp = -|noise|^2 / 2 - D log sigma[b] - D/2 log(2 pi)    (0 where sigma[b] == 0)
//
// Layout: a (chunk, sample) grid, each block streaming kChunk elements of one sample with
// 16-byte vector loads where every pointer and the per-sample length allow it. The forward
// block reduces its part of |noise|^2 in a fixed order and writes one partial (double); a
// second tiny kernel adds each sample's partials in order and forms the log-density in double,
// so results are reproducible run to run (no atomics). For SD latents (D = 16384) and B <= 16
// this gives 8 B blocks: a sample spread over several SMs instead of one. Arithmetic runs in
// at::opmath_type (fp32 for half/bfloat16), which is also the log-density's dtype.
// The backward reads only the cotangents autograd gave and writes only the gradients it asked
// for: null pointers, uniform over the grid, so the branches cost no divergence.
//
// Checked without a GPU by compiling every instantiation for sm_90 against a CPU torch wheel's headers:
//   nvcc -c csrc/ddim_step_cuda.cu -o /tmp/ddim_step_cuda.o -std=c++17 -O3 --use_fast_math \
//     -gencode arch=compute_90,code=sm_90 -Xptxas -v -DRLR_FAST_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
//     -I$TORCH/include -I$TORCH/include/torch/csrc/api/include -I$PYTHON_INCLUDE -I$STUB
// where $STUB/c10/cuda/impl/cuda_cmake_macros.h is an empty stand-in for the header only a CUDA build of
// torch ships. Run on a GPU by bench/gpu_check.sh (tests/test_compiled.py and test_ddim.py, backend "cuda").

#include "ddim_step.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

namespace rlr_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 2048;      // elements per block: 8 per thread, one 16-byte vector in fp16
constexpr int kMaxGridY = 65535;  // samples ride on grid.y
constexpr int kFinalizeThreads = 128;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// This block's elements [begin, end) of sample blockIdx.y, offsets from the start of the tensor.
struct Chunk {
  int64_t sample, begin, end;
  __device__ explicit Chunk(int64_t d) : sample(blockIdx.y) {
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunk;
    begin = sample * d + first;
    end = sample * d + (first + kChunk < d ? first + kChunk : d);
  }
};

// Sum of `value` over the block, in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double value) {
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[i];
  return total;
}

template <typename scalar_t, int VEC, bool HAS_COND>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
                   const scalar_t* __restrict__ c, const scalar_t* __restrict__ noise,
                   const double* __restrict__ cx, const double* __restrict__ ce,
                   const double* __restrict__ sigma, double w, scalar_t* __restrict__ prev,
                   scalar_t* __restrict__ mean, double* __restrict__ partials, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunk chunk(d);
  const SampleCoefficients<acc_t> q(cx, ce, sigma, chunk.sample);
  const acc_t ws = static_cast<acc_t>(w);
  acc_t sq = 0;
  // VEC > 1 only when d % VEC == 0, so a pack never straddles `end`.
  for (int64_t o = chunk.begin + threadIdx.x * VEC; o < chunk.end; o += kThreads * VEC) {
    const auto xv = load_pack<scalar_t, VEC>(x + o), uv = load_pack<scalar_t, VEC>(u + o);
    const auto nv = load_pack<scalar_t, VEC>(noise + o);
    Pack<scalar_t, VEC> cv;
    if constexpr (HAS_COND) cv = load_pack<scalar_t, VEC>(c + o);
    Pack<scalar_t, VEC> pv, mv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t e = static_cast<acc_t>(uv.v[j]);
      if constexpr (HAS_COND) e += ws * (static_cast<acc_t>(cv.v[j]) - e);
      const acc_t m = q.cx * static_cast<acc_t>(xv.v[j]) + q.ce * e;
      const acc_t n = static_cast<acc_t>(nv.v[j]);
      mv.v[j] = static_cast<scalar_t>(m);
      pv.v[j] = static_cast<scalar_t>(m + q.sigma * n);
      sq += n * n;
    }
    store_pack<scalar_t, VEC>(mean + o, mv);
    store_pack<scalar_t, VEC>(prev + o, pv);
  }
  const double total = block_sum(static_cast<double>(sq));
  if (threadIdx.x == 0) partials[chunk.sample * gridDim.x + blockIdx.x] = total;
}

template <typename logp_t>
__global__ void log_density_kernel(const double* __restrict__ partials, const double* __restrict__ sigma,
                                   logp_t* __restrict__ logp, int64_t batch, int64_t chunks, int64_t d) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double sq = 0.0;
  for (int64_t i = 0; i < chunks; ++i) sq += partials[b * chunks + i];
  logp[b] = static_cast<logp_t>(log_density(sq, sigma[b], d));
}

// Null cotangents (grad_prev, grad_mean, grad_logp) count as zero; null outputs are not written.
template <typename scalar_t, int VEC, bool HAS_COND>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_prev, const scalar_t* __restrict__ grad_mean,
                    const double* __restrict__ grad_logp, const scalar_t* __restrict__ noise,
                    const double* __restrict__ cx, const double* __restrict__ ce,
                    const double* __restrict__ sigma, double w, scalar_t* __restrict__ gx,
                    scalar_t* __restrict__ gu, scalar_t* __restrict__ gc, scalar_t* __restrict__ gn,
                    int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunk chunk(d);
  const SampleCoefficients<acc_t> q(cx, ce, sigma, chunk.sample);
  // no density where sigma == 0, so no log-density gradient there
  const acc_t l = grad_logp && sigma[chunk.sample] > 0.0 ? static_cast<acc_t>(grad_logp[chunk.sample]) : acc_t(0);
  const acc_t wu = static_cast<acc_t>(HAS_COND ? 1.0 - w : 1.0), wc = static_cast<acc_t>(w);
  for (int64_t o = chunk.begin + threadIdx.x * VEC; o < chunk.end; o += kThreads * VEC) {
    Pack<scalar_t, VEC> gp, gm, nv;
    if (grad_prev) gp = load_pack<scalar_t, VEC>(grad_prev + o);
    if (grad_mean) gm = load_pack<scalar_t, VEC>(grad_mean + o);
    if (gn) nv = load_pack<scalar_t, VEC>(noise + o);
    Pack<scalar_t, VEC> xo, uo, co, no;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t p = grad_prev ? static_cast<acc_t>(gp.v[j]) : acc_t(0);
      const acc_t g = p + (grad_mean ? static_cast<acc_t>(gm.v[j]) : acc_t(0));  // prev = mean + sigma noise
      const acc_t ge = q.ce * g;
      xo.v[j] = static_cast<scalar_t>(q.cx * g);
      uo.v[j] = static_cast<scalar_t>(wu * ge);
      if constexpr (HAS_COND) co.v[j] = static_cast<scalar_t>(wc * ge);
      if (gn) no.v[j] = static_cast<scalar_t>(q.sigma * p - l * static_cast<acc_t>(nv.v[j]));
    }
    if (gx) store_pack<scalar_t, VEC>(gx + o, xo);
    if (gu) store_pack<scalar_t, VEC>(gu + o, uo);
    if (HAS_COND && gc) store_pack<scalar_t, VEC>(gc + o, co);
    if (gn) store_pack<scalar_t, VEC>(gn + o, no);
  }
}

bool aligned16(const torch::Tensor& t) {
  return !t.defined() || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename scalar_t>
scalar_t* data_or_null(const torch::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// Calls launch(width, has_cond) with both as compile-time constants: width 16 / sizeof(scalar_t)
// (one 16-byte vector) when d and every tensor allow it, else 1.
template <typename scalar_t, typename Launch>
void with_vector_width_and_cond(int64_t d, std::initializer_list<torch::Tensor> tensors, bool has_cond,
                                Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool vectorised = d % kVec == 0;
  for (const auto& t : tensors) vectorised = vectorised && aligned16(t);
  using Vec = std::integral_constant<int, kVec>;
  using One = std::integral_constant<int, 1>;
  if (vectorised) {
    has_cond ? launch(Vec{}, std::true_type{}) : launch(Vec{}, std::false_type{});
  } else {
    has_cond ? launch(One{}, std::true_type{}) : launch(One{}, std::false_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// (chunks, samples) grid of a (B, ...) tensor of d elements per sample.
dim3 chunk_grid(int64_t batch, int64_t d) {
  TORCH_CHECK_VALUE(batch <= kMaxGridY, "ddim_step: batch of ", batch, " is above ", kMaxGridY, "; split it");
  return dim3(static_cast<unsigned>((d + kChunk - 1) / kChunk), static_cast<unsigned>(batch));
}

}  // namespace

std::vector<torch::Tensor> ddim_step_forward_cuda(const torch::Tensor& x, const torch::Tensor& u,
                                                  const torch::Tensor& c, double w, const torch::Tensor& noise,
                                                  const torch::Tensor& cx, const torch::Tensor& ce,
                                                  const torch::Tensor& sigma) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), d = x.numel() / batch;
  auto prev = torch::empty_like(x), mean = torch::empty_like(x);
  auto logp = torch::empty({batch}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  const dim3 grid = chunk_grid(batch, d);
  auto partials = torch::empty({batch, static_cast<int64_t>(grid.x)}, x.options().dtype(torch::kFloat64));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddim_step_forward_cuda", [&] {
    with_vector_width_and_cond<scalar_t>(d, {x, u, c, noise, prev, mean}, c.defined(), [&](auto vec, auto cond) {
      forward_kernel<scalar_t, decltype(vec)::value, decltype(cond)::value><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), data_or_null<scalar_t>(c), noise.data_ptr<scalar_t>(),
          cx.data_ptr<double>(), ce.data_ptr<double>(), sigma.data_ptr<double>(), w, prev.data_ptr<scalar_t>(),
          mean.data_ptr<scalar_t>(), partials.data_ptr<double>(), d);
    });
    using logp_t = at::opmath_type<scalar_t>;
    const unsigned finalize_blocks = static_cast<unsigned>((batch + kFinalizeThreads - 1) / kFinalizeThreads);
    log_density_kernel<logp_t><<<finalize_blocks, kFinalizeThreads, 0, stream>>>(
        partials.data_ptr<double>(), sigma.data_ptr<double>(), logp.data_ptr<logp_t>(), batch, grid.x, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {prev, mean, logp};
}

std::vector<torch::Tensor> ddim_step_backward_cuda(const torch::Tensor& grad_prev, const torch::Tensor& grad_mean,
                                                   const torch::Tensor& grad_logp, const torch::Tensor& noise,
                                                   double w, bool has_cond, const torch::Tensor& cx,
                                                   const torch::Tensor& ce, const torch::Tensor& sigma,
                                                   GradientMask need) {
  const c10::cuda::CUDAGuard guard(noise.device());
  std::vector<torch::Tensor> grads(4);
  for (int i = 0; i < 4; ++i)
    if (need[i]) grads[i] = torch::empty_like(noise);
  const int64_t batch = noise.size(0), d = noise.numel() / batch;
  const dim3 grid = chunk_grid(batch, d);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "ddim_step_backward_cuda", [&] {
    with_vector_width_and_cond<scalar_t>(
        d, {grad_prev, grad_mean, noise, grads[0], grads[1], grads[2], grads[3]}, has_cond, [&](auto vec, auto cond) {
          backward_kernel<scalar_t, decltype(vec)::value, decltype(cond)::value><<<grid, kThreads, 0, stream>>>(
              data_or_null<scalar_t>(grad_prev), data_or_null<scalar_t>(grad_mean), data_or_null<double>(grad_logp),
              noise.data_ptr<scalar_t>(), cx.data_ptr<double>(), ce.data_ptr<double>(), sigma.data_ptr<double>(), w,
              data_or_null<scalar_t>(grads[0]), data_or_null<scalar_t>(grads[1]), data_or_null<scalar_t>(grads[2]),
              data_or_null<scalar_t>(grads[3]), d);
        });
  });
  return grads;
}

}  // namespace rlr_fast
