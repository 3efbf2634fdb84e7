//! Keys that were renamed or removed: refused with what to write instead,
//! rather than as "unknown field" (an upgraded box's old config should say
//! how to fix it).

/// (table, old key, new key or `None` when removed, what to do).
const RENAMED: [(&str, &str, Option<&str>, &str); 4] = [
    ("inference", "max_wait_ms", Some("max_wait_s"), "durations are in seconds"),
    ("mqtt", "reconnect_min_ms", Some("reconnect_min_s"), "durations are in seconds"),
    ("mqtt", "reconnect_max_ms", Some("reconnect_max_s"), "durations are in seconds"),
    (
        "mqtt",
        "stats_interval_s",
        None,
        "`stats` is published every time the pipeline reports, every [pipeline] stats_interval_s",
    ),
];

/// One problem per old key the file still uses.
pub fn problems(file: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    for (table, old, new, why) in RENAMED {
        let Some(value) = file.get(table).and_then(|t| t.as_table()).and_then(|t| t.get(old)) else { continue };
        problems.push(match new {
            Some(new) => {
                // Milliseconds to seconds, so the fix can be copied.
                let hint = match (old.ends_with("_ms"), value.as_integer(), value.as_float()) {
                    (true, Some(ms), _) => format!(": `{new} = {}`", ms as f64 / 1000.0),
                    (true, None, Some(ms)) => format!(": `{new} = {}`", ms / 1000.0),
                    _ => String::new(),
                };
                format!("{table}.{old}: renamed to `{new}` ({why}){hint}")
            }
            None => format!("{table}.{old}: removed; {why}"),
        });
    }
    problems
}
