//! GANomaly as an ONNX file, written from Rust: the graph writer, a reader
//! for the metadata and weights of a file we wrote, and ([`check`]) what any
//! model file must be before it is run.
//!
//! The graph (opset 17, IR version 8, which ONNX Runtime 1.31 accepts):
//! - input `image` f32 `[N, C, S, S]` in [-1, 1], N dynamic;
//! - `z_i = encoder1(image)`, `recon = decoder(z_i)`, `z_o = encoder2(recon)`;
//! - `score` `[N]` = mean over nz of (z_i − z_o)² — the paper's score;
//! - `anomaly_map` `[N, 1, S, S]` = mean over channels of |image − recon|;
//! - `score_recon` `[N]` = mean of `anomaly_map`;
//! - `score_map` `[N]` = max of `anomaly_map` after a k×k box filter
//!   (AveragePool, stride 1, pad k/2, padding excluded from the mean);
//! - `recon` `[N, C, S, S]`;
//! - `score_mahalanobis` `[N]` = mean over D of ((f − μ)ᵀW)², only when the
//!   metadata lists the `mahalanobis` score; f is encoder1's last 4×4×C
//!   activation, average-pooled to D ≤ 1024 values and flattened; μ and W are the
//!   initializers `score.feature_mean` and `score.feature_whiten` (statistics of
//!   the training images' f).
//! - `score_patch` `[N]` and `patch_map` `[N, 1, S, S]`, only when the metadata
//!   lists the `patch` score ([`crate::patch`]): encoder1's maps named by its
//!   configuration, average-pooled or bilinearly upsampled (`Resize`, half-pixel)
//!   to a G×G grid, concatenated, the kept channels gathered (`[N, d, G, G]`);
//!   per position p, mean over d of ((fₚ − μₚ)ᵀWₚ)² (batched `MatMul` over
//!   `score.patch_mean` `[P, 1, d]`, `score.patch_whiten` `[P, d, d]`) is the
//!   G×G map (with the nearest-neighbour statistic instead: per position,
//!   z = (fₚ − c)·s per channel and min over the bank's columns bₘ of
//!   ‖z − bₘ‖² / d, as ‖z‖² − 2zᵀbₘ + ‖bₘ‖² by `MatMul` with `score.patch_bank`
//!   `[d, M]`, clamped at 0); `score_patch` is its maximum, `patch_map` its
//!   bilinear upsampling to S×S;
//! - `score_fused` `[N]`, only when the metadata lists `fused`: its components'
//!   outputs, standardised by `score.fusion_mean` / `score.fusion_std` `[K]`
//!   (from the metadata's recipe), combined by `ReduceMax` or `ReduceMean`.
//!
//! BatchNorm is written as `BatchNormalization` with the running statistics
//! (inference mode); ONNX Runtime folds it into the convolutions itself.

pub mod check;
pub mod proto;
pub mod prune;

use std::collections::BTreeMap;

use prost::Message;

use crate::arch::{ArchSpec, Layer, Op, BN_EPS, FEATURE_MEAN, FEATURE_WHITEN};
use crate::metadata::{Combine, MetadataError, ModelMetadata, ScoreKind, OUTPUT_PATCH_MAP};
use crate::patch::{PatchStatistic, PATCH_BANK, PATCH_CENTER, PATCH_MEAN, PATCH_SCALE, PATCH_WHITEN};
use crate::weights::{Tensor, Weights, WeightsError};
use proto::*;

/// Opset and IR version of the files we write.
pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;
pub const INPUT: &str = "image";
pub const OUTPUT_RECON: &str = "recon";
pub const OUTPUT_MAP: &str = "anomaly_map";
/// Initializers of the `fused` score's standardisation (from its metadata recipe).
pub const FUSION_MEAN: &str = "score.fusion_mean";
pub const FUSION_STD: &str = "score.fusion_std";

/// Errors writing or reading a model file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("not an ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("invalid architecture: {0}")]
    Arch(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("metadata does not match the weights: {0}")]
    Mismatch(String),
    #[error("model has no graph")]
    NoGraph,
    #[error("initializer `{name}`: {reason}")]
    Initializer { name: String, reason: String },
    #[error("cannot read model file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("model file {path} is {size} bytes; the limit is {max} bytes (MAX_MODEL_BYTES)")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("tensor `{tensor}` ({place}) keeps its data outside the model file (location `{location}`): external data is refused, the weights must be inside the file")]
    ExternalData { tensor: String, place: String, location: String },
    #[error("tensor `{tensor}` ({place}) points at ONNX Runtime's in-memory marker `*/_ORT_MEM_ADDR_/*` (data read from process memory): refused")]
    MemoryMarker { tensor: String, place: String },
    #[error("{0}")]
    Input(String),
    #[error("this graph was pruned to the outputs {outputs} ({key}) to run them alone: it is not a full model; use the file it was pruned from")]
    Pruned { key: &'static str, outputs: String },
    #[error("output tensor `{name}` {reason}")]
    Output { name: String, reason: String },
}

/// Shape of a graph input or output; `None` for a symbolic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub elem_type: i32,
    pub dims: Vec<Option<i64>>,
}

/// An uncalibrated model of `arch` with random generator weights from `seed`
/// (map_max kernel 5): the fixture tests and `ganomalyd bench` run when no
/// trained model is at hand.
pub fn random_model(arch: &ArchSpec, seed: u64) -> Result<Vec<u8>, OnnxError> {
    write_model(arch, &Weights::random_generator(arch, seed), &ModelMetadata::uncalibrated(*arch, 5))
}

/// Writes the GANomaly graph of `arch` with `weights` (checked against the
/// architecture) and `meta` in `metadata_props`. Returns the serialised bytes.
pub fn write_model(arch: &ArchSpec, weights: &Weights, meta: &ModelMetadata) -> Result<Vec<u8>, OnnxError> {
    arch.validate().map_err(|e| OnnxError::Arch(e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))?;
    if meta.arch != *arch {
        return Err(OnnxError::Mismatch(format!("metadata arch {:?} != {:?}", meta.arch, arch)));
    }
    // Re-check the metadata exactly as a reader will, so we never write a file we refuse.
    ModelMetadata::from_props(&meta.to_props())?;
    let kernel = meta.map_kernel().unwrap_or(1);
    if kernel > arch.isize {
        return Err(OnnxError::Mismatch(format!("map_max kernel {kernel} is larger than the image ({})", arch.isize)));
    }
    weights.check(&arch.generator_params())?;
    let mahalanobis = meta.score(ScoreKind::Mahalanobis).is_some();
    if mahalanobis {
        weights.check(&arch.feature_stats_params())?;
    }
    let patch = meta.patch();
    if let Some(spec) = patch {
        arch.check_patch(spec).map_err(|e| OnnxError::Mismatch(e.to_string()))?;
        weights.check(&arch.patch_params(spec))?;
    }
    let fusion = meta.fusion();

    let mut g = GraphBuilder::default();
    let z_i = g.sequential(&arch.encoder1(), INPUT, weights)?;
    let recon_pre = g.sequential(&arch.decoder(), &z_i, weights)?;
    // Give the reconstruction its public name with an Identity so every output
    // name is stable whatever the layer count.
    g.node("Identity", &[&recon_pre], OUTPUT_RECON, vec![]);
    let z_o = g.sequential(&arch.encoder2(), OUTPUT_RECON, weights)?;

    let diff = g.tmp("Sub", &[&z_i, &z_o], vec![]);
    let sq = g.tmp("Mul", &[&diff, &diff], vec![]);
    g.node("ReduceMean", &[&sq], ScoreKind::Latent.output(), vec![ints("axes", &[1, 2, 3]), int("keepdims", 0)]);

    let err = g.tmp("Sub", &[INPUT, OUTPUT_RECON], vec![]);
    let abs = g.tmp("Abs", &[&err], vec![]);
    g.node("ReduceMean", &[&abs], OUTPUT_MAP, vec![ints("axes", &[1]), int("keepdims", 1)]);
    g.node("ReduceMean", &[OUTPUT_MAP], ScoreKind::Recon.output(), vec![ints("axes", &[1, 2, 3]), int("keepdims", 0)]);
    let k = kernel as i64;
    let smooth = g.tmp(
        "AveragePool",
        &[OUTPUT_MAP],
        vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[1, 1]),
            ints("pads", &[k / 2, k / 2, k / 2, k / 2]),
            int("count_include_pad", 0),
        ],
    );
    g.node("ReduceMax", &[&smooth], ScoreKind::MapMax.output(), vec![ints("axes", &[1, 2, 3]), int("keepdims", 0)]);

    if mahalanobis {
        // The last 4×4×C activation of encoder1 (the input of the conv that makes
        // z_i), pooled to at most FEATURE_DIM_MAX values, flattened, centred on
        // the training mean, whitened; the mean of the squares is the squared
        // Mahalanobis distance / D.
        for p in arch.feature_stats_params() {
            g.init(&p.name, weights.get(&p.name)?);
        }
        let feat = format!("{}.out", arch.encoder1()[arch.feature_layer()].name);
        let pool = arch.feature_pool() as i64;
        let pooled = if pool > 1 {
            g.tmp("AveragePool", &[&feat], vec![ints("kernel_shape", &[pool, pool]), ints("strides", &[pool, pool])])
        } else {
            feat
        };
        let flat = g.tmp("Flatten", &[&pooled], vec![int("axis", 1)]);
        let centred = g.tmp("Sub", &[&flat, FEATURE_MEAN], vec![]);
        let white = g.tmp("MatMul", &[&centred, FEATURE_WHITEN], vec![]);
        let sq = g.tmp("Mul", &[&white, &white], vec![]);
        g.node("ReduceMean", &[&sq], ScoreKind::Mahalanobis.output(), vec![ints("axes", &[1]), int("keepdims", 0)]);
    }

    if let Some(spec) = patch {
        for p in arch.patch_params(spec) {
            g.init(&p.name, weights.get(&p.name)?);
        }
        let maps = arch.patch_maps(spec).map_err(|e| OnnxError::Mismatch(e.to_string()))?;
        let enc = arch.encoder1();
        let grid = spec.grid;
        let mut parts = Vec::new();
        for (i, m) in maps.iter().enumerate() {
            let name = format!("{}.out", enc[m.layer].name);
            let part = if m.side > grid {
                let k = i64::from(m.side / grid);
                g.tmp("AveragePool", &[&name], vec![ints("kernel_shape", &[k, k]), ints("strides", &[k, k])])
            } else if m.side < grid {
                let f = (grid / m.side) as f32;
                let scales = format!("score.patch_scale_{i}");
                g.init(&scales, &Tensor { shape: vec![4], data: vec![1.0, 1.0, f, f] });
                g.tmp("Resize", &[&name, "", &scales], resize_linear())
            } else {
                name
            };
            parts.push(part);
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let cat = if refs.len() > 1 { g.tmp("Concat", &refs, vec![int("axis", 1)]) } else { parts[0].clone() };
        let (d, p) = (spec.channels.len() as i64, i64::from(grid * grid));
        let channels: Vec<i64> = spec.channels.iter().map(|&c| i64::from(c)).collect();
        g.init_i64("score.patch_channels", &[d], &channels);
        let kept = g.tmp("Gather", &[&cat, "score.patch_channels"], vec![int("axis", 1)]);
        g.init_i64("score.patch_shape_ndp", &[3], &[0, d, p]);
        let flat = g.tmp("Reshape", &[&kept, "score.patch_shape_ndp"], vec![]);
        let np = match spec.statistic {
            PatchStatistic::Gaussian => {
                let pnd = g.tmp("Transpose", &[&flat], vec![ints("perm", &[2, 0, 1])]);
                let centred = g.tmp("Sub", &[&pnd, PATCH_MEAN], vec![]);
                let white = g.tmp("MatMul", &[&centred, PATCH_WHITEN], vec![]);
                let sq = g.tmp("Mul", &[&white, &white], vec![]);
                let dist = g.tmp("ReduceMean", &[&sq], vec![ints("axes", &[2]), int("keepdims", 0)]);
                g.tmp("Transpose", &[&dist], vec![ints("perm", &[1, 0])])
            }
            PatchStatistic::Nearest { .. } => {
                let npd = g.tmp("Transpose", &[&flat], vec![ints("perm", &[0, 2, 1])]);
                let centred = g.tmp("Sub", &[&npd, PATCH_CENTER], vec![]);
                let z = g.tmp("Mul", &[&centred, PATCH_SCALE], vec![]);
                // ‖z − b‖² = ‖z‖² − 2zᵀb + ‖b‖²: one MatMul instead of an [N, P, M, d] difference.
                let zz = g.tmp("ReduceSumSquare", &[&z], vec![ints("axes", &[2]), int("keepdims", 1)]);
                let cross = g.tmp("MatMul", &[&z, PATCH_BANK], vec![]);
                g.init("score.patch_minus_two", &Tensor { shape: vec![1], data: vec![-2.0] });
                let cross2 = g.tmp("Mul", &[&cross, "score.patch_minus_two"], vec![]);
                let bb = g.tmp("ReduceSumSquare", &[PATCH_BANK], vec![ints("axes", &[0]), int("keepdims", 1)]);
                let part = g.tmp("Add", &[&cross2, &zz], vec![]);
                let d2 = g.tmp("Add", &[&part, &bb], vec![]);
                let nearest = g.tmp("ReduceMin", &[&d2], vec![ints("axes", &[2]), int("keepdims", 0)]);
                // Rounding can take a distance just below 0; the Gaussian's map never is.
                let clamped = g.tmp("Relu", &[&nearest], vec![]);
                g.init("score.patch_inv_d", &Tensor { shape: vec![1], data: vec![1.0 / d as f32] });
                g.tmp("Mul", &[&clamped, "score.patch_inv_d"], vec![])
            }
        };
        let gside = i64::from(grid);
        g.init_i64("score.patch_shape_grid", &[4], &[-1, 1, gside, gside]);
        let grid_map = g.tmp("Reshape", &[&np, "score.patch_shape_grid"], vec![]);
        g.node(
            "ReduceMax",
            &[&grid_map],
            ScoreKind::Patch.output(),
            vec![ints("axes", &[1, 2, 3]), int("keepdims", 0)],
        );
        let up = (arch.isize / grid) as f32;
        g.init("score.patch_scale_map", &Tensor { shape: vec![4], data: vec![1.0, 1.0, up, up] });
        g.node("Resize", &[&grid_map, "", "score.patch_scale_map"], OUTPUT_PATCH_MAP, resize_linear());
    }

    if let Some(f) = fusion {
        let k = f.components.len();
        g.init_i64("score.fusion_shape", &[2], &[-1, 1]);
        let cols: Vec<String> =
            f.components.iter().map(|c| g.tmp("Reshape", &[c.output(), "score.fusion_shape"], vec![])).collect();
        let refs: Vec<&str> = cols.iter().map(String::as_str).collect();
        let cat = if k > 1 { g.tmp("Concat", &refs, vec![int("axis", 1)]) } else { cols[0].clone() };
        let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        g.init(FUSION_MEAN, &Tensor { shape: vec![k], data: as_f32(&f.mean) });
        g.init(FUSION_STD, &Tensor { shape: vec![k], data: as_f32(&f.std) });
        let centred = g.tmp("Sub", &[&cat, FUSION_MEAN], vec![]);
        let z = g.tmp("Div", &[&centred, FUSION_STD], vec![]);
        let op = match f.combine {
            Combine::Max => "ReduceMax",
            Combine::Mean => "ReduceMean",
        };
        g.node(op, &[&z], ScoreKind::Fused.output(), vec![ints("axes", &[1]), int("keepdims", 0)]);
    }

    let (c, s) = (arch.nc as i64, arch.isize as i64);
    let n = || Dim::Param("N");
    let graph = GraphProto {
        node: g.nodes,
        name: Some("ganomaly".into()),
        initializer: g.initializers,
        doc_string: Some("GANomaly NetG (encoder1 → decoder → encoder2) with anomaly scores".into()),
        input: vec![value_info(INPUT, &[n(), Dim::Fixed(c), Dim::Fixed(s), Dim::Fixed(s)])],
        output: vec![
            value_info(ScoreKind::Latent.output(), &[n()]),
            value_info(OUTPUT_RECON, &[n(), Dim::Fixed(c), Dim::Fixed(s), Dim::Fixed(s)]),
            value_info(OUTPUT_MAP, &[n(), Dim::Fixed(1), Dim::Fixed(s), Dim::Fixed(s)]),
            value_info(ScoreKind::Recon.output(), &[n()]),
            value_info(ScoreKind::MapMax.output(), &[n()]),
        ]
        .into_iter()
        .chain(mahalanobis.then(|| value_info(ScoreKind::Mahalanobis.output(), &[n()])))
        .chain(patch.is_some().then(|| value_info(ScoreKind::Patch.output(), &[n()])))
        .chain(
            patch.is_some().then(|| value_info(OUTPUT_PATCH_MAP, &[n(), Dim::Fixed(1), Dim::Fixed(s), Dim::Fixed(s)])),
        )
        .chain(fusion.is_some().then(|| value_info(ScoreKind::Fused.output(), &[n()])))
        .collect(),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some("ganomaly-core".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        domain: Some("ganomalyd".into()),
        model_version: Some(1),
        doc_string: Some("GANomaly anomaly detector exported by ganomaly-core".into()),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
        metadata_props: meta
            .to_props()
            .into_iter()
            .map(|(k, v)| StringStringEntryProto { key: Some(k), value: Some(v) })
            .collect(),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// Reads the `metadata_props` of a model (any ONNX file) into a map.
pub fn read_props(bytes: &[u8]) -> Result<BTreeMap<String, String>, OnnxError> {
    let model = ModelProto::decode(bytes)?;
    Ok(props_of(&model))
}

fn props_of(model: &ModelProto) -> BTreeMap<String, String> {
    model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone().unwrap_or_default(), e.value.clone().unwrap_or_default()))
        .collect()
}

/// The typed, checked metadata of a model file; errors name the bad key.
pub fn read_metadata(bytes: &[u8]) -> Result<ModelMetadata, OnnxError> {
    Ok(ModelMetadata::from_props(&read_props(bytes)?)?)
}

/// Metadata and generator weights of a model we wrote (for `eval`, fine-tuning).
pub fn read_model(bytes: &[u8]) -> Result<(ModelMetadata, Weights), OnnxError> {
    let model = ModelProto::decode(bytes)?;
    check::refuse_outside_data(&model)?;
    let meta = ModelMetadata::from_props(&props_of(&model))?;
    let graph = model.graph.ok_or(OnnxError::NoGraph)?;
    let mut weights = Weights::default();
    for t in graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        if t.data_type != Some(DT_FLOAT) {
            continue; // shape constants etc.
        }
        let data = if let Some(raw) = &t.raw_data {
            if raw.len() % 4 != 0 {
                return Err(OnnxError::Initializer {
                    name,
                    reason: format!("raw_data of {} bytes is not f32", raw.len()),
                });
            }
            raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        } else {
            t.float_data.clone()
        };
        let shape: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        weights.tensors.insert(name, Tensor { shape, data });
    }
    weights.check(&meta.arch.generator_params())?;
    Ok((meta, weights))
}

/// Declared inputs and outputs of any ONNX file (for clear errors on foreign models).
pub fn describe(bytes: &[u8]) -> Result<(Vec<TensorInfo>, Vec<TensorInfo>), OnnxError> {
    let model = ModelProto::decode(bytes)?;
    let graph = model.graph.ok_or(OnnxError::NoGraph)?;
    let info = |v: &ValueInfoProto| {
        let tt = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
        TensorInfo {
            name: v.name.clone().unwrap_or_default(),
            elem_type: tt.and_then(|t| t.elem_type).unwrap_or(0),
            dims: tt
                .and_then(|t| t.shape.as_ref())
                .map(|s| s.dim.iter().map(|d| d.dim_value).collect())
                .unwrap_or_default(),
        }
    };
    // Initializers may also be listed as inputs in older files; they are not real inputs.
    let inits: std::collections::HashSet<_> = graph.initializer.iter().filter_map(|t| t.name.clone()).collect();
    let inputs = graph.input.iter().filter(|v| !v.name.as_ref().is_some_and(|n| inits.contains(n))).map(info).collect();
    Ok((inputs, graph.output.iter().map(info).collect()))
}

enum Dim {
    Fixed(i64),
    Param(&'static str),
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(DT_FLOAT),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Dim::Fixed(v) => Dimension { dim_value: Some(*v), dim_param: None },
                            Dim::Param(p) => Dimension { dim_value: None, dim_param: Some((*p).into()) },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(AT_INT), ..Default::default() }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), ints: v.to_vec(), r#type: Some(AT_INTS), ..Default::default() }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(AT_STRING),
        ..Default::default()
    }
}

/// `Resize` as PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
fn resize_linear() -> Vec<AttributeProto> {
    vec![string("mode", "linear"), string("coordinate_transformation_mode", "half_pixel")]
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), f: Some(v), r#type: Some(AT_FLOAT), ..Default::default() }
}

#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
}

impl GraphBuilder {
    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(format!("{op}_{}", self.nodes.len())),
            op_type: Some(op.into()),
            attribute: attrs,
            domain: None,
        });
    }

    /// A node with a fresh output name, returned.
    fn tmp(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.counter += 1;
        let out = format!("t{}_{}", self.counter, op.to_lowercase());
        self.node(op, inputs, &out, attrs);
        out
    }

    fn init(&mut self, name: &str, t: &Tensor) {
        let raw: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            dims: t.shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(DT_FLOAT),
            float_data: vec![],
            name: Some(name.into()),
            raw_data: Some(raw),
            ..Default::default()
        });
    }

    fn init_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) {
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: Some(DT_INT64),
            float_data: vec![],
            name: Some(name.into()),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
    }

    /// Emits one `nn.Sequential` part; returns the name of its output.
    fn sequential(&mut self, layers: &[Layer], input: &str, w: &Weights) -> Result<String, OnnxError> {
        let mut x = input.to_string();
        for layer in layers {
            let p = |param: &str| format!("{}.{param}", layer.name);
            let out = format!("{}.out", layer.name);
            match layer.op {
                Op::Conv { k, s, p: pad, .. } | Op::ConvT { k, s, p: pad, .. } => {
                    let wname = p("weight");
                    self.init(&wname, w.get(&wname)?);
                    let (k, s, pad) = (k as i64, s as i64, pad as i64);
                    let op = if matches!(layer.op, Op::Conv { .. }) { "Conv" } else { "ConvTranspose" };
                    self.node(
                        op,
                        &[&x, &wname],
                        &out,
                        vec![
                            ints("kernel_shape", &[k, k]),
                            ints("strides", &[s, s]),
                            ints("pads", &[pad, pad, pad, pad]),
                        ],
                    );
                }
                Op::BatchNorm { .. } => {
                    let names = [p("weight"), p("bias"), p("running_mean"), p("running_var")];
                    for n in &names {
                        self.init(n, w.get(n)?);
                    }
                    self.node(
                        "BatchNormalization",
                        &[&x, &names[0], &names[1], &names[2], &names[3]],
                        &out,
                        vec![float("epsilon", BN_EPS)],
                    );
                }
                Op::LeakyRelu { slope } => self.node("LeakyRelu", &[&x], &out, vec![float("alpha", slope)]),
                Op::Relu => self.node("Relu", &[&x], &out, vec![]),
                Op::Tanh => self.node("Tanh", &[&x], &out, vec![]),
                Op::Sigmoid => self.node("Sigmoid", &[&x], &out, vec![]),
            }
            x = out;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::KEY_SCORES;

    fn small() -> ArchSpec {
        ArchSpec { isize: 32, nc: 1, nz: 8, ngf: 4, ndf: 4, extralayers: 1, ..Default::default() }
    }

    #[test]
    fn writes_reads_back_weights_and_metadata() {
        let arch = small();
        let w = Weights::random_generator(&arch, 3);
        let meta = ModelMetadata::uncalibrated(arch, 5);
        let bytes = write_model(&arch, &w, &meta).unwrap();
        let (m2, w2) = read_model(&bytes).unwrap();
        assert_eq!(m2, meta);
        for spec in arch.generator_params().into_iter().chain(arch.feature_stats_params()) {
            assert_eq!(w2.tensors[&spec.name], w.tensors[&spec.name], "{}", spec.name);
        }
        let (inputs, outputs) = describe(&bytes).unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0].name, "image");
        assert_eq!(inputs[0].dims, vec![None, Some(1), Some(32), Some(32)]);
        let names: Vec<_> = outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "score",
                "recon",
                "anomaly_map",
                "score_recon",
                "score_map",
                "score_mahalanobis",
                "score_patch",
                "patch_map",
                "score_fused"
            ]
        );
        let model = ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(model.ir_version, Some(IR_VERSION));
        assert_eq!(model.opset_import[0].version, Some(OPSET));
    }

    #[test]
    fn mahalanobis_output_only_when_listed_and_needs_its_statistics() {
        let arch = small();
        let mut w = Weights::random_generator(&arch, 3);
        let mut meta = ModelMetadata::uncalibrated(arch, 5);
        // `fused` reads `mahalanobis`: it goes too.
        meta.scores.retain(|s| s.kind != ScoreKind::Mahalanobis && s.kind != ScoreKind::Fused);
        let (_, outputs) = describe(&write_model(&arch, &w, &meta).unwrap()).unwrap();
        assert!(outputs.iter().all(|o| o.name != "score_mahalanobis"));
        w.tensors.remove(FEATURE_WHITEN);
        write_model(&arch, &w, &meta).expect("statistics are not needed without the score");
        let err = write_model(&arch, &w, &ModelMetadata::uncalibrated(arch, 5)).unwrap_err();
        assert!(err.to_string().contains(FEATURE_WHITEN), "{err}");
    }

    #[test]
    fn patch_and_fused_outputs_only_when_listed_and_checked() {
        let arch = small();
        let mut w = Weights::random_generator(&arch, 3);
        let mut meta = ModelMetadata::uncalibrated(arch, 5);
        // A fused score over a score the model does not list is refused by name.
        let mut m = meta.clone();
        m.scores.retain(|s| s.kind != ScoreKind::Patch);
        let err = write_model(&arch, &w, &m).unwrap_err();
        assert!(err.to_string().contains("`fused` component `patch` has no entry"), "{err}");
        meta.scores.retain(|s| s.kind != ScoreKind::Patch && s.kind != ScoreKind::Fused);
        let (_, outputs) = describe(&write_model(&arch, &w, &meta).unwrap()).unwrap();
        assert!(outputs.iter().all(|o| !o.name.contains("patch") && o.name != "score_fused"));
        w.tensors.remove(PATCH_WHITEN);
        write_model(&arch, &w, &meta).expect("patch statistics are not needed without the score");
        let err = write_model(&arch, &w, &ModelMetadata::uncalibrated(arch, 5)).unwrap_err();
        assert!(err.to_string().contains(PATCH_WHITEN), "{err}");
        // A patch configuration that does not fit the architecture is refused on read.
        let mut m = ModelMetadata::uncalibrated(arch, 5);
        m.scores.iter_mut().for_each(|s| {
            if let Some(p) = s.patch.as_mut() {
                p.maps = vec![9];
            }
        });
        let err = ModelMetadata::from_props(&m.to_props()).unwrap_err();
        assert!(err.to_string().contains("patch maps [9]"), "{err}");
        let mut m = ModelMetadata::uncalibrated(arch, 5);
        m.scores.iter_mut().for_each(|s| {
            if let Some(f) = s.fusion.as_mut() {
                f.std[1] = 0.0;
            }
        });
        let err = ModelMetadata::from_props(&m.to_props()).unwrap_err();
        assert!(err.to_string().contains("positive stds"), "{err}");
    }

    #[test]
    fn refuses_weights_that_do_not_fit() {
        let arch = small();
        let mut w = Weights::random_generator(&arch, 3);
        w.tensors.remove("encoder2.0.weight");
        let err = write_model(&arch, &w, &ModelMetadata::uncalibrated(arch, 5)).unwrap_err();
        assert!(err.to_string().contains("encoder2.0.weight"), "{err}");
    }

    #[test]
    fn reader_names_bad_metadata_key() {
        let arch = small();
        let bytes =
            write_model(&arch, &Weights::random_generator(&arch, 3), &ModelMetadata::uncalibrated(arch, 5)).unwrap();
        let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
        model.metadata_props.retain(|e| e.key.as_deref() != Some(KEY_SCORES));
        let err = read_metadata(&model.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains(KEY_SCORES), "{err}");
        let err = read_metadata(b"definitely not protobuf \xff\xff\xff").unwrap_err();
        assert!(err.to_string().starts_with("not an ONNX model"), "{err}");
    }
}
