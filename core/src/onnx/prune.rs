//! Graphs cut down to what some of their outputs need (issue 17, item 1).
//!
//! Every frame of a camera that scores `mahalanobis` needs encoder 1 alone,
//! yet the whole graph runs encoder 1, the decoder and encoder 2. [`Pruner`]
//! keeps, of any ONNX graph, the nodes the wanted outputs transitively read
//! (through subgraph bodies too), the initializers those nodes read, and the
//! wanted outputs; everything else goes. The metadata stays, with
//! [`KEY_PRUNED`] added (the outputs kept), so a pruned file is never taken
//! for a full model: [`super::check::check_model`] refuses it by that key.
//!
//! The pruned model is decoded and re-encoded with the messages of
//! `proto.rs`: fields not declared there are dropped. Those are shape hints
//! (`value_info`), documentation strings and quantisation annotations, none
//! of which ONNX Runtime needs to run the graph; every field that carries
//! data (tensor payloads, attribute values) is declared.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use prost::Message;

use super::proto::*;
use super::{OnnxError, OUTPUT_MAP};
use crate::metadata::{ModelMetadata, ScoreKind};

/// Metadata key of a pruned model: the outputs it keeps, comma-separated.
pub const KEY_PRUNED: &str = "ganomaly.pruned";

/// Ops that do a layer's worth of arithmetic; everything else in a GANomaly
/// graph (activations, reductions, element-wise ops, reshapes) is cheap beside them.
const HEAVY_OPS: [&str; 4] = ["Conv", "ConvTranspose", "MatMul", "Gemm"];

/// The outputs a camera scoring with `kind` needs the graph to produce:
/// its score, and for `fused` its components too (their nodes run anyway, so
/// exporting them is free, and it keeps them visible).
pub fn score_outputs(meta: &ModelMetadata, kind: ScoreKind) -> Vec<&'static str> {
    let mut out = vec![kind.output()];
    if let Some(f) = meta.fusion().filter(|_| kind == ScoreKind::Fused) {
        out.extend(f.components.iter().map(|c| c.output()));
    }
    out
}

/// The heat map a camera scoring with `kind` is shown: that score's own map
/// when the model exports it (`patch_map`), else the reconstruction map
/// `anomaly_map` (as the daemon's snapshots have always drawn it).
pub fn map_output(meta: &ModelMetadata, kind: ScoreKind) -> &'static str {
    kind.map_output().filter(|_| meta.score(kind).is_some()).unwrap_or(OUTPUT_MAP)
}

/// A decoded graph, ready to be cut to several output sets.
pub struct Pruner {
    model: ModelProto,
    /// Output name → the node producing it.
    producer: HashMap<String, usize>,
}

/// How a session that scores `main` and sometimes draws `maps` is split:
/// the outputs of the graph run on every frame, and those of the graph run
/// only for the frames whose heat map is asked for (empty: none needed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    pub every_frame: Vec<String>,
    pub on_demand: Vec<String>,
}

impl Pruner {
    pub fn new(bytes: &[u8]) -> Result<Pruner, OnnxError> {
        let model = ModelProto::decode(bytes)?;
        let graph = model.graph.as_ref().ok_or(OnnxError::NoGraph)?;
        let mut producer = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(o.clone(), i);
            }
        }
        Ok(Pruner { model, producer })
    }

    fn graph(&self) -> &GraphProto {
        // `new` refused a model without one.
        self.model.graph.as_ref().expect("checked in Pruner::new")
    }

    /// Names of the graph's declared outputs.
    pub fn outputs(&self) -> Vec<&str> {
        self.graph().output.iter().filter_map(|v| v.name.as_deref()).collect()
    }

    /// Indices of the nodes that `outputs` transitively need. An output the
    /// graph does not declare is an error naming it and the ones it has.
    pub fn needed_nodes(&self, outputs: &[&str]) -> Result<BTreeSet<usize>, OnnxError> {
        let declared = self.outputs();
        if let Some(bad) = outputs.iter().find(|o| !declared.contains(o)) {
            return Err(OnnxError::Output {
                name: bad.to_string(),
                reason: format!("cannot be kept: the graph's outputs are {declared:?}"),
            });
        }
        let nodes = &self.graph().node;
        let mut kept = BTreeSet::new();
        let mut todo: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        let mut seen: HashSet<String> = todo.iter().cloned().collect();
        while let Some(name) = todo.pop() {
            let Some(&i) = self.producer.get(&name) else { continue }; // graph input or initializer
            if !kept.insert(i) {
                continue;
            }
            let mut reads = Vec::new();
            node_reads(&nodes[i], &mut reads);
            for r in reads {
                if !r.is_empty() && seen.insert(r.clone()) {
                    todo.push(r);
                }
            }
        }
        Ok(kept)
    }

    /// How many heavy ops (convolutions, matrix products) `nodes` hold.
    pub fn heavy_ops(&self, nodes: &BTreeSet<usize>) -> usize {
        let all = &self.graph().node;
        nodes.iter().filter(|&&i| all[i].op_type.as_deref().is_some_and(|op| HEAVY_OPS.contains(&op))).count()
    }

    /// Splits a session's outputs: `scores` run on every frame; each map of
    /// `maps` joins them when it costs no heavy op beyond what the scores
    /// already run (the reconstruction map of a `latent` camera: a
    /// subtraction and a mean over the decoder's output, a copy to take out),
    /// and is otherwise left to a second graph run only on the frames whose
    /// map is asked for (that of a `mahalanobis` camera needs the decoder).
    pub fn split(&self, scores: &[&str], maps: &[&str]) -> Result<Split, OnnxError> {
        let base = self.needed_nodes(scores)?;
        let mut split = Split { every_frame: dedup(scores), on_demand: Vec::new() };
        for m in dedup(maps) {
            let with = self.needed_nodes(&[m.as_str()])?;
            let extra: BTreeSet<usize> = with.difference(&base).copied().collect();
            if self.heavy_ops(&extra) == 0 {
                if !split.every_frame.contains(&m) {
                    split.every_frame.push(m);
                }
            } else {
                split.on_demand.push(m);
            }
        }
        Ok(split)
    }

    /// The model with only what `outputs` need: their nodes (in the original,
    /// topological order), the initializers and sparse initializers those read,
    /// the graph inputs (all real inputs are kept, so the model's interface
    /// stays), and `outputs` in the order given. `metadata_props` are kept,
    /// with [`KEY_PRUNED`] naming the outputs.
    pub fn prune(&self, outputs: &[&str]) -> Result<Vec<u8>, OnnxError> {
        let outputs = dedup(outputs);
        let names: Vec<&str> = outputs.iter().map(String::as_str).collect();
        let kept = self.needed_nodes(&names)?;
        let src = self.graph();
        let node: Vec<NodeProto> = kept.iter().map(|&i| src.node[i].clone()).collect();
        let mut read = Vec::new();
        for n in &node {
            node_reads(n, &mut read);
        }
        let read: HashSet<String> = read.into_iter().chain(outputs.iter().cloned()).collect();
        let inits: HashSet<&str> = src.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
        let graph = GraphProto {
            node,
            initializer: src
                .initializer
                .iter()
                .filter(|t| t.name.as_ref().is_some_and(|n| read.contains(n)))
                .cloned()
                .collect(),
            sparse_initializer: src
                .sparse_initializer
                .iter()
                .filter(|s| s.values.as_ref().and_then(|v| v.name.as_ref()).is_some_and(|n| read.contains(n)))
                .cloned()
                .collect(),
            // Initializers listed as inputs (older files) go with their initializer.
            input: src
                .input
                .iter()
                .filter(|v| v.name.as_deref().is_some_and(|n| !inits.contains(n) || read.contains(n)))
                .cloned()
                .collect(),
            output: names
                .iter()
                .filter_map(|o| src.output.iter().find(|v| v.name.as_deref() == Some(*o)).cloned())
                .collect(),
            ..src.clone()
        };
        let mut model = self.model.clone();
        model.graph = Some(graph);
        model.metadata_props.retain(|e| e.key.as_deref() != Some(KEY_PRUNED));
        model
            .metadata_props
            .push(StringStringEntryProto { key: Some(KEY_PRUNED.into()), value: Some(outputs.join(",")) });
        Ok(model.encode_to_vec())
    }
}

/// Prunes `bytes` to `outputs` (see [`Pruner::prune`]).
pub fn prune(bytes: &[u8], outputs: &[&str]) -> Result<Vec<u8>, OnnxError> {
    Pruner::new(bytes)?.prune(outputs)
}

/// The outputs a pruned model keeps, from its metadata; `None` for a full model.
pub fn pruned_to(props: &BTreeMap<String, String>) -> Option<Vec<String>> {
    props.get(KEY_PRUNED).map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
}

/// Every value name a node reads: its inputs, and whatever the nodes of its
/// subgraph bodies (If/Loop/Scan) read from the enclosing graph. Names a body
/// defines itself are included too; they match no outer node, so the
/// over-approximation keeps nothing extra.
fn node_reads(n: &NodeProto, into: &mut Vec<String>) {
    into.extend(n.input.iter().cloned());
    for a in &n.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            for inner in &g.node {
                node_reads(inner, into);
            }
        }
    }
}

fn dedup(names: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{ArchSpec, FEATURE_MEAN, FEATURE_WHITEN};
    use crate::onnx::{describe, random_model, read_props, OUTPUT_RECON};

    fn arch() -> ArchSpec {
        ArchSpec { isize: 32, nc: 1, nz: 8, ngf: 4, ndf: 4, extralayers: 1, ..Default::default() }
    }

    fn decoded(bytes: &[u8]) -> GraphProto {
        ModelProto::decode(bytes).unwrap().graph.unwrap()
    }

    fn prefixed(g: &GraphProto, prefix: &str) -> (usize, usize) {
        let nodes = g.node.iter().filter(|n| n.input.iter().chain(&n.output).any(|v| v.starts_with(prefix))).count();
        let inits = g.initializer.iter().filter(|t| t.name.as_deref().is_some_and(|n| n.starts_with(prefix))).count();
        (nodes, inits)
    }

    #[test]
    fn keeping_every_output_keeps_the_whole_graph() {
        let full = random_model(&arch(), 1).unwrap();
        let p = Pruner::new(&full).unwrap();
        let all = p.outputs().iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let (a, b) = (decoded(&full), decoded(&p.prune(&refs).unwrap()));
        assert_eq!(
            (b.node.len(), b.initializer.len(), b.output.len()),
            (a.node.len(), a.initializer.len(), a.output.len())
        );
        assert_eq!(b.node, a.node);
    }

    #[test]
    fn mahalanobis_alone_drops_the_decoder_and_encoder2() {
        let full = random_model(&arch(), 1).unwrap();
        let g = decoded(&full);
        let pruned = prune(&full, &[ScoreKind::Mahalanobis.output()]).unwrap();
        let p = decoded(&pruned);
        assert_eq!(prefixed(&p, "decoder."), (0, 0));
        assert_eq!(prefixed(&p, "encoder2."), (0, 0));
        // Encoder 1 stays, minus its last conv (the one making z_i): the feature is the activation before it.
        let (n1, i1) = prefixed(&g, "encoder1.");
        let (pn, pi) = prefixed(&p, "encoder1.");
        assert!(pn > 0 && pn < n1 && pi > 0 && pi < i1, "encoder1 nodes {pn}/{n1}, initializers {pi}/{i1}");
        let inits: Vec<&str> = p.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
        assert!(inits.contains(&FEATURE_MEAN) && inits.contains(&FEATURE_WHITEN), "{inits:?}");
        assert!(inits.iter().all(|n| !n.starts_with("score.patch") && !n.starts_with("score.fusion")), "{inits:?}");
        // Every initializer kept is read by a kept node.
        let read: HashSet<&str> = p.node.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
        assert!(inits.iter().all(|i| read.contains(i)));
        let (inputs, outputs) = describe(&pruned).unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!(outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["score_mahalanobis"]);
        // The file shrinks by at least the decoder's and encoder 2's weights.
        let dropped: usize = g
            .initializer
            .iter()
            .filter(|t| t.name.as_deref().is_some_and(|n| n.starts_with("decoder.") || n.starts_with("encoder2.")))
            .map(|t| t.raw_data.as_ref().map_or(0, Vec::len))
            .sum();
        assert!(dropped > 0 && full.len() - pruned.len() >= dropped, "{} of {} bytes", pruned.len(), full.len());
    }

    #[test]
    fn counts_follow_what_each_score_reads() {
        let full = random_model(&arch(), 1).unwrap();
        let p = Pruner::new(&full).unwrap();
        let n = |outs: &[&str]| p.needed_nodes(outs).unwrap().len();
        let total = decoded(&full).node.len();
        let latent = n(&["score"]);
        // The latent score reads the whole generator but none of the map, mahalanobis, patch or fusion nodes.
        assert!(latent < total);
        assert_eq!(n(&["score", "score_recon"]), latent + 4, "Sub, Abs, ReduceMean (map), ReduceMean (mean)");
        // Fused reads its three components, and a few nodes of its own.
        let fused = p.needed_nodes(&["score_fused"]).unwrap();
        let parts = p.needed_nodes(&["score", "score_mahalanobis", "score_patch"]).unwrap();
        assert!(fused.is_superset(&parts) && fused.len() > parts.len());
        let g = decoded(&p.prune(&["score_recon"]).unwrap());
        assert_eq!(prefixed(&g, "encoder2."), (0, 0), "the reconstruction error needs no second encoder");
        assert!(g.node.iter().any(|n| n.output == [OUTPUT_RECON]));
        assert_eq!(g.output.len(), 1);
    }

    #[test]
    fn metadata_is_kept_and_says_pruned() {
        let full = random_model(&arch(), 1).unwrap();
        let before = read_props(&full).unwrap();
        let pruned = prune(&full, &["score_patch", "patch_map"]).unwrap();
        let after = read_props(&pruned).unwrap();
        assert_eq!(pruned_to(&after), Some(vec!["score_patch".to_string(), "patch_map".to_string()]));
        assert_eq!(pruned_to(&before), None);
        let mut rest = after.clone();
        rest.remove(KEY_PRUNED);
        assert_eq!(rest, before);
        // Pruning a pruned model again records the latest cut only.
        let again = read_props(&prune(&pruned, &["score_patch"]).unwrap()).unwrap();
        assert_eq!(again[KEY_PRUNED], "score_patch");
        let err = crate::onnx::check::check_model(&pruned).unwrap_err().to_string();
        assert!(err.contains(KEY_PRUNED) && err.contains("score_patch,patch_map"), "{err}");
    }

    #[test]
    fn an_output_that_does_not_exist_is_named() {
        let full = random_model(&arch(), 1).unwrap();
        let err = prune(&full, &["score", "score_bogus"]).unwrap_err().to_string();
        assert!(err.contains("`score_bogus`") && err.contains("score_mahalanobis"), "{err}");
        let pruned = prune(&full, &["score"]).unwrap();
        let err = prune(&pruned, &["anomaly_map"]).unwrap_err().to_string();
        assert!(err.contains("`anomaly_map`"), "{err}");
    }

    #[test]
    fn a_map_joins_the_scores_only_when_it_adds_no_heavy_op() {
        let full = random_model(&arch(), 1).unwrap();
        let meta = crate::onnx::read_metadata(&full).unwrap();
        let p = Pruner::new(&full).unwrap();
        let split = |kind: ScoreKind| {
            let scores = score_outputs(&meta, kind);
            p.split(&scores, &[map_output(&meta, kind)]).unwrap()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(split(ScoreKind::Latent), Split { every_frame: s(&["score", "anomaly_map"]), on_demand: vec![] });
        assert_eq!(split(ScoreKind::MapMax).on_demand, Vec::<String>::new());
        assert_eq!(
            split(ScoreKind::Mahalanobis),
            Split { every_frame: s(&["score_mahalanobis"]), on_demand: s(&["anomaly_map"]) }
        );
        assert_eq!(split(ScoreKind::Patch), Split { every_frame: s(&["score_patch", "patch_map"]), on_demand: vec![] });
        assert_eq!(
            split(ScoreKind::Fused).every_frame,
            s(&["score_fused", "score", "score_mahalanobis", "score_patch", "anomaly_map"])
        );
        // Without its statistics in the metadata, a patch camera is shown the reconstruction map.
        let mut m = meta.clone();
        m.scores.retain(|s| s.kind != ScoreKind::Patch);
        assert_eq!(map_output(&m, ScoreKind::Patch), "anomaly_map");
        assert_eq!(map_output(&meta, ScoreKind::Patch), "patch_map");
    }
}
