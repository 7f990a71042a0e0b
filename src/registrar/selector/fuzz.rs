//! Hostile labels and environment variables, property-tested: whatever a container
//! carries, every registration the selector makes is one the watcher accepts as it is
//! (the key parses, the value decodes to the same address), with nothing in it that
//! could break a config line; anything else is a warning, never a panic.

use proptest::prelude::*;

use super::fixtures::{inspect, one_port, settings};
use super::registrations;
use crate::schema;

fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9][a-z0-9_.-]{0,10}",
        2 => "[A-Za-z0-9 _.:=,#\n\"{}/\\\\-]{0,16}",
        1 => (0u32..400).prop_map(|n| n.to_string()),
        1 => Just("a".repeat(140)),
    ]
}

fn label_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("portolan.service".to_string()),
        Just("portolan.tags".to_string()),
        Just("portolan.weight".to_string()),
        Just("portolan.ignore".to_string()),
        Just("portolan.port.8080.service".to_string()),
        Just("portolan.port.8080.weight".to_string()),
        Just("portolan.check.http".to_string()),
        Just("portolan.check.interval".to_string()),
        Just("com.docker.compose.service".to_string()),
        "portolan\\.[a-z.0-9]{1,12}",
    ]
}

fn env_var() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("SERVICE_NAME"),
            Just("SERVICE_TAGS"),
            Just("SERVICE_8080_NAME"),
            Just("SERVICE_IGNORE"),
        ],
        hostile(),
    )
        .prop_map(|(k, v)| format!("{k}={v}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn whatever_the_labels_say_a_registration_is_one_the_watcher_accepts(
        labels in prop::collection::vec((label_key(), hostile()), 0..6),
        env in prop::collection::vec(env_var(), 0..3),
    ) {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env: Vec<&str> = env.iter().map(String::as_str).collect();
        let c = inspect(&labels, &env, one_port());
        let Ok(selected) = registrations(&c, &settings()) else {
            return Ok(()); // refused with warnings: nothing registers
        };
        for r in &selected.registrations {
            let key = r.key("/p");
            let value = r.record.to_json();
            prop_assert!(!value.contains('\n') && !key.contains('\n') && !key.contains(' '));
            let parsed = schema::parse_key("/p", &key);
            let Ok(schema::Key::Service { service, instance, node }) = parsed else {
                return Err(TestCaseError::fail(format!("{key} does not parse: {parsed:?}")));
            };
            let decoded = schema::decode_owned(&key, &service, &instance, node.as_deref(), value.as_bytes());
            prop_assert!(decoded.is_ok(), "{key} = {value}: {decoded:?}");
            let i = decoded.unwrap();
            prop_assert_eq!(&i.addr, &r.record.addr);
            prop_assert!(i.tags.iter().all(|t| schema::is_valid_tag(t)));
        }
    }
}
