// What the binding (ddim_step.cpp) and the CUDA kernels (ddim_step_cuda.cu) share.
//
// The binding checks every input and prepares it before either implementation runs: x, u, c
// (undefined without guidance), noise and the cotangents are contiguous, of one dtype and on one
// device; the coefficients cx, ce, sigma and the log-density cotangent are contiguous float64 (B,)
// tensors on that device. Undefined cotangents count as zero; an output gradient is computed only
// where `need` asks for it (undefined otherwise). Log-densities come back in at::opmath_type of
// the inputs: fp32 for fp16/bf16/fp32, fp64 for fp64.
#pragma once

#include <torch/extension.h>

#include <ATen/OpMathType.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace rlr_fast {

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2

// Which of (grad_x, grad_u, grad_c, grad_noise) the backward computes.
using GradientMask = std::array<bool, 4>;

// Sample b's coefficients in the arithmetic type.
template <typename acc_t>
struct SampleCoefficients {
  acc_t cx, ce, sigma;
  C10_HOST_DEVICE SampleCoefficients(const double* cx_, const double* ce_, const double* sigma_, int64_t b)
      : cx(static_cast<acc_t>(cx_[b])), ce(static_cast<acc_t>(ce_[b])), sigma(static_cast<acc_t>(sigma_[b])) {}
};

// log N(prev; mean, sigma^2 I) of a sample from the sum of its noise^2; 0 where sigma == 0 (no density).
C10_HOST_DEVICE inline double log_density(double sum_sq, double sigma, int64_t d) {
  return sigma > 0.0 ? -0.5 * sum_sq - static_cast<double>(d) * (::log(sigma) + kHalfLog2Pi) : 0.0;
}

#ifdef RLR_FAST_WITH_CUDA
std::vector<torch::Tensor> ddim_step_forward_cuda(const torch::Tensor& x, const torch::Tensor& u,
                                                  const torch::Tensor& c, double w, const torch::Tensor& noise,
                                                  const torch::Tensor& cx, const torch::Tensor& ce,
                                                  const torch::Tensor& sigma);
std::vector<torch::Tensor> ddim_step_backward_cuda(const torch::Tensor& grad_prev, const torch::Tensor& grad_mean,
                                                   const torch::Tensor& grad_logp, const torch::Tensor& noise,
                                                   double w, bool has_cond, const torch::Tensor& cx,
                                                   const torch::Tensor& ce, const torch::Tensor& sigma,
                                                   GradientMask need);
#endif

}  // namespace rlr_fast
