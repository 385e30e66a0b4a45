//! Property tests of request decoding: no input makes it panic, every refusal is
//! a 4xx naming a field, and whatever it accepts re-encodes to something it
//! accepts again, unchanged and valid.

use std::fmt::Debug;

use forkd_api::types::*;
use forkd_api::{decode_json, decode_query, Validate, DEFAULT_BODY_LIMIT};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// Every field name any request knows, plus a few it does not.
const KEYS: &[&str] = &[
    "snapshot_tag",
    "n",
    "per_child_netns",
    "memory_limit_mib",
    "prewarm",
    "live_fork",
    "hugepages",
    "use_pool",
    "image",
    "memory_mib",
    "vcpus",
    "tag",
    "args",
    "timeout_secs",
    "env",
    "cwd",
    "stdin_b64",
    "code",
    "mode",
    "wait",
    "parent_tag",
    "diff",
    "live",
    "measure_diff",
    "path",
    "content_b64",
    "size",
    "cascade",
    "force",
    "bogus",
    "N",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (0u64..2000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![
            "[A-Za-z0-9._-]{0,70}",
            "/[a-z/]{0,20}",
            "(full|diff|live|busybox|debian-python|aGk=|\\.\\.)",
            any::<String>(),
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[A-Za-z_=]{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects whose keys are mostly real field names, so decoding gets past the
/// unknown-field check and into types and validation.
fn request_like() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..8).prop_map(|pairs| {
        let mut map = Map::new();
        for (k, v) in pairs {
            map.insert(k.to_owned(), v);
        }
        Value::Object(map)
    })
}

fn check<T>(body: &[u8])
where
    T: DeserializeOwned + Serialize + Validate + PartialEq + Debug,
{
    match decode_json::<T>(body, DEFAULT_BODY_LIMIT) {
        Ok(request) => {
            request.validate().expect("a decoded request is valid");
            let again = serde_json::to_vec(&request).unwrap();
            let back: T = decode_json(&again, DEFAULT_BODY_LIMIT)
                .unwrap_or_else(|e| panic!("re-decoding {request:?} failed: {e}"));
            assert_eq!(back, request);
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 413), "{e:?}");
            if e.status() == 400 {
                let field = e
                    .field_name()
                    .unwrap_or_else(|| panic!("no field named: {e:?}"));
                assert!(!field.is_empty(), "{e:?}");
            }
        }
    }
}

fn check_all(body: &[u8]) {
    check::<SpawnRequest>(body);
    check::<BootRequest>(body);
    check::<ExecRequest>(body);
    check::<EvalRequest>(body);
    check::<BranchRequest>(body);
    check::<FileWriteRequest>(body);
    check::<PoolRequest>(body);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Integration tests have no lib.rs beside them to persist failures next
        // to; a failure prints its minimal input instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_all(&body);
    }

    #[test]
    fn arbitrary_json(value in json_value()) {
        check_all(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn request_shaped_json(value in request_like()) {
        check_all(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn arbitrary_queries(query in "[a-z_=&%0-9A-F/.]{0,40}") {
        for result in [
            decode_query::<DeleteSnapshotQuery>(Some(&query)).map(drop),
            decode_query::<FileReadQuery>(Some(&query)).map(drop),
        ] {
            if let Err(e) = result {
                prop_assert_eq!(e.status(), 400);
                prop_assert!(e.field_name().is_some());
            }
        }
    }

    #[test]
    fn valid_spawns_round_trip(tag in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", n in 1usize..=1000) {
        let body = serde_json::json!({ "snapshot_tag": tag, "n": n });
        let r: SpawnRequest = decode_json(&serde_json::to_vec(&body).unwrap(), DEFAULT_BODY_LIMIT)
            .unwrap();
        prop_assert_eq!(r.n, n);
    }
}
