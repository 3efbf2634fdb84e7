//! The daemon's pruned sessions (`infer::Model::from_bytes_for`, graphs cut
//! by `ganomaly_core::onnx::prune`) against the full graph, through real ONNX
//! Runtime: for several architectures, every score each pruned session
//! exports equals the full graph's, and every heat map (from the scores'
//! session or computed on demand by the map session) equals the full
//! graph's, within 1e-5 (relative, for values above 1).

use std::collections::BTreeSet;
use std::path::Path;

use ganomaly_core::arch::ArchSpec;
use ganomaly_core::metadata::OUTPUT_PATCH_MAP;
use ganomaly_core::onnx::prune::map_output;
use ganomaly_core::onnx::{random_model, OUTPUT_MAP};
use ganomaly_core::ScoreKind;
use ganomalyd::infer::{BatchOutput, Model, Wants};

mod support;

const BATCH: usize = 3;
const TOL: f32 = 1e-5;

fn archs() -> Vec<ArchSpec> {
    vec![
        ArchSpec { isize: 32, nc: 1, nz: 8, ngf: 4, ndf: 4, extralayers: 0, ..Default::default() },
        ArchSpec { isize: 32, nc: 3, nz: 16, ngf: 8, ndf: 8, extralayers: 1, ..Default::default() },
        ArchSpec { isize: 64, nc: 3, nz: 16, ngf: 8, ndf: 8, extralayers: 0, ..Default::default() },
    ]
}

/// A deterministic input in [-1, 1] with some structure, one image a bit off.
fn input(len: usize) -> Vec<f32> {
    (0..BATCH * len)
        .map(|i| {
            let (n, j) = (i / len, i % len);
            let v = ((j * 7 + n * 13) % 61) as f32 / 30.0 - 1.0;
            if n == 1 && j % 97 < 9 {
                0.9
            } else {
                v * 0.7
            }
        })
        .collect()
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= TOL * a.abs().max(b.abs()).max(1.0)
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    assert!(!a.is_empty(), "{what}: empty");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(a.iter().zip(b).all(|(x, y)| close(*x, *y)), "{what}: max |diff| {worst}");
}

fn wants(kinds: &[ScoreKind], maps: &[&'static str]) -> Wants {
    Wants { kinds: kinds.iter().copied().collect(), maps: maps.iter().copied().collect::<BTreeSet<_>>() }
}

#[test]
fn every_pruned_graph_scores_and_draws_as_the_full_graph() {
    support::dev_ort();
    let cfg = support::cpu();
    for (a, arch) in archs().into_iter().enumerate() {
        let bytes = random_model(&arch, 40 + a as u64).expect("model");
        let path = Path::new("random.onnx");
        let mut full = Model::from_bytes(&bytes, path, &cfg).expect("full graph");
        let meta = full.meta.clone();
        let x = input(full.tensor_len());
        let mut want = BatchOutput::default();
        full.run(&x, BATCH, &mut want).expect("full run");
        let side = full.side();

        let mut cases: Vec<Wants> = Vec::new();
        for kind in ScoreKind::ALL {
            cases.push(wants(&[kind], &[]));
            cases.push(wants(&[kind], &[map_output(&meta, kind)]));
        }
        cases.push(wants(&[ScoreKind::Latent, ScoreKind::Mahalanobis], &[OUTPUT_MAP]));
        cases.push(wants(&[ScoreKind::Mahalanobis], &[OUTPUT_MAP, OUTPUT_PATCH_MAP]));
        for w in cases {
            let case = format!("{arch:?} {w:?}");
            let mut m = Model::from_bytes_for(&bytes, path, &cfg, |_| Some(w.clone())).expect("pruned graph");
            assert_eq!(m.wants.as_ref(), Some(&w), "{case}: pruned, not the full graph");
            let mut got = BatchOutput::default();
            m.run(&x, BATCH, &mut got).expect("pruned run");
            let mut compared = 0;
            for kind in ScoreKind::ALL {
                let g: Vec<f32> = (0..BATCH).filter_map(|i| got.score(kind, i)).collect();
                if w.kinds.contains(&kind) {
                    assert!(m.has_score(kind), "{case}: {kind:?} not exported");
                }
                if g.is_empty() {
                    continue;
                }
                let f: Vec<f32> = (0..BATCH).map(|i| want.score(kind, i).expect("full score")).collect();
                assert_close(&format!("{case}: {kind:?}"), &g, &f);
                compared += 1;
            }
            assert!(compared >= w.kinds.len(), "{case}: {compared} scores compared");
            // A single cheap score exports no other: the graph was cut.
            if w.kinds == BTreeSet::from([ScoreKind::Mahalanobis]) {
                assert!(!m.has_score(ScoreKind::Latent) && !m.has_score(ScoreKind::Recon), "{case}");
                if w.maps.contains(OUTPUT_MAP) {
                    assert!(m.map_on_demand(OUTPUT_MAP), "{case}: the decoder runs only for asked-for maps");
                }
            }
            let mut buf = Vec::new();
            for map in &w.maps {
                for i in 0..BATCH {
                    m.heat_map_into(&got, &x, i, map, &mut buf);
                    assert_close(&format!("{case}: {map} of image {i}"), &buf, want.map_named(map, i, side));
                }
            }
        }
    }
}

#[test]
fn the_full_graph_draws_the_maps_it_always_did() {
    // `Model::from_bytes` (score, calibrate, bench) is the full graph: every
    // score, both maps from the one run, no map session.
    support::dev_ort();
    let bytes = random_model(&archs()[0], 7).unwrap();
    let mut m = Model::from_bytes(&bytes, Path::new("random.onnx"), &support::cpu()).unwrap();
    assert_eq!(m.wants, None);
    let x = input(m.tensor_len());
    let mut out = BatchOutput::default();
    m.run(&x, BATCH, &mut out).unwrap();
    for kind in ScoreKind::ALL {
        assert!(m.has_score(kind) && out.score(kind, BATCH - 1).is_some(), "{kind:?}");
    }
    assert!(!m.map_on_demand(OUTPUT_MAP));
    let side = m.side();
    assert_eq!(out.map(ScoreKind::Mahalanobis, 2, side), out.map_named(OUTPUT_MAP, 2, side));
    assert_eq!(out.map(ScoreKind::Patch, 2, side), out.map_named(OUTPUT_PATCH_MAP, 2, side));
    assert_eq!(out.map_named(OUTPUT_MAP, 2, side).len(), side * side);
}
