//! The GANomaly network as data: layer lists for encoder, decoder, NetG and NetD,
//! and the parameter names and shapes every implementation (tch trainer, ONNX
//! writer, slow reference) agrees on.
//!
//! Parameter naming follows PyTorch's `nn.Sequential` indices, so that a layer's
//! weights are called e.g. `encoder1.3.weight` (the 4th module of encoder1):
//! `{part}.{index}.{param}` with `param` one of `weight`, `bias`,
//! `running_mean`, `running_var`. Convolutions carry no bias (as the reference).

use serde::{Deserialize, Serialize};

/// Errors in an architecture description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchError {
    #[error("isize must be a positive multiple of 16 (got {0})")]
    Isize(u32),
    #[error("nc must be 1 (gray) or 3 (RGB) (got {0})")]
    Channels(u32),
    #[error("{name} must be between 1 and {max} (got {value})")]
    Range { name: &'static str, value: u32, max: u32 },
}

/// Which generator design. Only the paper's is implemented today; the field is
/// in the metadata so that a later design cannot be mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GeneratorKind {
    #[default]
    Ganomaly,
}

/// Hyper-parameters that fix the network's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchSpec {
    /// Input side in pixels: the model sees `isize × isize` images.
    pub isize: u32,
    /// Image channels: 1 (gray) or 3 (RGB).
    pub nc: u32,
    /// Latent size (length of z).
    pub nz: u32,
    /// Base width of the generator's encoders/decoder.
    pub ngf: u32,
    /// Base width of the discriminator.
    pub ndf: u32,
    /// Extra 3×3 conv blocks at full-ish resolution in each encoder/decoder.
    pub extralayers: u32,
    #[serde(default)]
    pub generator: GeneratorKind,
}

impl Default for ArchSpec {
    /// The reference code's defaults.
    fn default() -> Self {
        ArchSpec { isize: 32, nc: 3, nz: 100, ngf: 64, ndf: 64, extralayers: 0, generator: GeneratorKind::Ganomaly }
    }
}

/// One module of a DCGAN-style `nn.Sequential`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// 2-D convolution without bias, square kernel.
    Conv {
        cin: u32,
        cout: u32,
        k: u32,
        s: u32,
        p: u32,
    },
    /// 2-D transposed convolution without bias, square kernel.
    ConvT {
        cin: u32,
        cout: u32,
        k: u32,
        s: u32,
        p: u32,
    },
    /// BatchNorm2d (eps 1e-5); in inference uses the running statistics.
    BatchNorm {
        c: u32,
    },
    LeakyRelu {
        slope: f32,
    },
    Relu,
    Tanh,
    Sigmoid,
}

/// BatchNorm epsilon of PyTorch's default, which every implementation must use.
pub const BN_EPS: f32 = 1e-5;

/// Initializer of the training images' mean feature vector (`mahalanobis` score).
pub const FEATURE_MEAN: &str = "score.feature_mean";
/// Initializer of the whitening matrix of the training images' feature vectors.
pub const FEATURE_WHITEN: &str = "score.feature_whiten";
/// Most values in the `mahalanobis` feature vector: the whitening matrix is its
/// square (1024² f32 = 4 MiB in the model file).
pub const FEATURE_DIM_MAX: u32 = 1024;

/// A module with its position in its sequential part.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// `{part}.{index}`, e.g. `decoder.4`.
    pub name: String,
    pub op: Op,
}

/// A named parameter and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Op {
    /// Parameters this op owns (names relative to the layer), with shapes.
    pub fn params(&self) -> Vec<(&'static str, Vec<usize>)> {
        match *self {
            Op::Conv { cin, cout, k, .. } => {
                vec![("weight", vec![cout as usize, cin as usize, k as usize, k as usize])]
            }
            // PyTorch stores ConvTranspose2d weights as [in, out, k, k].
            Op::ConvT { cin, cout, k, .. } => {
                vec![("weight", vec![cin as usize, cout as usize, k as usize, k as usize])]
            }
            Op::BatchNorm { c } => {
                let c = c as usize;
                vec![("weight", vec![c]), ("bias", vec![c]), ("running_mean", vec![c]), ("running_var", vec![c])]
            }
            _ => vec![],
        }
    }
}

impl ArchSpec {
    /// Every problem with the spec (not just the first).
    pub fn validate(&self) -> Result<(), Vec<ArchError>> {
        let mut errs = Vec::new();
        if self.isize == 0 || self.isize % 16 != 0 {
            errs.push(ArchError::Isize(self.isize));
        }
        // 1024 px would already be a 4 GB generator at ngf 64; refuse nonsense early.
        if self.isize > 1024 {
            errs.push(ArchError::Range { name: "isize", value: self.isize, max: 1024 });
        }
        if self.nc != 1 && self.nc != 3 {
            errs.push(ArchError::Channels(self.nc));
        }
        for (name, value, max) in [
            ("nz", self.nz, 4096),
            ("ngf", self.ngf, 1024),
            ("ndf", self.ndf, 1024),
            ("extralayers", self.extralayers + 1, 9),
        ] {
            if value == 0 || value > max {
                let value = if name == "extralayers" { value - 1 } else { value };
                errs.push(ArchError::Range { name, value, max: if name == "extralayers" { max - 1 } else { max } });
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// encoder1 of NetG (`nz` outputs).
    pub fn encoder1(&self) -> Vec<Layer> {
        encoder("encoder1", self.isize, self.nz, self.nc, self.ngf, self.extralayers)
    }
    /// The decoder of NetG.
    pub fn decoder(&self) -> Vec<Layer> {
        decoder("decoder", self.isize, self.nz, self.nc, self.ngf, self.extralayers)
    }
    /// encoder2 of NetG, applied to the reconstruction.
    pub fn encoder2(&self) -> Vec<Layer> {
        encoder("encoder2", self.isize, self.nz, self.nc, self.ngf, self.extralayers)
    }
    /// NetD as one sequence: features are all layers but the last two
    /// (final conv + sigmoid). Named `netd.{i}`.
    pub fn netd(&self) -> Vec<Layer> {
        let mut l = encoder("netd", self.isize, 1, self.nc, self.ndf, self.extralayers);
        let i = l.len();
        l.push(Layer { name: format!("netd.{i}"), op: Op::Sigmoid });
        l
    }

    /// All NetG parameters in a stable order.
    pub fn generator_params(&self) -> Vec<ParamSpec> {
        params_of(self.encoder1().iter().chain(self.decoder().iter()).chain(self.encoder2().iter()))
    }

    /// Index in `encoder1()` of the layer whose output the `mahalanobis` score
    /// reads: the last activation, the 4×4×C map just before the final conv
    /// that makes z_i (`encoder1.{i}.out`).
    pub fn feature_layer(&self) -> usize {
        self.encoder1().len() - 2
    }

    /// Channels C of that 4×4 map.
    pub fn feature_channels(&self) -> u32 {
        match self.encoder1().last().map(|l| l.op) {
            Some(Op::Conv { cin, .. }) => cin,
            _ => self.ngf,
        }
    }

    /// Side of the average-pooling window (1, 2 or 4) that brings the 4×4×C map
    /// down to at most [`FEATURE_DIM_MAX`] values.
    pub fn feature_pool(&self) -> u32 {
        let c = self.feature_channels();
        [1, 2, 4].into_iter().find(|p| c * (4 / p) * (4 / p) <= FEATURE_DIM_MAX).unwrap_or(4)
    }

    /// Length D of the feature vector: C × (4 / pool)².
    pub fn feature_dim(&self) -> usize {
        let side = 4 / self.feature_pool();
        (self.feature_channels() * side * side) as usize
    }

    /// Statistics of the training images' feature vectors that the `mahalanobis`
    /// score needs: their mean `score.feature_mean` `[D]` and the whitening matrix
    /// `score.feature_whiten` `[D, D]` (`WWᵀ` = inverse covariance).
    pub fn feature_stats_params(&self) -> Vec<ParamSpec> {
        let d = self.feature_dim();
        vec![
            ParamSpec { name: FEATURE_MEAN.into(), shape: vec![d] },
            ParamSpec { name: FEATURE_WHITEN.into(), shape: vec![d, d] },
        ]
    }

    /// All NetD parameters in a stable order.
    pub fn discriminator_params(&self) -> Vec<ParamSpec> {
        params_of(self.netd().iter())
    }

    /// Multiply-accumulates of one NetG forward pass per image (for fps/FLOP reports).
    pub fn generator_macs(&self) -> u64 {
        let mut total = 0u64;
        for part in [self.encoder1(), self.decoder(), self.encoder2()] {
            let mut size = self.isize as u64;
            let mut first = true;
            for layer in part {
                match layer.op {
                    Op::Conv { cin, cout, k, s, p } => {
                        let out = (size + 2 * p as u64 - k as u64) / s as u64 + 1;
                        total += out * out * (cin * cout * k * k) as u64;
                        size = out;
                    }
                    Op::ConvT { cin, cout, k, s, p } => {
                        let inp = if first { 1 } else { size };
                        let out = (inp - 1) * s as u64 + k as u64 - 2 * p as u64;
                        total += inp * inp * (cin * cout * k * k) as u64;
                        size = out;
                    }
                    _ => {}
                }
                first = false;
            }
        }
        total
    }
}

fn params_of<'a>(layers: impl Iterator<Item = &'a Layer>) -> Vec<ParamSpec> {
    layers
        .flat_map(|l| {
            l.op.params().into_iter().map(move |(p, shape)| ParamSpec { name: format!("{}.{p}", l.name), shape })
        })
        .collect()
}

/// The reference `Encoder`: isize → nz×1×1.
pub fn encoder(part: &str, isize: u32, nz: u32, nc: u32, ndf: u32, extralayers: u32) -> Vec<Layer> {
    let mut ops = vec![Op::Conv { cin: nc, cout: ndf, k: 4, s: 2, p: 1 }, Op::LeakyRelu { slope: 0.2 }];
    let (mut csize, mut c) = (isize / 2, ndf);
    for _ in 0..extralayers {
        ops.extend([Op::Conv { cin: c, cout: c, k: 3, s: 1, p: 1 }, Op::BatchNorm { c }, Op::LeakyRelu { slope: 0.2 }]);
    }
    while csize > 4 {
        ops.extend([
            Op::Conv { cin: c, cout: c * 2, k: 4, s: 2, p: 1 },
            Op::BatchNorm { c: c * 2 },
            Op::LeakyRelu { slope: 0.2 },
        ]);
        c *= 2;
        csize /= 2;
    }
    ops.push(Op::Conv { cin: c, cout: nz, k: 4, s: 1, p: 0 });
    name_ops(part, ops)
}

/// The reference `Decoder`: nz×1×1 → nc×isize×isize, ending in tanh.
pub fn decoder(part: &str, isize: u32, nz: u32, nc: u32, ngf: u32, extralayers: u32) -> Vec<Layer> {
    let (mut c, mut t) = (ngf / 2, 4);
    while t != isize {
        c *= 2;
        t *= 2;
    }
    let mut ops = vec![Op::ConvT { cin: nz, cout: c, k: 4, s: 1, p: 0 }, Op::BatchNorm { c }, Op::Relu];
    let mut csize = 4;
    while csize < isize / 2 {
        ops.extend([Op::ConvT { cin: c, cout: c / 2, k: 4, s: 2, p: 1 }, Op::BatchNorm { c: c / 2 }, Op::Relu]);
        c /= 2;
        csize *= 2;
    }
    for _ in 0..extralayers {
        ops.extend([Op::Conv { cin: c, cout: c, k: 3, s: 1, p: 1 }, Op::BatchNorm { c }, Op::Relu]);
    }
    ops.extend([Op::ConvT { cin: c, cout: nc, k: 4, s: 2, p: 1 }, Op::Tanh]);
    name_ops(part, ops)
}

fn name_ops(part: &str, ops: Vec<Op>) -> Vec<Layer> {
    ops.into_iter().enumerate().map(|(i, op)| Layer { name: format!("{part}.{i}"), op }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_shapes_at_isize_32() {
        let a = ArchSpec { isize: 32, nc: 3, nz: 100, ngf: 64, ndf: 64, extralayers: 0, ..Default::default() };
        let e = a.encoder1();
        // conv+lrelu, (conv+bn+lrelu)×2 (16→8→4), final conv.
        assert_eq!(e.len(), 2 + 3 * 2 + 1);
        assert_eq!(e[0].op, Op::Conv { cin: 3, cout: 64, k: 4, s: 2, p: 1 });
        assert_eq!(e.last().map(|l| l.op), Some(Op::Conv { cin: 256, cout: 100, k: 4, s: 1, p: 0 }));
        let d = a.decoder();
        assert_eq!(d[0].op, Op::ConvT { cin: 100, cout: 256, k: 4, s: 1, p: 0 });
        assert_eq!(d[d.len() - 2].op, Op::ConvT { cin: 64, cout: 3, k: 4, s: 2, p: 1 });
        assert_eq!(d.last().map(|l| l.op), Some(Op::Tanh));
        assert_eq!(d[3].name, "decoder.3");
    }

    #[test]
    fn parameter_count_matches_pytorch() {
        // PyTorch: NetG(isize 64, nc 3, nz 100, ngf 32) has 3,298,528 parameters
        // (incl. BN running stats counted here as params: +2 per BN channel).
        let a = ArchSpec { isize: 64, nc: 3, nz: 100, ngf: 32, ndf: 32, extralayers: 0, ..Default::default() };
        let learnable: usize = a
            .generator_params()
            .iter()
            .filter(|p| !p.name.ends_with("running_mean") && !p.name.ends_with("running_var"))
            .map(|p| p.shape.iter().product::<usize>())
            .sum();
        // enc: 3*32*16 + 32*64*16 + 64*128*16 + 128*256*16 + 256*100*16 + bn(64+128+256)*2
        let enc = 3 * 32 * 16 + 32 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 100 * 16 + (64 + 128 + 256) * 2;
        // dec: 100*256*16 + 256*128*16 + 128*64*16 + 64*32*16 + 32*3*16 + bn(256+128+64+32)*2
        let dec =
            100 * 256 * 16 + 256 * 128 * 16 + 128 * 64 * 16 + 64 * 32 * 16 + 32 * 3 * 16 + (256 + 128 + 64 + 32) * 2;
        assert_eq!(learnable, 2 * enc + dec);
    }

    #[test]
    fn validation_reports_every_problem() {
        let a = ArchSpec { isize: 30, nc: 2, nz: 0, ..Default::default() };
        let errs = a.validate().unwrap_err();
        assert!(errs.contains(&ArchError::Isize(30)));
        assert!(errs.contains(&ArchError::Channels(2)));
        assert!(errs.iter().any(|e| matches!(e, ArchError::Range { name: "nz", .. })));
        assert_eq!(errs.len(), 3);
    }

    #[test]
    fn feature_vector_of_the_mahalanobis_score_stays_bounded() {
        let at = |isize, ngf| ArchSpec { isize, ngf, ..Default::default() };
        // isize 32: 4×4 map of 4·ngf channels.
        let a = at(32, 16);
        assert_eq!((a.feature_channels(), a.feature_pool(), a.feature_dim()), (64, 1, 1024));
        assert_eq!(a.encoder1()[a.feature_layer()].op, Op::LeakyRelu { slope: 0.2 });
        let a = at(32, 64);
        assert_eq!((a.feature_channels(), a.feature_pool(), a.feature_dim()), (256, 2, 1024));
        let a = at(64, 64);
        assert_eq!((a.feature_channels(), a.feature_pool(), a.feature_dim()), (512, 4, 512));
        let a = at(256, 64);
        assert_eq!((a.feature_pool(), a.feature_dim()), (4, 2048), "C > 1024: global pooling is the floor");
    }

    #[test]
    fn netd_ends_in_one_logit_and_sigmoid() {
        let a = ArchSpec { isize: 64, ..Default::default() };
        let d = a.netd();
        assert_eq!(d.last().map(|l| l.op), Some(Op::Sigmoid));
        assert!(matches!(d[d.len() - 2].op, Op::Conv { cout: 1, k: 4, s: 1, p: 0, .. }));
    }
}
