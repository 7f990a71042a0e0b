//! `docker inspect` documents for the selector's tests.

use bollard::models::ContainerInspectResponse;

use super::{registrations, LabelWarning, NodeSettings, Registration};

pub(crate) const ID: &str = "3f2a9c1b7d10aaaabbbbccccddddeeeeffff00001111222233334444555566667777";

pub(crate) fn settings() -> NodeSettings {
    NodeSettings {
        node: "host-a".into(),
        advertise_ip: "10.0.0.5".parse().unwrap(),
        internal: false,
        advertise_networks: Vec::new(),
    }
}

/// A `docker inspect` document as Engine 20.10 returns it (trimmed).
pub(crate) fn inspect(
    labels: &[(&str, &str)],
    env: &[&str],
    ports: serde_json::Value,
) -> ContainerInspectResponse {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::from_value(serde_json::json!({
        "Id": ID,
        "Name": "/web-1",
        "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false},
        "Config": {
            "Image": "registry.example.com:5000/team/shop-web:1.2",
            "Labels": labels,
            "Env": env,
            "ExposedPorts": {"8080/tcp": {}},
        },
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {
            "Ports": ports,
            "Networks": {"bridge": {"IPAddress": "172.17.0.3"}},
        },
    }))
    .unwrap()
}

pub(crate) fn one_port() -> serde_json::Value {
    serde_json::json!({"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]})
}

pub(crate) fn regs(c: &ContainerInspectResponse) -> Vec<Registration> {
    let s = registrations(c, &settings()).unwrap_or_else(|w| panic!("warnings: {w:?}"));
    assert!(s.skipped.is_empty(), "skipped: {:?}", s.skipped);
    s.registrations
}

pub(crate) fn warnings(c: &ContainerInspectResponse) -> Vec<LabelWarning> {
    registrations(c, &settings()).expect_err("expected warnings")
}
