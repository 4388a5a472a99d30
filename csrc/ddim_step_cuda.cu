// The fused DDIM step + Gaussian log-density on CUDA: the two functions ddim_step.cpp declares
// under RLR_FAST_WITH_CUDA, with the CPU versions' arguments and return conventions.
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
// at::opmath_type (fp32 for half/bfloat16). Not yet compiled against a CUDA torch or measured.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

namespace {

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2
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
  const int64_t b = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < d ? begin + kChunk : d;
  const int64_t base = b * d;
  const acc_t a = static_cast<acc_t>(cx[b]), k = static_cast<acc_t>(ce[b]);
  const acc_t s = static_cast<acc_t>(sigma[b]), ws = static_cast<acc_t>(w);
  acc_t sq = 0;
  // VEC > 1 only when d % VEC == 0, so a pack never straddles `end`.
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    const int64_t o = base + i;
    const auto xv = load_pack<scalar_t, VEC>(x + o), uv = load_pack<scalar_t, VEC>(u + o);
    const auto nv = load_pack<scalar_t, VEC>(noise + o);
    Pack<scalar_t, VEC> cv;
    if constexpr (HAS_COND) cv = load_pack<scalar_t, VEC>(c + o);
    Pack<scalar_t, VEC> pv, mv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t e = static_cast<acc_t>(uv.v[j]);
      if constexpr (HAS_COND) e += ws * (static_cast<acc_t>(cv.v[j]) - e);
      const acc_t m = a * static_cast<acc_t>(xv.v[j]) + k * e;
      const acc_t n = static_cast<acc_t>(nv.v[j]);
      mv.v[j] = static_cast<scalar_t>(m);
      pv.v[j] = static_cast<scalar_t>(m + s * n);
      sq += n * n;
    }
    store_pack<scalar_t, VEC>(mean + o, mv);
    store_pack<scalar_t, VEC>(prev + o, pv);
  }
  const double total = block_sum(static_cast<double>(sq));
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = total;
}

template <typename scalar_t>
__global__ void log_density_kernel(const double* __restrict__ partials, const double* __restrict__ sigma,
                                   scalar_t* __restrict__ logp, int64_t batch, int64_t chunks, int64_t d) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double sq = 0.0;
  for (int64_t i = 0; i < chunks; ++i) sq += partials[b * chunks + i];
  const double s = sigma[b];
  logp[b] = static_cast<scalar_t>(s > 0.0 ? -0.5 * sq - static_cast<double>(d) * (log(s) + kHalfLog2Pi) : 0.0);
}

template <typename scalar_t, int VEC, bool HAS_COND>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_prev, const scalar_t* __restrict__ grad_mean,
                    const scalar_t* __restrict__ grad_logp, const scalar_t* __restrict__ noise,
                    const double* __restrict__ cx, const double* __restrict__ ce,
                    const double* __restrict__ sigma, double w, scalar_t* __restrict__ gx,
                    scalar_t* __restrict__ gu, scalar_t* __restrict__ gc, scalar_t* __restrict__ gn,
                    int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < d ? begin + kChunk : d;
  const int64_t base = b * d;
  const acc_t a = static_cast<acc_t>(cx[b]), k = static_cast<acc_t>(ce[b]);
  const acc_t s = static_cast<acc_t>(sigma[b]);
  const acc_t l = sigma[b] > 0.0 ? static_cast<acc_t>(grad_logp[b]) : acc_t(0);  // no density at sigma 0
  const acc_t wu = static_cast<acc_t>(HAS_COND ? 1.0 - w : 1.0), wc = static_cast<acc_t>(w);
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    const int64_t o = base + i;
    const auto gp = load_pack<scalar_t, VEC>(grad_prev + o), gm = load_pack<scalar_t, VEC>(grad_mean + o);
    const auto nv = load_pack<scalar_t, VEC>(noise + o);
    Pack<scalar_t, VEC> xo, uo, co, no;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t p = static_cast<acc_t>(gp.v[j]);
      const acc_t g = p + static_cast<acc_t>(gm.v[j]);  // prev = mean + sigma noise
      const acc_t ge = k * g;
      xo.v[j] = static_cast<scalar_t>(a * g);
      uo.v[j] = static_cast<scalar_t>(wu * ge);
      if constexpr (HAS_COND) co.v[j] = static_cast<scalar_t>(wc * ge);
      no.v[j] = static_cast<scalar_t>(s * p - l * static_cast<acc_t>(nv.v[j]));
    }
    store_pack<scalar_t, VEC>(gx + o, xo);
    store_pack<scalar_t, VEC>(gu + o, uo);
    if constexpr (HAS_COND) store_pack<scalar_t, VEC>(gc + o, co);
    store_pack<scalar_t, VEC>(gn + o, no);
  }
}

bool aligned16(const torch::Tensor& t) {
  return !t.defined() || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Elements per 16-byte pack when every tensor allows it, else 1.
int vector_width(int64_t d, size_t elem_size, std::initializer_list<torch::Tensor> tensors) {
  const int vec = static_cast<int>(16 / elem_size);
  if (d % vec != 0) return 1;
  for (const auto& t : tensors)
    if (!aligned16(t)) return 1;
  return vec;
}

torch::Tensor as_double_on(const torch::Tensor& t, const torch::Tensor& like) {
  return t.to(like.device(), torch::kFloat64).reshape({-1}).contiguous();
}

void check_same_cuda_device(std::initializer_list<torch::Tensor> tensors, const torch::Tensor& like) {
  for (const auto& t : tensors)
    TORCH_CHECK(!t.defined() || t.device() == like.device(),
                "ddim_step: all tensors must be on ", like.device(), ", got one on ", t.device());
}

}  // namespace

// Returns {prev_sample, mean, log_prob}; `c` may be undefined (no guidance).
std::vector<torch::Tensor> ddim_step_forward_cuda(torch::Tensor x, torch::Tensor u, torch::Tensor c,
                                                  double w, torch::Tensor noise, torch::Tensor cx,
                                                  torch::Tensor ce, torch::Tensor sigma) {
  check_same_cuda_device({u, c, noise}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  u = u.contiguous();
  noise = noise.contiguous();
  if (c.defined()) c = c.contiguous();
  const auto cxd = as_double_on(cx, x), ced = as_double_on(ce, x), sd = as_double_on(sigma, x);
  const int64_t batch = x.size(0), d = batch > 0 ? x.numel() / batch : 0;
  auto prev = torch::empty_like(x), mean = torch::empty_like(x);
  auto logp = torch::empty({batch}, x.options());
  if (batch == 0) return {prev, mean, logp};
  TORCH_CHECK(batch <= kMaxGridY, "ddim_step: batch of ", batch, " is above ", kMaxGridY, "; split it");
  const int64_t chunks = d > 0 ? (d + kChunk - 1) / kChunk : 1;
  auto partials = torch::empty({batch, chunks}, x.options().dtype(torch::kFloat64));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "ddim_step_forward_cuda", [&] {
    const int vec = vector_width(d, sizeof(scalar_t), {x, u, c, noise, prev, mean});
    const scalar_t* cp = c.defined() ? c.data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto vec_tag, auto cond_tag) {
      constexpr int V = decltype(vec_tag)::value;
      constexpr bool C = decltype(cond_tag)::value;
      forward_kernel<scalar_t, V, C><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), cp, noise.data_ptr<scalar_t>(),
          cxd.data_ptr<double>(), ced.data_ptr<double>(), sd.data_ptr<double>(), w,
          prev.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), partials.data_ptr<double>(), d);
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    using Vec = std::integral_constant<int, kVec>;
    using One = std::integral_constant<int, 1>;
    if (vec > 1) {
      c.defined() ? launch(Vec{}, std::true_type{}) : launch(Vec{}, std::false_type{});
    } else {
      c.defined() ? launch(One{}, std::true_type{}) : launch(One{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned finalize_blocks = static_cast<unsigned>((batch + kFinalizeThreads - 1) / kFinalizeThreads);
    log_density_kernel<scalar_t><<<finalize_blocks, kFinalizeThreads, 0, stream>>>(
        partials.data_ptr<double>(), sd.data_ptr<double>(), logp.data_ptr<scalar_t>(), batch, chunks, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {prev, mean, logp};
}

// Returns {grad_x, grad_model_output, grad_model_output_cond (undefined without CFG), grad_noise}.
std::vector<torch::Tensor> ddim_step_backward_cuda(torch::Tensor grad_prev, torch::Tensor grad_mean,
                                                   torch::Tensor grad_logp, torch::Tensor noise,
                                                   double w, bool has_cond, torch::Tensor cx,
                                                   torch::Tensor ce, torch::Tensor sigma) {
  check_same_cuda_device({grad_prev, grad_mean, grad_logp}, noise);
  TORCH_CHECK(grad_prev.sizes() == noise.sizes() && grad_mean.sizes() == noise.sizes(),
              "ddim_step backward: cotangents must have the noise's shape");
  TORCH_CHECK(grad_prev.scalar_type() == noise.scalar_type() && grad_mean.scalar_type() == noise.scalar_type() &&
                  grad_logp.scalar_type() == noise.scalar_type(),
              "ddim_step backward: cotangents must have the noise's dtype");
  const c10::cuda::CUDAGuard guard(noise.device());
  grad_prev = grad_prev.contiguous();
  grad_mean = grad_mean.contiguous();
  grad_logp = grad_logp.contiguous();
  noise = noise.contiguous();
  const auto cxd = as_double_on(cx, noise), ced = as_double_on(ce, noise), sd = as_double_on(sigma, noise);
  const int64_t batch = noise.size(0), d = batch > 0 ? noise.numel() / batch : 0;
  TORCH_CHECK(grad_logp.numel() == batch, "ddim_step backward: grad_logp must have one value per sample");
  auto gx = torch::empty_like(noise), gu = torch::empty_like(noise), gn = torch::empty_like(noise);
  torch::Tensor gc = has_cond ? torch::empty_like(noise) : torch::Tensor();
  if (batch == 0 || d == 0) return {gx, gu, gc, gn};
  TORCH_CHECK(batch <= kMaxGridY, "ddim_step: batch of ", batch, " is above ", kMaxGridY, "; split it");
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, noise.scalar_type(),
                                  "ddim_step_backward_cuda", [&] {
    const int vec = vector_width(d, sizeof(scalar_t), {grad_prev, grad_mean, noise, gx, gu, gc, gn});
    scalar_t* gcp = has_cond ? gc.data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto vec_tag, auto cond_tag) {
      constexpr int V = decltype(vec_tag)::value;
      constexpr bool C = decltype(cond_tag)::value;
      backward_kernel<scalar_t, V, C><<<grid, kThreads, 0, stream>>>(
          grad_prev.data_ptr<scalar_t>(), grad_mean.data_ptr<scalar_t>(), grad_logp.data_ptr<scalar_t>(),
          noise.data_ptr<scalar_t>(), cxd.data_ptr<double>(), ced.data_ptr<double>(), sd.data_ptr<double>(),
          w, gx.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), gcp, gn.data_ptr<scalar_t>(), d);
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    using Vec = std::integral_constant<int, kVec>;
    using One = std::integral_constant<int, 1>;
    if (vec > 1) {
      has_cond ? launch(Vec{}, std::true_type{}) : launch(Vec{}, std::false_type{});
    } else {
      has_cond ? launch(One{}, std::true_type{}) : launch(One{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gu, gc, gn};
}
