//! Adam as `torch.optim.Adam` (no weight decay, no amsgrad), its moments kept here
//! so that they can be checkpointed: tch's optimiser keeps them inside libtorch
//! where a resumed run could not get them back. The update is libtorch's fused
//! kernel ([`crate::ops::fused_adam`]).

use tch::Tensor;

use crate::ops::{fused_adam, AdamStep};

/// Adam's hyper-parameters; the reference uses lr 2e-4, betas (0.5, 0.999).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// Moments of one parameter list, in the same order as the parameters.
pub struct Adam {
    pub config: AdamConfig,
    /// Steps taken so far (PyTorch's `state['step']`).
    pub step: i64,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl Adam {
    pub fn new(config: AdamConfig, params: &[(String, Tensor)]) -> Adam {
        let zeros = || params.iter().map(|(_, p)| p.zeros_like()).collect();
        Adam { config, step: 0, exp_avg: zeros(), exp_avg_sq: zeros() }
    }

    /// One update of `params` with `grads` (same order and length), by libtorch's
    /// fused kernel (`torch.optim.Adam(fused=True)`): the same update as the
    /// single-tensor path within float rounding, in one pass over each tensor.
    pub fn step(&mut self, params: &[(String, Tensor)], grads: &[Tensor]) {
        let AdamConfig { lr, beta1, beta2, eps } = self.config;
        self.step += 1;
        let p: Vec<&Tensor> = params.iter().map(|(_, p)| p).collect();
        let s = AdamStep { step: self.step, lr, beta1, beta2, eps };
        // The lists are built together (Adam::new, trainable()): a failure is a bug.
        fused_adam(&p, grads, &self.exp_avg, &self.exp_avg_sq, s).unwrap_or_else(|e| panic!("Adam step: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_torch_adam_by_hand() {
        // Two steps on a scalar, against torch.optim.Adam's formulas written out.
        let p = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
        let params = vec![("p".to_string(), p.shallow_clone())];
        let cfg = AdamConfig { lr: 0.1, beta1: 0.5, beta2: 0.999, eps: 1e-8 };
        let mut adam = Adam::new(cfg, &params);
        let (mut m, mut v, mut x) = (0.0f64, 0.0f64, 1.0f64);
        for (t, g) in [(1, 2.0f64), (2, -1.0)] {
            adam.step(&params, &[Tensor::from_slice(&[g])]);
            m = 0.5 * m + 0.5 * g;
            v = 0.999 * v + 0.001 * g * g;
            let mhat = m / (1.0 - 0.5f64.powi(t));
            let vhat_sqrt = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt();
            x -= 0.1 * mhat / (vhat_sqrt + 1e-8);
            assert!((p.double_value(&[0]) - x).abs() < 1e-12, "step {t}: {} vs {x}", p.double_value(&[0]));
        }
        assert_eq!(adam.step, 2);
    }

    #[test]
    fn matches_the_single_tensor_update_on_float_tensors() {
        // torch.optim.Adam's single-tensor path written with tch ops (what this module
        // ran before the fused kernel), against the fused step: 20 steps on three
        // float tensors of the shapes a network has, random gradients each step.
        let cfg = AdamConfig { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 };
        let (params, grads) = crate::net::seeded(3, || {
            let params: Vec<(String, Tensor)> = [vec![64, 1, 4, 4], vec![128], vec![7]]
                .into_iter()
                .enumerate()
                .map(|(i, shape)| (format!("p{i}"), Tensor::randn(shape, (tch::Kind::Float, tch::Device::Cpu))))
                .collect();
            let grads: Vec<Vec<Tensor>> =
                (0..20).map(|_| params.iter().map(|(_, p)| p.randn_like() * 0.1).collect()).collect();
            (params, grads)
        });
        let start: Vec<Tensor> = params.iter().map(|(_, p)| p.copy()).collect();
        let reference: Vec<Tensor> = params.iter().map(|(_, p)| p.copy()).collect();
        let (mut m, mut v): (Vec<Tensor>, Vec<Tensor>) =
            reference.iter().map(|p| (p.zeros_like(), p.zeros_like())).unzip();
        let mut adam = Adam::new(cfg, &params);
        for (t, g) in grads.iter().enumerate() {
            adam.step(&params, g);
            let t = t as i32 + 1;
            let step_size = cfg.lr / (1.0 - cfg.beta1.powi(t));
            let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
            for (((p, g), m), v) in reference.iter().zip(g).zip(&mut m).zip(&mut v) {
                let _ = m.lerp_(g, 1.0 - cfg.beta1);
                let _ = v.g_mul_scalar_(cfg.beta2);
                let _ = v.addcmul_(&(g * (1.0 - cfg.beta2)), g);
                let denom = v.sqrt() / bc2_sqrt + cfg.eps;
                let _ = p.shallow_clone().addcdiv_(&(&*m * -step_size), &denom);
            }
        }
        let max_abs = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        for (i, (name, p)) in params.iter().enumerate() {
            // Adam moves each weight by up to lr per step: 20 steps move them by ~1e-3.
            assert!(max_abs(p, &start[i]) > 1e-3, "{name} did not move");
            assert!(max_abs(p, &reference[i]) < 1e-6, "{name}: {}", max_abs(p, &reference[i]));
            assert!(max_abs(&adam.exp_avg[i], &m[i]) < 1e-7, "{name} exp_avg");
            assert!(max_abs(&adam.exp_avg_sq[i], &v[i]) < 1e-8, "{name} exp_avg_sq");
        }
        assert_eq!(adam.step, 20);
    }
}
