//! The bad-input suite for models (issue 16): broken model files, each built
//! from the fixture model by editing its protobuf (no binary is committed),
//! each refused by the compile `check-config` and `run` share *and* by the
//! daemon's model load, with a message naming the tensor or key. The
//! unedited fixture passes both, so each refusal is the edit's doing.

use std::path::Path;

use ganomaly_core::onnx::check::{MAX_MODEL_BYTES, ORT_MEMORY_MARKER};
use ganomaly_core::onnx::proto::*;
use ganomalyd::config::ConfigError;
use ganomalyd::infer::Model;
use prost::Message;

mod support;

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(key.into()), value: Some(value.into()) }
}

/// A tensor whose data is "elsewhere": a file, or ONNX Runtime's memory marker.
fn outside(name: &str, location: &str) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![4],
        data_type: Some(DT_FLOAT),
        external_data: vec![entry("location", location), entry("offset", "140737488355328"), entry("length", "16")],
        data_location: Some(DL_EXTERNAL),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn tensor_attr(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { name: Some(name.into()), t: Some(t), r#type: Some(4), ..Default::default() }
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto { name: Some(name.into()), g: Some(g), r#type: Some(5), ..Default::default() }
}

fn output<'a>(m: &'a mut ModelProto, name: &str) -> &'a mut ValueInfoProto {
    let g = m.graph.as_mut().expect("graph");
    g.output.iter_mut().find(|o| o.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no output {name}"))
}

fn dims(v: &mut ValueInfoProto) -> &mut Vec<Dimension> {
    &mut v.r#type.as_mut().and_then(|t| t.tensor_type.as_mut()).and_then(|t| t.shape.as_mut()).expect("shape").dim
}

fn fixed(v: i64) -> Dimension {
    Dimension { dim_value: Some(v), dim_param: None }
}

type Edit = fn(&mut ModelProto);

/// Stands for the fixture's first initializer, named in backticks (its name
/// comes from the graph writer, so the test reads it from the fixture).
const FIRST_INIT: &str = "<first initializer>";

/// (file name, edit of the decoded fixture, what the message must name)
fn edits() -> Vec<(&'static str, Edit, Vec<&'static str>)> {
    vec![
        (
            "external_data_path",
            |m| {
                let t = &mut m.graph.as_mut().expect("graph").initializer[0];
                let name = t.name.clone().expect("named");
                *t = outside(&name, "../../etc/shadow");
            },
            vec![FIRST_INIT, "initializer", "../../etc/shadow", "external data"],
        ),
        (
            "ort_memory_marker",
            |m| {
                let t = &mut m.graph.as_mut().expect("graph").initializer[1];
                let name = t.name.clone().expect("named");
                *t = outside(&name, ORT_MEMORY_MARKER);
            },
            vec!["initializer", "_ORT_MEM_ADDR_"],
        ),
        (
            "marker_in_constant",
            |m| {
                let c = node(
                    "evil_const",
                    "Constant",
                    "c_out",
                    vec![tensor_attr("value", outside("c0", ORT_MEMORY_MARKER))],
                );
                m.graph.as_mut().expect("graph").node.insert(0, c);
            },
            vec!["`c0`", "node `evil_const` (Constant) attribute `value`", "_ORT_MEM_ADDR_"],
        ),
        (
            "external_in_subgraph",
            |m| {
                let inner =
                    node("inner", "Constant", "i_out", vec![tensor_attr("value", outside("deep", "/etc/passwd"))]);
                // Two levels down: an If inside a Loop body.
                let body = GraphProto {
                    name: Some("then".into()),
                    node: vec![node(
                        "nested_if",
                        "If",
                        "n_out",
                        vec![graph_attr(
                            "then_branch",
                            GraphProto { name: Some("deeper".into()), node: vec![inner], ..Default::default() },
                        )],
                    )],
                    ..Default::default()
                };
                let attr = AttributeProto {
                    name: Some("body".into()),
                    graphs: vec![GraphProto::default(), body],
                    r#type: Some(10),
                    ..Default::default()
                };
                m.graph.as_mut().expect("graph").node.push(node("evil_loop", "Loop", "l_out", vec![attr]));
            },
            vec!["`deep`", "node `evil_loop` (Loop) attribute `body`", "nested_if", "then_branch", "/etc/passwd"],
        ),
        (
            "external_in_tensors_attribute",
            |m| {
                let attr = AttributeProto {
                    name: Some("values".into()),
                    tensors: vec![
                        TensorProto { name: Some("fine".into()), ..Default::default() },
                        outside("t1", "w.bin"),
                    ],
                    r#type: Some(9),
                    ..Default::default()
                };
                m.graph.as_mut().expect("graph").node.push(node("evil_seq", "Custom", "s_out", vec![attr]));
            },
            vec!["`t1`", "attribute `values`", "w.bin"],
        ),
        (
            "external_sparse_initializer",
            |m| {
                let s = SparseTensorProto { values: Some(outside("sp", "sparse.bin")), indices: None, dims: vec![4] };
                m.graph.as_mut().expect("graph").sparse_initializer.push(s);
            },
            vec!["`sp`", "sparse initializer (values)", "sparse.bin"],
        ),
        (
            "output_missing",
            |m| m.graph.as_mut().expect("graph").output.retain(|o| o.name.as_deref() != Some("score_map")),
            vec!["output tensor `score_map`", "missing", "map_max"],
        ),
        (
            "output_shape_mismatch",
            |m| {
                let d = dims(output(m, "anomaly_map"));
                d[2] = fixed(16);
                d[3] = fixed(16);
            },
            vec!["output tensor `anomaly_map`", "[N, 1, 16, 16]", "[N, 1, 32, 32]"],
        ),
        (
            "output_wrong_type",
            |m| {
                let tt = output(m, "score").r#type.as_mut().and_then(|t| t.tensor_type.as_mut()).expect("tensor type");
                tt.elem_type = Some(DT_INT64);
            },
            vec!["output tensor `score`", "i64"],
        ),
        (
            "output_not_produced",
            |m| {
                let g = m.graph.as_mut().expect("graph");
                for n in &mut g.node {
                    for o in &mut n.output {
                        if o == "score_recon" {
                            *o = "elsewhere".into();
                        }
                    }
                }
            },
            vec!["output tensor `score_recon`", "no node produces it"],
        ),
        (
            "input_wrong_dims",
            |m| {
                let g = m.graph.as_mut().expect("graph");
                let d = dims(&mut g.input[0]);
                d[2] = fixed(64);
                d[3] = fixed(64);
            },
            vec!["input tensor `image`", "[N, 3, 64, 64]", "[N, 3, 32, 32]"],
        ),
        (
            "input_fixed_batch",
            |m| {
                let g = m.graph.as_mut().expect("graph");
                dims(&mut g.input[0])[0] = fixed(1);
            },
            vec!["input tensor `image`", "[1, 3, 32, 32]", "dynamic batch"],
        ),
        (
            "missing_metadata_key",
            |m| m.metadata_props.retain(|e| e.key.as_deref() != Some("ganomaly.arch")),
            vec!["ganomaly.arch", "missing"],
        ),
    ]
}

/// `check-config`'s compile refuses `model` with one problem naming `what`;
/// so does the daemon's load.
fn refused(dir: &Path, model: &Path, what: &[&str]) {
    let cfg = support::write_config(dir, model, 10, r#"{ kind = "synthetic", size = 48, variations = 2 }"#, "");
    let problems = match ganomalyd::config::load(&cfg) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(e) => panic!("{}: not a config problem: {e}", model.display()),
        Ok(_) => panic!("{}: check-config accepted it", model.display()),
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("cameras.cam.model: "), "{problems:?}");
    for w in what {
        assert!(problems[0].contains(w), "`{w}` missing from: {}", problems[0]);
    }
    let load = match Model::load(model, &support::cpu()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{}: the daemon loaded it", model.display()),
    };
    for w in what {
        assert!(load.contains(w), "`{w}` missing from the load error: {load}");
    }
}

#[test]
fn broken_models_are_refused_by_check_config_and_load_naming_the_tensor_or_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good_path = support::fixture_model(dir.path(), "good.onnx", 7);
    let good = std::fs::read(&good_path).expect("read");
    // The control: the unedited fixture passes both.
    let cfg = support::write_config(dir.path(), &good_path, 10, r#"{ kind = "synthetic", size = 48 }"#, "");
    ganomalyd::config::load(&cfg).expect("the fixture passes check-config");
    Model::load(&good_path, &support::cpu()).expect("the fixture loads");

    let fixture = ModelProto::decode(good.as_slice()).expect("decode");
    let first_init = fixture.graph.as_ref().and_then(|g| g.initializer[0].name.clone()).expect("an initializer");
    let mut count = 0;
    for (name, edit, what) in edits() {
        let mut m = fixture.clone();
        edit(&mut m);
        let path = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&path, m.encode_to_vec()).expect("write");
        let first = format!("`{first_init}`");
        let what: Vec<&str> = what.iter().map(|w| if *w == FIRST_INIT { first.as_str() } else { w }).collect();
        refused(dir.path(), &path, &what);
        count += 1;
    }

    // Cut in the middle: the decoder names the field it was in.
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &good[..good.len() / 2]).expect("write");
    refused(dir.path(), &truncated, &["not an ONNX model", "ModelProto.graph"]);
    count += 1;

    // Over the cap: a sparse file (its length, none of its blocks), refused
    // before a byte is read.
    let huge = dir.path().join("huge.onnx");
    std::fs::File::create(&huge).and_then(|f| f.set_len(MAX_MODEL_BYTES + 1)).expect("sparse file");
    refused(dir.path(), &huge, &["huge.onnx", &(MAX_MODEL_BYTES + 1).to_string(), "MAX_MODEL_BYTES"]);
    count += 1;
    assert!(count >= 10, "the suite has {count} broken models");
}

#[test]
fn the_binary_refuses_a_memory_marker_model_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read(support::fixture_model(dir.path(), "good.onnx", 7)).expect("read");
    let mut m = ModelProto::decode(good.as_slice()).expect("decode");
    let c = node("evil_const", "Constant", "c_out", vec![tensor_attr("value", outside("c0", ORT_MEMORY_MARKER))]);
    m.graph.as_mut().expect("graph").node.insert(0, c);
    let model = dir.path().join("marker.onnx");
    std::fs::write(&model, m.encode_to_vec()).expect("write");
    let cfg = support::write_config(dir.path(), &model, 10, r#"{ kind = "synthetic", size = 48 }"#, "");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ganomalyd"))
        .args(["check-config", cfg.to_str().expect("utf8")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run ganomalyd");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("cameras.cam.model") && text.contains("`c0`") && text.contains("_ORT_MEM_ADDR_"), "{text}");
}
