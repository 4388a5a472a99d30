// The fused DDIM step + Gaussian log-density, CPU implementation, and the Python binding.
//
// Per sample b (coefficients are per sample so that one call can hold several timesteps):
//   e      = u + w (c - u)                     (classifier-free guidance; w = 1 means no CFG)
//   mean   = cx[b] x + ce[b] e
//   prev   = mean + sigma[b] noise
//   logp   = -|noise|^2 / 2 - D log sigma[b] - D/2 log(2 pi)    (0 where sigma[b] == 0)
// The log-density of `prev` under N(mean, sigma^2) does not depend on x or e because prev
// moves with the mean, so the backward only routes the cotangents of prev and mean.
//
// One pass over memory in each direction; the batch is the parallel dimension because every
// sample has its own coefficients and its own log-density reduction. The Python side owns the
// API, validation and the autograd wiring (rlr_fast/ddim.py); this file is the arithmetic.

#include <torch/extension.h>

#include <cmath>
#include <vector>

#ifdef RLR_FAST_WITH_CUDA
std::vector<torch::Tensor> ddim_step_forward_cuda(torch::Tensor x, torch::Tensor u, torch::Tensor c,
                                                  double w, torch::Tensor noise, torch::Tensor cx,
                                                  torch::Tensor ce, torch::Tensor sigma);
std::vector<torch::Tensor> ddim_step_backward_cuda(torch::Tensor grad_prev, torch::Tensor grad_mean,
                                                   torch::Tensor grad_logp, torch::Tensor noise,
                                                   double w, bool has_cond, torch::Tensor cx,
                                                   torch::Tensor ce, torch::Tensor sigma);
#endif

namespace {

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2

void check_inputs(const torch::Tensor& x, const torch::Tensor& u, const torch::Tensor& c,
                  const torch::Tensor& noise, const torch::Tensor& cx, const torch::Tensor& ce,
                  const torch::Tensor& sigma) {
  TORCH_CHECK(x.dim() >= 1, "ddim_step: sample must have a batch dimension");
  TORCH_CHECK(u.sizes() == x.sizes() && noise.sizes() == x.sizes(),
              "ddim_step: sample, model_output and noise must have the same shape");
  TORCH_CHECK(!c.defined() || c.sizes() == x.sizes(),
              "ddim_step: model_output_cond must have the sample's shape");
  const auto b = x.size(0);
  TORCH_CHECK(cx.numel() == b && ce.numel() == b && sigma.numel() == b,
              "ddim_step: coefficients must have one value per sample");
  TORCH_CHECK(u.scalar_type() == x.scalar_type() && noise.scalar_type() == x.scalar_type(),
              "ddim_step: all tensors must share one dtype");
}

// Sample b's coefficients in the arithmetic type.
template <typename scalar_t>
struct SampleCoefficients {
  scalar_t cx, ce, sigma;
  SampleCoefficients(const double* cx_, const double* ce_, const double* sigma_, int64_t b)
      : cx(static_cast<scalar_t>(cx_[b])), ce(static_cast<scalar_t>(ce_[b])), sigma(static_cast<scalar_t>(sigma_[b])) {}
};

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* u, const scalar_t* c, double w,
                    const scalar_t* noise, const double* cx, const double* ce, const double* sigma,
                    scalar_t* prev, scalar_t* mean, scalar_t* logp, int64_t batch, int64_t d) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * d;
      const SampleCoefficients<scalar_t> q(cx, ce, sigma, b);
      const scalar_t ws = static_cast<scalar_t>(w);
      double sq = 0.0;  // the reduction in double keeps fp32 log-densities of 64x64x4 latents exact
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t e = c ? u[o + i] + ws * (c[o + i] - u[o + i]) : u[o + i];
        const scalar_t m = q.cx * x[o + i] + q.ce * e;
        const scalar_t n = noise[o + i];
        mean[o + i] = m;
        prev[o + i] = m + q.sigma * n;
        sq += static_cast<double>(n) * static_cast<double>(n);
      }
      logp[b] = sigma[b] > 0.0
                    ? static_cast<scalar_t>(-0.5 * sq - d * (std::log(sigma[b]) + kHalfLog2Pi))
                    : scalar_t(0);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* gp, const scalar_t* gm, const scalar_t* gl, const scalar_t* noise,
                     double w, bool has_cond, const double* cx, const double* ce, const double* sigma,
                     scalar_t* gx, scalar_t* gu, scalar_t* gc, scalar_t* gn, int64_t batch, int64_t d) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * d;
      const SampleCoefficients<scalar_t> q(cx, ce, sigma, b);
      const scalar_t l = sigma[b] > 0.0 ? gl[b] : scalar_t(0);
      const scalar_t wu = static_cast<scalar_t>(has_cond ? 1.0 - w : 1.0);
      const scalar_t wc = static_cast<scalar_t>(w);
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t g = gp[o + i] + gm[o + i];  // prev = mean + sigma * noise
        const scalar_t ge = q.ce * g;
        gx[o + i] = q.cx * g;
        gu[o + i] = wu * ge;
        if (has_cond) gc[o + i] = wc * ge;
        gn[o + i] = q.sigma * gp[o + i] - l * noise[o + i];
      }
    }
  });
}

torch::Tensor as_double_cpu(const torch::Tensor& t) {
  return t.to(torch::kCPU, torch::kFloat64).contiguous();
}

}  // namespace

// Returns {prev_sample, mean, log_prob}. `c` may be an undefined tensor (no guidance).
std::vector<torch::Tensor> ddim_step_forward(torch::Tensor x, torch::Tensor u, c10::optional<torch::Tensor> c_opt,
                                             double w, torch::Tensor noise, torch::Tensor cx,
                                             torch::Tensor ce, torch::Tensor sigma) {
  torch::Tensor c = c_opt.has_value() ? *c_opt : torch::Tensor();
  check_inputs(x, u, c, noise, cx, ce, sigma);
#ifdef RLR_FAST_WITH_CUDA
  if (x.is_cuda()) return ddim_step_forward_cuda(x, u, c, w, noise, cx, ce, sigma);
#endif
  TORCH_CHECK(x.device().is_cpu(), "ddim_step: this build of rlr_fast._C has no CUDA kernels");
  x = x.contiguous();
  u = u.contiguous();
  noise = noise.contiguous();
  if (c.defined()) c = c.contiguous();
  auto cxd = as_double_cpu(cx), ced = as_double_cpu(ce), sd = as_double_cpu(sigma);
  const int64_t batch = x.size(0), d = x.numel() / std::max<int64_t>(batch, 1);
  auto prev = torch::empty_like(x), mean = torch::empty_like(x);
  auto logp = torch::empty({batch}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ddim_step_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                             c.defined() ? c.data_ptr<scalar_t>() : nullptr, w,
                             noise.data_ptr<scalar_t>(), cxd.data_ptr<double>(), ced.data_ptr<double>(),
                             sd.data_ptr<double>(), prev.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                             logp.data_ptr<scalar_t>(), batch, d);
  });
  return {prev, mean, logp};
}

// Returns {grad_x, grad_model_output, grad_model_output_cond (undefined without CFG), grad_noise}.
std::vector<torch::Tensor> ddim_step_backward(torch::Tensor grad_prev, torch::Tensor grad_mean,
                                              torch::Tensor grad_logp, torch::Tensor noise, double w,
                                              bool has_cond, torch::Tensor cx, torch::Tensor ce,
                                              torch::Tensor sigma) {
#ifdef RLR_FAST_WITH_CUDA
  if (noise.is_cuda())
    return ddim_step_backward_cuda(grad_prev, grad_mean, grad_logp, noise, w, has_cond, cx, ce, sigma);
#endif
  TORCH_CHECK(noise.device().is_cpu(), "ddim_step: this build of rlr_fast._C has no CUDA kernels");
  grad_prev = grad_prev.contiguous();
  grad_mean = grad_mean.contiguous();
  grad_logp = grad_logp.contiguous();
  noise = noise.contiguous();
  auto cxd = as_double_cpu(cx), ced = as_double_cpu(ce), sd = as_double_cpu(sigma);
  const int64_t batch = noise.size(0), d = noise.numel() / std::max<int64_t>(batch, 1);
  auto gx = torch::empty_like(noise), gu = torch::empty_like(noise), gn = torch::empty_like(noise);
  torch::Tensor gc = has_cond ? torch::empty_like(noise) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "ddim_step_backward", [&] {
    backward_kernel<scalar_t>(grad_prev.data_ptr<scalar_t>(), grad_mean.data_ptr<scalar_t>(),
                              grad_logp.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(), w, has_cond,
                              cxd.data_ptr<double>(), ced.data_ptr<double>(), sd.data_ptr<double>(),
                              gx.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(),
                              has_cond ? gc.data_ptr<scalar_t>() : nullptr, gn.data_ptr<scalar_t>(), batch, d);
  });
  return {gx, gu, gc, gn};
}

bool has_cuda() {
#ifdef RLR_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlr_fast compiled ops: fused DDIM step + Gaussian log-density";
  m.def("ddim_step_forward", &ddim_step_forward, "fused DDIM step forward -> (prev, mean, log_prob)");
  m.def("ddim_step_backward", &ddim_step_backward, "fused DDIM step VJP -> (gx, gu, gc, gnoise)");
  m.def("has_cuda", &has_cuda, "whether CUDA kernels were compiled in");
  m.attr("torch_version") = TORCH_VERSION;
}
