// The fused DDIM step + Gaussian log-density: input checks, the CPU implementation, the binding.
//
// Per sample b (coefficients are per sample so that one call can hold several timesteps):
//   e      = u + w (c - u)                     (classifier-free guidance; without c, e = u)
//   mean   = cx[b] x + ce[b] e
//   prev   = mean + sigma[b] noise
//   logp   = -|noise|^2 / 2 - D log sigma[b] - D/2 log(2 pi)    (0 where sigma[b] == 0)
// The log-density of `prev` under N(mean, sigma^2) does not depend on x or e because prev
// moves with the mean, so the backward only routes the cotangents of prev and mean.
//
// One pass over memory in each direction; the batch is the parallel dimension because every
// sample has its own coefficients and its own log-density reduction. fp16/bf16 inputs are
// computed in fp32 (at::opmath_type) and rounded once on store, as the CUDA and Triton kernels
// do, with no fp32 copies of the inputs. The contract (checks, dtypes) is the one
// kernels/reference.py specifies; errors name the input, as ValueError / TypeError in Python.
// The autograd wiring is rlr_fast/compiled.py.

#include "ddim_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace rlr_fast {
namespace {

// The tensor the others must match: a non-empty (B, ...) tensor of a supported dtype.
void check_first(const char* name, const torch::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
                   name, " has dtype ", t, "; the ops take Half, BFloat16, Float and Double");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0,
                    name, " must be a non-empty tensor with a batch dimension, got shape ", x.sizes());
}

// `t` must match `x` (named `like`) in device, shape and dtype; an undefined `t` is an absent input.
void check_like(const char* name, const torch::Tensor& t, const torch::Tensor& x, const char* like) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), ", expected ", x.device(), " like the ",
                    like);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " has shape ", t.sizes(), ", expected ", x.sizes(), " like the ",
                    like);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected ",
                   x.scalar_type(), " like the ", like);
}

// A per-sample value (coefficient or log-density cotangent) as float64 (B,) on the samples' device.
torch::Tensor per_sample(const char* name, const torch::Tensor& t, const torch::Tensor& x) {
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating tensor, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == x.size(0), name, " must hold one value per sample (", x.size(0), "), got shape ",
                    t.sizes());
  return t.to(x.device(), torch::kFloat64).reshape({-1}).contiguous();
}

torch::Tensor contiguous_or_undefined(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : torch::Tensor();
}

template <typename scalar_t>
void forward_cpu(const scalar_t* x, const scalar_t* u, const scalar_t* c, double w, const scalar_t* noise,
                 const double* cx, const double* ce, const double* sigma, scalar_t* prev, scalar_t* mean,
                 at::opmath_type<scalar_t>* logp, int64_t batch, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * d;
      const SampleCoefficients<acc_t> q(cx, ce, sigma, b);
      const acc_t ws = static_cast<acc_t>(w);
      double sq = 0.0;  // the reduction in double keeps fp32 log-densities of 64x64x4 latents exact
      for (int64_t i = 0; i < d; ++i) {
        acc_t e = static_cast<acc_t>(u[o + i]);
        if (c) e += ws * (static_cast<acc_t>(c[o + i]) - e);
        const acc_t m = q.cx * static_cast<acc_t>(x[o + i]) + q.ce * e;
        const acc_t n = static_cast<acc_t>(noise[o + i]);
        mean[o + i] = static_cast<scalar_t>(m);
        prev[o + i] = static_cast<scalar_t>(m + q.sigma * n);
        sq += static_cast<double>(n) * static_cast<double>(n);
      }
      logp[b] = static_cast<acc_t>(log_density(sq, sigma[b], d));
    }
  });
}

// Null cotangents count as zero; null outputs are not needed and not written.
template <typename scalar_t>
void backward_cpu(const scalar_t* gp, const scalar_t* gm, const double* gl, const scalar_t* noise, double w,
                  bool has_cond, const double* cx, const double* ce, const double* sigma, scalar_t* gx,
                  scalar_t* gu, scalar_t* gc, scalar_t* gn, int64_t batch, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * d;
      const SampleCoefficients<acc_t> q(cx, ce, sigma, b);
      const acc_t l = gl && sigma[b] > 0.0 ? static_cast<acc_t>(gl[b]) : acc_t(0);  // no density at sigma 0
      const acc_t wu = static_cast<acc_t>(has_cond ? 1.0 - w : 1.0);
      const acc_t wc = static_cast<acc_t>(w);
      for (int64_t i = 0; i < d; ++i) {
        const acc_t p = gp ? static_cast<acc_t>(gp[o + i]) : acc_t(0);
        const acc_t g = p + (gm ? static_cast<acc_t>(gm[o + i]) : acc_t(0));  // prev = mean + sigma noise
        const acc_t ge = q.ce * g;
        if (gx) gx[o + i] = static_cast<scalar_t>(q.cx * g);
        if (gu) gu[o + i] = static_cast<scalar_t>(wu * ge);
        if (gc) gc[o + i] = static_cast<scalar_t>(wc * ge);
        if (gn) gn[o + i] = static_cast<scalar_t>(q.sigma * p - l * static_cast<acc_t>(noise[o + i]));
      }
    }
  });
}

template <typename scalar_t>
scalar_t* data_or_null(const torch::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

}  // namespace

// Returns {prev_sample, mean, log_prob}; `c` may be None (no guidance).
std::vector<torch::Tensor> ddim_step_forward(const torch::Tensor& sample, const torch::Tensor& model_output,
                                             const c10::optional<torch::Tensor>& model_output_cond, double w,
                                             const torch::Tensor& noise, const torch::Tensor& c_x,
                                             const torch::Tensor& c_e, const torch::Tensor& sigma) {
  check_first("sample", sample);
  const torch::Tensor c = contiguous_or_undefined(model_output_cond);
  check_like("model_output", model_output, sample, "sample");
  check_like("noise", noise, sample, "sample");
  check_like("model_output_cond", c, sample, "sample");
  const auto x = sample.contiguous(), u = model_output.contiguous(), n = noise.contiguous();
  const auto cx = per_sample("c_x", c_x, x), ce = per_sample("c_e", c_e, x), sd = per_sample("sigma", sigma, x);
#ifdef RLR_FAST_WITH_CUDA
  if (x.is_cuda()) return ddim_step_forward_cuda(x, u, c, w, n, cx, ce, sd);
#endif
  TORCH_CHECK_VALUE(x.device().is_cpu(), "sample is on ", x.device(),
                    "; this build of rlr_fast._C runs on the CPU only (no CUDA kernels)");
  const int64_t batch = x.size(0), d = x.numel() / batch;
  auto prev = torch::empty_like(x), mean = torch::empty_like(x);
  auto logp = torch::empty({batch}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddim_step_forward", [&] {
    forward_cpu<scalar_t>(x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), data_or_null<scalar_t>(c), w,
                          n.data_ptr<scalar_t>(), cx.data_ptr<double>(), ce.data_ptr<double>(), sd.data_ptr<double>(),
                          prev.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                          logp.data_ptr<at::opmath_type<scalar_t>>(), batch, d);
  });
  return {prev, mean, logp};
}

// Returns {grad_sample, grad_model_output, grad_model_output_cond, grad_noise}, each None unless
// asked for by need_* (grad_model_output_cond also None without guidance). Absent cotangents
// (None) count as zero.
std::vector<torch::Tensor> ddim_step_backward(const c10::optional<torch::Tensor>& grad_prev,
                                              const c10::optional<torch::Tensor>& grad_mean,
                                              const c10::optional<torch::Tensor>& grad_logp,
                                              const torch::Tensor& noise, double w, bool has_cond,
                                              const torch::Tensor& c_x, const torch::Tensor& c_e,
                                              const torch::Tensor& sigma, bool need_sample, bool need_model_output,
                                              bool need_model_output_cond, bool need_noise) {
  check_first("noise", noise);
  const torch::Tensor gp = contiguous_or_undefined(grad_prev), gm = contiguous_or_undefined(grad_mean);
  check_like("grad_prev", gp, noise, "noise");
  check_like("grad_mean", gm, noise, "noise");
  const auto n = noise.contiguous();
  const torch::Tensor gl = grad_logp.has_value() && grad_logp->defined()
                               ? per_sample("grad_logp", *grad_logp, n) : torch::Tensor();
  const auto cx = per_sample("c_x", c_x, n), ce = per_sample("c_e", c_e, n), sd = per_sample("sigma", sigma, n);
  const GradientMask need{need_sample, need_model_output, need_model_output_cond && has_cond, need_noise};
#ifdef RLR_FAST_WITH_CUDA
  if (n.is_cuda()) return ddim_step_backward_cuda(gp, gm, gl, n, w, has_cond, cx, ce, sd, need);
#endif
  TORCH_CHECK_VALUE(n.device().is_cpu(), "noise is on ", n.device(),
                    "; this build of rlr_fast._C runs on the CPU only (no CUDA kernels)");
  std::vector<torch::Tensor> grads(4);
  for (int i = 0; i < 4; ++i)
    if (need[i]) grads[i] = torch::empty_like(n);
  const int64_t batch = n.size(0), d = n.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, n.scalar_type(), "ddim_step_backward", [&] {
    backward_cpu<scalar_t>(data_or_null<scalar_t>(gp), data_or_null<scalar_t>(gm), data_or_null<double>(gl),
                           n.data_ptr<scalar_t>(), w, has_cond, cx.data_ptr<double>(), ce.data_ptr<double>(),
                           sd.data_ptr<double>(), data_or_null<scalar_t>(grads[0]), data_or_null<scalar_t>(grads[1]),
                           data_or_null<scalar_t>(grads[2]), data_or_null<scalar_t>(grads[3]), batch, d);
  });
  return grads;
}

bool has_cuda() {
#ifdef RLR_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rlr_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "rlr_fast compiled ops: fused DDIM step + Gaussian log-density";
  m.def("ddim_step_forward", &rlr_fast::ddim_step_forward, "fused DDIM step forward -> (prev, mean, log_prob)",
        py::arg("sample"), py::arg("model_output"), py::arg("model_output_cond"), py::arg("guidance_scale"),
        py::arg("noise"), py::arg("c_x"), py::arg("c_e"), py::arg("sigma"));
  m.def("ddim_step_backward", &rlr_fast::ddim_step_backward,
        "fused DDIM step VJP -> (grad_sample, grad_model_output, grad_model_output_cond, grad_noise)",
        py::arg("grad_prev"), py::arg("grad_mean"), py::arg("grad_logp"), py::arg("noise"), py::arg("guidance_scale"),
        py::arg("has_cond"), py::arg("c_x"), py::arg("c_e"), py::arg("sigma"), py::arg("need_sample"),
        py::arg("need_model_output"), py::arg("need_model_output_cond"), py::arg("need_noise"));
  m.def("has_cuda", &rlr_fast::has_cuda, "whether CUDA kernels were compiled in");
  m.attr("torch_version") = TORCH_VERSION;
}
