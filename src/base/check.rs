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

/// Longest camera name: it becomes a topic level, a file-name part and a
/// metric label; 64 bytes is plenty for `line3_left` and keeps every topic
/// and path short.
pub const MAX_NAME_BYTES: usize = 64;

/// MQTT 3.1.1 §1.5.3: a UTF-8 string is prefixed by a 16-bit length and may
/// not hold U+0000.
pub const MQTT_STRING_BYTES: usize = 65_535;

/// A name that becomes one MQTT topic level and part of a file name
/// (`cameras.<name>`): letters, digits, `_` and `-` only (so no `/ + # $ \0`,
/// no `.` or `..`, nothing a shell or a file system reads specially), at most
/// [`MAX_NAME_BYTES`].
pub fn level_name(problems: &mut Vec<String>, field: &str, name: &str) -> bool {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        problems.push(format!(
            "{field}: camera names need 1 to {MAX_NAME_BYTES} letters, digits, `_` or `-` (the name becomes an MQTT topic level and a file name)"
        ));
    }
    ok
}

/// A string MQTT carries as one UTF-8 string (client id, user name, topic):
/// at most `max` bytes (never more than [`MQTT_STRING_BYTES`]) and no NUL.
/// The value is not quoted: it may be a user name.
pub fn mqtt_string(problems: &mut Vec<String>, field: &str, s: &str, max: usize) -> bool {
    let max = max.min(MQTT_STRING_BYTES);
    let ok = s.len() <= max && !s.contains('\0');
    if !ok {
        problems.push(format!("{field}: must be at most {max} bytes without NUL characters (got {} bytes)", s.len()));
    }
    ok
}

/// A host to connect to: an IP address (IPv6 with or without brackets) or a
/// DNS name as the URL standard parses it. The value is quoted with any
/// `user:password@` hidden.
pub fn host(problems: &mut Vec<String>, field: &str, s: &str) -> bool {
    let ok = parse_host(s).is_some();
    if !ok {
        problems.push(format!(
            "{field}: `{}` is not a host name or IP address (write the port in `port`, credentials in `username`)",
            crate::base::redact::url(s)
        ));
    }
    ok
}

/// `s` as a host, or `None`.
pub fn parse_host(s: &str) -> Option<url::Host> {
    if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        return Some(match ip {
            std::net::IpAddr::V4(v4) => url::Host::Ipv4(v4),
            std::net::IpAddr::V6(v6) => url::Host::Ipv6(v6),
        });
    }
    // url's parser accepts a few things a socket cannot connect to (an empty
    // host is refused by it already; a trailing dot is fine for DNS).
    match url::Host::parse(s) {
        Ok(url::Host::Domain(d)) if !d.is_empty() && d.len() <= 253 => Some(url::Host::Domain(d)),
        Ok(url::Host::Domain(_)) | Err(_) => None,
        Ok(other) => Some(other),
    }
}

/// True for `localhost` and the loopback addresses (127.0.0.0/8, ::1): what
/// never leaves the box.
pub fn is_loopback_host(s: &str) -> bool {
    match parse_host(s) {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost") || d.eq_ignore_ascii_case("localhost."),
        None => false,
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

    #[test]
    fn names_strings_and_hosts_are_bounded_by_what_they_become() {
        let mut p = Vec::new();
        assert!(level_name(&mut p, "cameras.a", "line3_left-2"));
        for bad in ["", "a/b", "a+b", "a#", "$SYS", "..", "a.b", "a\0b", "x".repeat(65).as_str()] {
            assert!(!level_name(&mut p, "cameras.x", bad), "accepted {bad:?}");
        }
        assert!(mqtt_string(&mut p, "mqtt.username", "operator", MQTT_STRING_BYTES));
        assert!(!mqtt_string(&mut p, "mqtt.username", &"u".repeat(65_536), usize::MAX));
        assert!(!mqtt_string(&mut p, "mqtt.username", "a\0b", 100));
        for good in ["broker.plant.local", "10.0.0.5", "::1", "[::1]", "localhost"] {
            assert!(host(&mut p, "mqtt.host", good), "refused {good}");
        }
        let before = p.len();
        for bad in ["", "a b", "user:hunter2@broker", "broker:1883", "http://broker"] {
            assert!(!host(&mut p, "mqtt.host", bad), "accepted {bad}");
        }
        assert!(p[before..].iter().all(|m| m.starts_with("mqtt.host:") && !m.contains("hunter2")), "{p:#?}");
        assert!(is_loopback_host("127.0.0.2") && is_loopback_host("::1") && is_loopback_host("LOCALHOST"));
        assert!(!is_loopback_host("10.0.0.5") && !is_loopback_host("broker") && !is_loopback_host("0.0.0.0"));
    }
}
