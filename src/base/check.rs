//! Range checks that every config table uses (the compile in `config/`, the
//! source kinds in `capture/`, `[mqtt]`): each pushes one problem naming its
//! field as a dotted path, so that all problems are reported at once.

/// `{field}: must be between {lo} and {hi} (got {v}){why}` unless `v` is
/// finite and in `[lo, hi]`. True when it is.
pub fn between(problems: &mut Vec<String>, field: &str, v: f64, lo: f64, hi: f64, why: &str) -> bool {
    let ok = v.is_finite() && (lo..=hi).contains(&v);
    if !ok {
        problems.push(format!("{field}: must be between {lo} and {hi} (got {v}){why}"));
    }
    ok
}

/// The same for a count.
pub fn count_between(problems: &mut Vec<String>, field: &str, v: u64, lo: u64, hi: u64) -> bool {
    let ok = (lo..=hi).contains(&v);
    if !ok {
        problems.push(format!("{field}: must be between {lo} and {hi} (got {v})"));
    }
    ok
}

/// `{field}: must be ≥ 1` when it is set to 0.
pub fn not_zero(problems: &mut Vec<String>, field: &str, v: Option<u64>) {
    if v == Some(0) {
        problems.push(format!("{field}: must be ≥ 1"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_names_its_field_and_passes_good_values() {
        let mut p = Vec::new();
        assert!(between(&mut p, "a.x", 0.5, 0.0, 1.0, ""));
        assert!(!between(&mut p, "a.y", f64::NAN, 0.0, 1.0, ": why"));
        assert!(!between(&mut p, "a.z", 1e20, 0.1, 86400.0, ""));
        assert!(count_between(&mut p, "a.n", 64, 1, 64));
        assert!(!count_between(&mut p, "a.m", 0, 1, 64));
        not_zero(&mut p, "a.k", Some(0));
        not_zero(&mut p, "a.j", None);
        assert_eq!(
            p,
            [
                "a.y: must be between 0 and 1 (got NaN): why",
                "a.z: must be between 0.1 and 86400 (got 100000000000000000000)",
                "a.m: must be between 1 and 64 (got 0)",
                "a.k: must be ≥ 1",
            ]
        );
    }
}
