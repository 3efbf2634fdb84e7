// libtorch ops the tch API cannot call as the trainer needs them (see ops.rs):
// tch's generated bindings drop every defaulted Scalar argument, so `leaky_relu`
// has no slope, and they leave out the TensorList kernels (`_fused_adam_`). Each function takes tch's tensor handles (`at::Tensor*`),
// catches every C++ exception and writes its message into `err` (never across
// the FFI boundary), and returns 0 on success.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/scalar_tensor.h>

#include <cstdio>
#include <exception>
#include <vector>

namespace {

int fail(const std::exception &e, char *err, size_t err_len) {
  if (err_len > 0) {
    std::snprintf(err, err_len, "%s", e.what());
  }
  return 1;
}

std::vector<at::Tensor> list(at::Tensor *const *ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    v.push_back(*ts[i]);
  }
  return v;
}

} // namespace

extern "C" {

// `*out` = LeakyReLU(x) with `slope`, through autograd as any tch op.
int ganomaly_leaky_relu(const at::Tensor *x, double slope, at::Tensor **out, char *err, size_t err_len) {
  try {
    *out = new at::Tensor(at::leaky_relu(*x, slope));
    return 0;
  } catch (const std::exception &e) {
    return fail(e, err, err_len);
  }
}

// One Adam step (torch.optim.Adam's, fused: no weight decay, no amsgrad) on `n`
// parameters, with their gradients and moments; `step` counts this step.
int ganomaly_fused_adam(at::Tensor *const *params, at::Tensor *const *grads, at::Tensor *const *exp_avgs,
                        at::Tensor *const *exp_avg_sqs, size_t n, double step, double lr, double beta1,
                        double beta2, double eps, char *err, size_t err_len) {
  try {
    if (n == 0) {
      return 0;
    }
    at::NoGradGuard no_grad;
    auto p = list(params, n);
    // The CPU kernel walks each tensor's storage as a flat array: check what it assumes.
    for (size_t i = 0; i < n; ++i) {
      for (const at::Tensor *t : {grads[i], exp_avgs[i], exp_avg_sqs[i]}) {
        TORCH_CHECK(t->sizes() == p[i].sizes() && t->is_contiguous() && p[i].is_contiguous(),
                    "fused_adam: tensor ", i, " has shape ", t->sizes(), " (contiguous ", t->is_contiguous(),
                    "), its parameter ", p[i].sizes(), " (contiguous ", p[i].is_contiguous(), ")");
      }
    }
    // The kernel reads the step count from one float tensor per parameter.
    auto steps = std::vector<at::Tensor>(
        n, at::scalar_tensor(step, at::TensorOptions().dtype(at::kFloat).device(p[0].device())));
    at::_fused_adam_(p, list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr, beta1, beta2,
                     0.0, eps, false, false);
    return 0;
  } catch (const std::exception &e) {
    return fail(e, err, err_len);
  }
}

} // extern "C"
