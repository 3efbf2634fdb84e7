//! Adam exactly as `torch.optim.Adam` (single-tensor path, no weight decay, no
//! amsgrad), written out so that its moments can be checkpointed: tch's optimiser
//! keeps them inside libtorch where a resumed run could not get them back.

use tch::Tensor;

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

    /// One update of `params` with `grads` (same order and length).
    pub fn step(&mut self, params: &[(String, Tensor)], grads: &[Tensor]) {
        let AdamConfig { lr, beta1, beta2, eps } = self.config;
        self.step += 1;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for (((_, p), g), (m, v)) in
                params.iter().zip(grads).zip(self.exp_avg.iter_mut().zip(self.exp_avg_sq.iter_mut()))
            {
                let _ = m.lerp_(g, 1.0 - beta1);
                let _ = v.g_mul_scalar_(beta2);
                let _ = v.addcmul_(&(g * (1.0 - beta2)), g);
                let mut denom = v.sqrt();
                let _ = denom.g_div_scalar_(bias_correction2_sqrt);
                let _ = denom.g_add_scalar_(eps);
                let mut p = p.shallow_clone();
                let _ = p.addcdiv_(&(&*m * -step_size), &denom);
            }
        });
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
}
