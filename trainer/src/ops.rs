//! libtorch ops that tch's bindings cannot call as the trainer needs them, through
//! a small C++ shim (`ops.cpp`, compiled by `build.rs`):
//! - [`leaky_relu`] with a slope: tch's `leaky_relu` drops its defaulted slope
//!   argument (always 0.01), and the PReLU stand-in costs about 15 % of a training
//!   step, its backward pass computing a weight gradient nobody asks for;
//! - [`fused_adam`]: `torch.optim.Adam(fused=True)`'s kernel, one pass per
//!   parameter instead of the seven kernels (and three temporaries) of Adam written
//!   with tch ops, whose `addcmul_`/`addcdiv_` have no `value` argument either.

// The crate's only unsafe code: calls into the shim, each with its SAFETY note.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

/// A libtorch error raised inside the shim (its message).
#[derive(Debug, thiserror::Error)]
#[error("libtorch: {0}")]
pub struct OpsError(String);

extern "C" {
    fn ganomaly_leaky_relu(x: *const C_tensor, slope: f64, out: *mut *mut C_tensor, err: *mut c_char, n: usize) -> i32;
    fn ganomaly_fused_adam(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Calls `f` with an error buffer; a non-zero return becomes the buffer's message.
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), OpsError> {
    let mut err = [0 as c_char; 512];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the buffer starts zeroed and snprintf leaves it NUL-terminated.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(OpsError(msg.to_string_lossy().into_owned()))
}

/// The handles of `ts`, for a TensorList argument; the tensors outlive the call.
fn handles<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<*mut C_tensor> {
    ts.into_iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

/// LeakyReLU with `slope` (`torch.nn.functional.leaky_relu`), with its autograd.
pub fn f_leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor, OpsError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `x` is a live tensor handle; on success the shim hands over a new one in `out`.
    call(|err, n| unsafe { ganomaly_leaky_relu(x.as_ptr(), slope, &mut out, err, n) })?;
    // SAFETY: `out` is the fresh handle the shim allocated; the Tensor now owns it.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// [`f_leaky_relu`], panicking on a libtorch error as tch's own ops do.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Tensor {
    f_leaky_relu(x, slope).unwrap_or_else(|e| panic!("leaky_relu: {e}"))
}

/// Adam's hyper-parameters for one [`fused_adam`] call; `step` is 1 on the first.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub step: i64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// One Adam step in place on `params` and their moments (all the same length and
/// order as `grads`), as `torch.optim.Adam(fused=True)` without weight decay.
pub fn fused_adam(
    params: &[&Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    s: AdamStep,
) -> Result<(), OpsError> {
    let n = params.len();
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        return Err(OpsError(format!(
            "fused_adam: {n} parameters, {} gradients, {} and {} moments",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        )));
    }
    let (p, g, m, v) = (handles(params.iter().copied()), handles(grads), handles(exp_avgs), handles(exp_avg_sqs));
    // SAFETY: four arrays of `n` live handles; the shim only reads them during the call.
    call(|err, len| unsafe {
        ganomaly_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            s.step as f64,
            s.lr,
            s.beta1,
            s.beta2,
            s.eps,
            err,
            len,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn leaky_relu_has_the_slope_and_its_gradient() {
        let x = Tensor::from_slice(&[-2.0f64, -0.5, 0.0, 1.5]).set_requires_grad(true);
        let y = leaky_relu(&x, 0.2);
        assert_eq!(Vec::<f64>::try_from(&y).unwrap(), vec![-0.4, -0.1, 0.0, 1.5]);
        let g = Tensor::run_backward(&[&y.sum(Kind::Double)], &[&x], false, false);
        assert_eq!(Vec::<f64>::try_from(&g[0]).unwrap(), vec![0.2, 0.2, 0.2, 1.0]);
    }

    #[test]
    fn errors_come_back_as_messages() {
        let p = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let g = [Tensor::zeros([3], (Kind::Float, Device::Cpu))];
        let (m, v) = ([p.zeros_like()], [p.zeros_like()]);
        let s = AdamStep { step: 1, lr: 0.1, beta1: 0.5, beta2: 0.999, eps: 1e-8 };
        let err = fused_adam(&[&p], &g, &m, &v, s).unwrap_err().to_string();
        assert!(err.starts_with("libtorch: fused_adam: tensor 0 has shape [3]"), "{err}");
        let err = fused_adam(&[&p], &[], &m, &v, s).unwrap_err().to_string();
        assert!(err.contains("1 parameters, 0 gradients"), "{err}");
    }
}
