//! Home Assistant MQTT discovery: per camera a score sensor, a `problem`
//! binary sensor for the alarm and a `connectivity` binary sensor, all with
//! availability on the daemon's `status` topic. Off by default
//! (`[mqtt] discovery = true`).

use serde_json::{json, Value};

use super::Topics;

/// Home Assistant accepts only `[a-zA-Z0-9_-]` in node and object ids.
fn ha_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The retained `(topic, payload)` config messages for one camera.
pub fn camera_configs(discovery_prefix: &str, topics: &Topics, camera: &str) -> Vec<(String, Vec<u8>)> {
    let node = ha_id(topics.node());
    let cam = ha_id(camera);
    let device = json!({
        "identifiers": [format!("ganomalyd_{node}")],
        "name": format!("ganomalyd {}", topics.node()),
        "manufacturer": "ganomalyd",
        "model": "GANomaly anomaly detector",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let common = |name: String, uid: String| {
        json!({
            "name": name,
            "unique_id": uid,
            "object_id": uid,
            "availability_topic": topics.status(),
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device.clone(),
        })
    };
    let merge = |mut base: Value, extra: Value| {
        if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
            b.extend(e);
        }
        base
    };
    let score_uid = format!("ganomalyd_{node}_{cam}_score");
    let alarm_uid = format!("ganomalyd_{node}_{cam}_alarm");
    let conn_uid = format!("ganomalyd_{node}_{cam}_camera");
    let score = merge(
        common(format!("{camera} anomaly score"), score_uid.clone()),
        json!({
            "state_topic": topics.camera(camera, "score"),
            "value_template": "{{ value_json.score }}",
            "state_class": "measurement",
            "suggested_display_precision": 3,
        }),
    );
    let alarm = merge(
        common(format!("{camera} anomaly"), alarm_uid.clone()),
        json!({
            "state_topic": topics.camera(camera, "state"),
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "problem",
        }),
    );
    let conn = merge(
        common(format!("{camera} camera"), conn_uid.clone()),
        json!({
            "state_topic": topics.camera(camera, "camera"),
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
        }),
    );
    [("sensor", score_uid, score), ("binary_sensor", alarm_uid, alarm), ("binary_sensor", conn_uid, conn)]
        .into_iter()
        .map(|(component, uid, v)| (format!("{discovery_prefix}/{component}/{uid}/config"), v.to_string().into_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_entities_with_availability_and_the_right_state_topics() {
        let t = Topics::new("plant/a", "box 1");
        let cfgs = camera_configs("homeassistant", &t, "line3.top");
        let topics: Vec<&str> = cfgs.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/sensor/ganomalyd_box_1_line3_top_score/config",
                "homeassistant/binary_sensor/ganomalyd_box_1_line3_top_alarm/config",
                "homeassistant/binary_sensor/ganomalyd_box_1_line3_top_camera/config",
            ]
        );
        let v: Vec<Value> = cfgs.iter().map(|(_, p)| serde_json::from_slice(p).unwrap()).collect();
        assert_eq!(v[0]["state_topic"], "plant/a/box 1/line3.top/score");
        assert_eq!(v[1]["state_topic"], "plant/a/box 1/line3.top/state");
        assert_eq!(v[1]["device_class"], "problem");
        assert_eq!(v[2]["device_class"], "connectivity");
        for e in &v {
            assert_eq!(e["availability_topic"], "plant/a/box 1/status");
            assert_eq!(e["device"]["identifiers"][0], "ganomalyd_box_1");
        }
    }
}
