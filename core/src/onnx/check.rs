//! What a model file must be before anything runs it: a model is outside
//! data (copied onto a box, maybe by someone else), and ONNX Runtime acts on
//! more of the file than the daemon reads.
//!
//! - Size: at most [`MAX_MODEL_BYTES`], checked before the file is read (and
//!   the read itself stops there, so a FIFO or a growing file cannot exhaust
//!   memory either).
//! - No data outside the file: a tensor may name an external file
//!   (`external_data` / `data_location = EXTERNAL`, e.g. `../../etc/shadow`)
//!   or ONNX Runtime's in-memory marker ([`ORT_MEMORY_MARKER`], which makes it
//!   read process memory at an address the file gives). Whether a given ONNX
//!   Runtime build honours either is not ours to find out: both are refused
//!   wherever a tensor can sit: initializers, sparse initializers, node
//!   attributes (`t`, `tensors`, `sparse_tensor(s)`: Constant's `value`),
//!   subgraphs (`g`, `graphs`: If/Loop/Scan bodies) at any depth, model-local
//!   functions and training graphs.
//! - The graph agrees with its metadata: one input `image` f32
//!   `[N, C, S, S]` with N dynamic and C, S from `ganomaly.preprocess`; an
//!   output per listed score, f32 `[N]`; `anomaly_map` f32 `[N, 1, S, S]`;
//!   `recon`, when present, `[N, C, S, S]`; each produced by a node.
//! - Not a pruned graph ([`super::prune::KEY_PRUNED`] in its metadata): the
//!   daemon prunes the full model in memory; a pruned file lacks outputs its
//!   metadata lists and is refused by that key.
//!
//! `check-config` and the daemon's model load both run [`check_model_file`],
//! so a model that `check-config` accepts is one `run` loads. Every refusal
//! names the tensor (and where it sits) or the metadata key.

use std::io::Read;
use std::path::Path;

use prost::Message;

use super::proto::*;
use super::{props_of, OnnxError, INPUT, OUTPUT_MAP, OUTPUT_RECON};
use crate::metadata::ModelMetadata;

/// Largest model file read: 1 GiB. A protobuf cannot exceed 2 GiB at all; the
/// largest GANomaly this project trains in practice (128 px, ngf 32) is
/// about 13 MB, and a 256 px ngf 64 generator about 580 MB (a test holds
/// that one under the cap). The bound keeps a mistaken path (a video, a disk
/// image, `/dev/zero` behind a symlink) from being read into memory.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// The `location` ONNX Runtime reads as "the data is at this address of my
/// own memory" (its `offset` field is the address).
pub const ORT_MEMORY_MARKER: &str = "*/_ORT_MEM_ADDR_/*";

/// Reads a model file, refusing one over [`MAX_MODEL_BYTES`].
pub fn read_file(path: &Path) -> Result<Vec<u8>, OnnxError> {
    let io = |source| OnnxError::Io { path: path.display().to_string(), source };
    let too_large = |size| OnnxError::TooLarge { path: path.display().to_string(), size, max: MAX_MODEL_BYTES };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_MODEL_BYTES {
        return Err(too_large(size));
    }
    // The length above is only what the file said when asked: read one byte
    // past the bound to notice a file that grew (or a device that has no end).
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_MODEL_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_MODEL_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Reads and checks a model file (see the module doc); returns its metadata.
pub fn check_model_file(path: &Path) -> Result<ModelMetadata, OnnxError> {
    check_model(&read_file(path)?)
}

/// Checks a model's bytes (see the module doc); returns its metadata.
pub fn check_model(bytes: &[u8]) -> Result<ModelMetadata, OnnxError> {
    let model = ModelProto::decode(bytes)?;
    refuse_outside_data(&model)?;
    let props = props_of(&model);
    // A pruned graph lacks outputs its metadata lists: say so, not which one is missing.
    if let Some(outputs) = props.get(super::prune::KEY_PRUNED) {
        return Err(OnnxError::Pruned { key: super::prune::KEY_PRUNED, outputs: outputs.clone() });
    }
    let meta = ModelMetadata::from_props(&props)?;
    let graph = model.graph.as_ref().ok_or(OnnxError::NoGraph)?;
    check_graph(graph, &meta)?;
    Ok(meta)
}

/// Refuses any tensor of the model whose data is not inside the file.
pub fn refuse_outside_data(model: &ModelProto) -> Result<(), OnnxError> {
    if let Some(g) = &model.graph {
        graph(g, "")?;
    }
    for f in &model.functions {
        let at = format!("function `{}`", f.name.as_deref().unwrap_or(""));
        for a in &f.attribute_proto {
            attribute(a, &at)?;
        }
        nodes(&f.node, &format!("{at}: "))?;
    }
    for (i, t) in model.training_info.iter().enumerate() {
        for (part, g) in [("initialization", &t.initialization), ("algorithm", &t.algorithm)] {
            if let Some(g) = g {
                graph(g, &format!("training_info[{i}].{part}: "))?;
            }
        }
    }
    Ok(())
}

/// `at`: where this graph sits, as a prefix ending in ": " (empty for the main graph).
fn graph(g: &GraphProto, at: &str) -> Result<(), OnnxError> {
    for t in &g.initializer {
        tensor(t, &format!("{at}initializer"))?;
    }
    for s in &g.sparse_initializer {
        sparse(s, &format!("{at}sparse initializer"))?;
    }
    nodes(&g.node, at)
}

fn nodes(nodes: &[NodeProto], at: &str) -> Result<(), OnnxError> {
    for n in nodes {
        let node = format!("{at}node `{}` ({})", n.name.as_deref().unwrap_or(""), n.op_type.as_deref().unwrap_or("?"));
        for a in &n.attribute {
            attribute(a, &node)?;
        }
    }
    Ok(())
}

fn attribute(a: &AttributeProto, owner: &str) -> Result<(), OnnxError> {
    let at = format!("{owner} attribute `{}`", a.name.as_deref().unwrap_or(""));
    for t in a.t.iter().chain(&a.tensors) {
        tensor(t, &at)?;
    }
    for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
        sparse(s, &at)?;
    }
    for g in a.g.iter().chain(&a.graphs) {
        let name = g.name.as_deref().unwrap_or("");
        graph(g, &format!("{at} subgraph `{name}`: "))?;
    }
    Ok(())
}

fn sparse(s: &SparseTensorProto, at: &str) -> Result<(), OnnxError> {
    for (part, t) in [("values", &s.values), ("indices", &s.indices)] {
        if let Some(t) = t {
            tensor(t, &format!("{at} ({part})"))?;
        }
    }
    Ok(())
}

fn tensor(t: &TensorProto, at: &str) -> Result<(), OnnxError> {
    if t.external_data.is_empty() && t.data_location != Some(DL_EXTERNAL) {
        return Ok(());
    }
    let name = t.name.as_deref().filter(|n| !n.is_empty()).unwrap_or("(unnamed)");
    let location = t
        .external_data
        .iter()
        .find(|e| e.key.as_deref() == Some("location"))
        .and_then(|e| e.value.as_deref())
        .unwrap_or("(no location)");
    let marker = t.external_data.iter().any(|e| e.value.as_deref().is_some_and(|v| v.contains(ORT_MEMORY_MARKER)));
    let (tensor, place, location) = (shown(name), at.to_string(), shown(location));
    Err(if marker {
        OnnxError::MemoryMarker { tensor, place }
    } else {
        OnnxError::ExternalData { tensor, place, location }
    })
}

/// Text from the file as it may appear in a message: printable, bounded.
fn shown(s: &str) -> String {
    const MAX: usize = 120;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// Element type and dimensions (`None`: symbolic) of a graph input or output;
/// `None` when it declares no tensor shape.
fn shape_of(v: &ValueInfoProto) -> Option<(i32, Vec<Option<i64>>)> {
    let tt = v.r#type.as_ref()?.tensor_type.as_ref()?;
    let shape = tt.shape.as_ref()?;
    Some((tt.elem_type.unwrap_or(0), shape.dim.iter().map(|d| d.dim_value).collect()))
}

fn show_dims(dims: &[Option<i64>]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.map_or("N".to_string(), |v| v.to_string())).collect();
    format!("[{}]", d.join(", "))
}

fn elem_name(t: i32) -> String {
    match t {
        DT_FLOAT => "f32".into(),
        DT_INT64 => "i64".into(),
        0 => "an undeclared type".into(),
        other => format!("element type {other}"),
    }
}

/// The graph's input and outputs against what the metadata promises.
fn check_graph(g: &GraphProto, meta: &ModelMetadata) -> Result<(), OnnxError> {
    let (c, s) = (i64::from(meta.preprocess.color.channels()), i64::from(meta.preprocess.size));
    let fits = |got: &[Option<i64>], want: &[Option<i64>]| got == want;
    let n = None;

    // Initializers may also be listed as inputs in older files; they are not real inputs.
    let inits: std::collections::HashSet<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    let inputs: Vec<&ValueInfoProto> =
        g.input.iter().filter(|v| !v.name.as_deref().is_some_and(|n| inits.contains(n))).collect();
    let input = inputs.iter().find(|v| v.name.as_deref() == Some(INPUT)).ok_or_else(|| {
        let names: Vec<&str> = inputs.iter().map(|v| v.name.as_deref().unwrap_or("")).collect();
        OnnxError::Input(format!("the graph has no input tensor `{INPUT}` (inputs: {names:?})"))
    })?;
    if inputs.len() != 1 {
        let names: Vec<&str> = inputs.iter().map(|v| v.name.as_deref().unwrap_or("")).collect();
        return Err(OnnxError::Input(format!(
            "the graph has {} inputs {names:?}; only `{INPUT}` is expected",
            names.len()
        )));
    }
    // The batch dimension must be dynamic: frames from several cameras are
    // batched up to `max_batch`, and a fixed-batch graph would fail only
    // under load, exactly when the line is busy.
    let want = [n, Some(c), Some(s), Some(s)];
    match shape_of(input) {
        Some((DT_FLOAT, dims)) if fits(&dims, &want) => {}
        got => {
            let got = got
                .map_or("without a declared shape".to_string(), |(t, d)| format!("{} {}", elem_name(t), show_dims(&d)));
            return Err(OnnxError::Input(format!(
                "input tensor `{INPUT}` is {got}; its metadata (ganomaly.preprocess) needs f32 {} (N: a dynamic batch dimension)",
                show_dims(&want)
            )));
        }
    }

    let produced: std::collections::HashSet<&str> =
        g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    let mut required: Vec<(&str, Vec<Option<i64>>, String)> = meta
        .scores
        .iter()
        .map(|k| (k.kind.output(), vec![n], format!("the `{}` score listed in ganomaly.scores", k.kind.as_str())))
        .collect();
    required.push((OUTPUT_MAP, vec![n, Some(1), Some(s), Some(s)], "the snapshot heat map".into()));
    for k in &meta.scores {
        if let Some(map) = k.kind.map_output() {
            required.push((map, vec![n, Some(1), Some(s), Some(s)], format!("the `{}` score's map", k.kind.as_str())));
        }
    }
    for (name, want, why) in &required {
        let out = g.output.iter().find(|v| v.name.as_deref() == Some(*name)).ok_or_else(|| {
            let names: Vec<&str> = g.output.iter().map(|v| v.name.as_deref().unwrap_or("")).collect();
            OnnxError::Output {
                name: name.to_string(),
                reason: format!("missing from the graph's outputs {names:?} ({why})"),
            }
        })?;
        check_output(out, name, want, &produced)?;
    }
    if let Some(out) = g.output.iter().find(|v| v.name.as_deref() == Some(OUTPUT_RECON)) {
        check_output(out, OUTPUT_RECON, &[n, Some(c), Some(s), Some(s)], &produced)?;
    }
    Ok(())
}

fn check_output(
    out: &ValueInfoProto,
    name: &str,
    want: &[Option<i64>],
    produced: &std::collections::HashSet<&str>,
) -> Result<(), OnnxError> {
    let err = |reason: String| OnnxError::Output { name: name.to_string(), reason };
    match shape_of(out) {
        Some((DT_FLOAT, dims)) if dims == want => {}
        Some((t, dims)) => {
            return Err(err(format!(
                "is {} {}; the metadata needs f32 {} (N: the dynamic batch)",
                elem_name(t),
                show_dims(&dims),
                show_dims(want)
            )))
        }
        None => return Err(err(format!("declares no tensor shape; f32 {} is needed", show_dims(want)))),
    }
    if !produced.contains(name) {
        return Err(err("is listed as an output but no node produces it".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ArchSpec;
    use crate::onnx::random_model;

    fn small() -> ArchSpec {
        ArchSpec { isize: 32, nc: 1, nz: 8, ngf: 4, ndf: 4, extralayers: 0, ..Default::default() }
    }

    fn model() -> ModelProto {
        ModelProto::decode(random_model(&small(), 1).unwrap().as_slice()).unwrap()
    }

    fn external(location: &str) -> Vec<StringStringEntryProto> {
        vec![
            StringStringEntryProto { key: Some("location".into()), value: Some(location.into()) },
            StringStringEntryProto { key: Some("offset".into()), value: Some("0".into()) },
        ]
    }

    #[test]
    fn the_writers_own_models_pass() {
        let meta = check_model(&random_model(&small(), 1).unwrap()).expect("our own model");
        assert_eq!(meta.arch, small());
    }

    #[test]
    fn data_location_external_alone_is_refused_naming_the_tensor() {
        let mut m = model();
        let g = m.graph.as_mut().unwrap();
        let t = &mut g.initializer[0];
        t.data_location = Some(DL_EXTERNAL);
        t.raw_data = None;
        let name = t.name.clone().unwrap();
        let err = check_model(&m.encode_to_vec()).unwrap_err().to_string();
        assert!(err.contains(&format!("`{name}`")) && err.contains("(no location)"), "{err}");
    }

    #[test]
    fn function_and_training_graphs_are_walked() {
        let bad = TensorProto { name: Some("w".into()), external_data: external("x.bin"), ..Default::default() };
        let mut m = model();
        m.functions.push(FunctionProto {
            name: Some("f".into()),
            node: vec![],
            attribute_proto: vec![AttributeProto {
                name: Some("d".into()),
                t: Some(bad.clone()),
                ..Default::default()
            }],
        });
        let err = check_model(&m.encode_to_vec()).unwrap_err().to_string();
        assert!(err.contains("function `f`") && err.contains("x.bin"), "{err}");
        let mut m = model();
        m.training_info.push(TrainingInfoProto {
            initialization: Some(GraphProto { initializer: vec![bad], ..Default::default() }),
            algorithm: None,
        });
        let err = check_model(&m.encode_to_vec()).unwrap_err().to_string();
        assert!(err.contains("training_info[0].initialization") && err.contains("`w`"), "{err}");
    }

    #[test]
    fn text_from_the_file_is_escaped_and_bounded_in_messages() {
        let mut m = model();
        let long = format!("evil\n\u{1b}[31m{}", "x".repeat(500));
        m.graph.as_mut().unwrap().initializer[0].external_data = external(&long);
        let err = check_model(&m.encode_to_vec()).unwrap_err().to_string();
        assert!(!err.contains('\n') && !err.contains('\u{1b}') && err.contains("\\n"), "{err}");
        assert!(err.len() < 400, "{} bytes", err.len());
    }

    #[test]
    fn the_cap_holds_a_256_px_ngf_64_generator() {
        let arch = ArchSpec { isize: 256, nc: 3, nz: 100, ngf: 64, ndf: 64, extralayers: 0, ..Default::default() };
        let floats: usize = arch
            .generator_params()
            .iter()
            .chain(&arch.feature_stats_params())
            .map(|p| p.shape.iter().product::<usize>())
            .sum();
        let bytes = 4 * floats as u64;
        assert!(bytes > 400 << 20 && bytes < MAX_MODEL_BYTES, "{bytes} bytes");
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.onnx");
        // Sparse: the length is there, the blocks are not.
        std::fs::File::create(&p).unwrap().set_len(MAX_MODEL_BYTES + 1).unwrap();
        let err = read_file(&p).unwrap_err();
        assert!(matches!(err, OnnxError::TooLarge { size, .. } if size == MAX_MODEL_BYTES + 1), "{err}");
        assert!(err.to_string().contains("huge.onnx"), "{err}");
    }
}
