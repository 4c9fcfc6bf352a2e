//! The one pass against the DTO path: the same answer on every push the
//! DTO path reads, and the DTO path's answer where the one pass stands down.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;
use crate::proto::Metadata as PayloadMetadata;
use crate::wire::{InstanceDto, ServiceInfoDto};

fn payload(json: &str) -> Payload {
    Payload {
        metadata: Some(PayloadMetadata {
            r#type: "NotifySubscriberRequest".to_owned(),
            client_ip: String::new(),
            headers: HashMap::new(),
        }),
        body: Some(prost_types::Any {
            type_url: String::new(),
            value: json.as_bytes().to_vec(),
        }),
    }
}

/// What the DTO path makes of `json`, as comparable text.
fn by_dto(json: &str) -> String {
    let read = decode_body::<NotifySubscriberRequest>(&payload(json)).map(|r| Push {
        snapshot: r
            .service_info
            .as_ref()
            .map(|info| convert::snapshot("ns", info)),
        request_id: r.request_id,
    });
    shown(read)
}

fn shown(read: Result<Push, WireError>) -> String {
    match read {
        Ok(Push {
            request_id,
            snapshot,
        }) => {
            let snapshot = snapshot.map(|s| s.map_err(|e| e.to_string()));
            format!("{request_id:?} {snapshot:?}")
        }
        Err(e) => format!("error: {e}"),
    }
}

/// What the one pass makes of `json`; a panic if it stood down.
fn by_one_pass(json: &str) -> String {
    shown(Ok(
        one_pass(json.as_bytes(), "ns").expect("the one pass reads it")
    ))
}

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/wire/NotifySubscriberRequest.json"
));

#[test]
fn a_real_servers_push_reads_the_same_both_ways() {
    let one = by_one_pass(FIXTURE);
    assert_eq!(one, by_dto(FIXTURE));
    // And it is a push worth comparing: two instances, metadata, a name.
    let push = decode_push(&payload(FIXTURE), "ns").unwrap();
    let snapshot = push.snapshot.unwrap().unwrap();
    assert_eq!(push.request_id.as_deref(), Some("4"));
    assert_eq!(&*snapshot.service.name, "golden");
    assert_eq!(snapshot.instances.len(), 2);
    assert_eq!(snapshot.instances[0].metadata.get("zone"), Some("hz"));
}

#[test]
fn what_the_one_pass_refuses_the_dto_path_decides() {
    let cases = [
        // A field twice: the derived reader refuses it.
        r#"{"requestId":"1","requestId":"2"}"#,
        r#"{"requestId":"1","serviceInfo":{"name":"a","hosts":[{"ip":"1.1.1.1","ip":"2.2.2.2"}]}}"#,
        r#"{"serviceInfo":{"name":"a","allIPs":true,"allIps":false}}"#,
        // Values of other types than the DTO's.
        r#"{"requestId":"1","serviceInfo":{"name":"a","hosts":[{"ip":"1.1.1.1","port":null}]}}"#,
        r#"{"requestId":"1","serviceInfo":{"name":"a","hosts":[{"ip":"1.1.1.1","weight":"2"}]}}"#,
        r#"{"requestId":"1","serviceInfo":{"name":"a","hosts":[{"ip":"1.1.1.1","metadata":{"k":1}}]}}"#,
        r#"{"requestId":7}"#,
        // A struct as an array, which the derived reader takes in field order.
        r#"{"requestId":"1","serviceInfo":["a","DEFAULT_GROUP"]}"#,
        // Not JSON at all, or trailing bytes.
        r#"{"requestId":"1""#,
        r#"{"requestId":"1"} x"#,
    ];
    for json in cases {
        assert!(
            one_pass(json.as_bytes(), "ns").is_err(),
            "the one pass took {json}"
        );
        assert_eq!(
            shown(decode_push(&payload(json), "ns")),
            by_dto(json),
            "{json}"
        );
    }
    // The array form reads on the DTO path: the fallback is not only for errors.
    let array = r#"{"requestId":"1","serviceInfo":["a","G"]}"#;
    let push = decode_push(&payload(array), "ns").unwrap();
    assert_eq!(&*push.snapshot.unwrap().unwrap().service.group, "G");
}

#[test]
fn unknown_fields_nulls_escapes_and_disabled_hosts_read_the_same_both_ways() {
    let cases = [
        r#"{}"#,
        r#"{"serviceInfo":null,"module":null,"extra":{"deep":[1,{"x":null}]}}"#,
        r#"{"requestId":"9","serviceInfo":{"name":"a","hosts":null,"valid":null}}"#,
        r#"{"requestId":"9","serviceInfo":{"hosts":[{"ip":"1.1.1.1"}]}}"#,
        r#"{"requestId":"9","serviceInfo":{"name":"G@@a","groupName":"ignored","hosts":[]}}"#,
        // Escapes: the strings are copied, not borrowed.
        r#"{"requestId":"\u0039","serviceInfo":{"name":"a\"b","hosts":[{"ip":"1.1.1.\u0031","port":1,"clusterName":"c\\d","instanceId":"x\ty","metadata":{"k\n":"v\u00e9","k\n":"last"}}]}}"#,
        // A disabled host is left out unchecked; an enabled bad one fails the view.
        r#"{"serviceInfo":{"name":"a","hosts":[{"enabled":false,"port":-1},{"ip":"1.1.1.1","port":2}]}}"#,
        r#"{"serviceInfo":{"name":"a","hosts":[{"ip":"","port":2},{"ip":"1.1.1.1","port":99999}]}}"#,
        r#"{"serviceInfo":{"name":"","hosts":[{"ip":"","port":2}]}}"#,
        // The default id is dropped; another is kept.
        r#"{"serviceInfo":{"name":"a","hosts":[{"ip":"1.1.1.1","port":2,"instanceId":"1.1.1.1#2#DEFAULT#DEFAULT_GROUP@@a"},{"ip":"1.1.1.2","port":2,"instanceId":"mine"}]}}"#,
    ];
    for json in cases {
        assert_eq!(by_one_pass(json), by_dto(json), "{json}");
    }
}

#[test]
fn hosts_repeating_metadata_share_it_and_differing_ones_do_not() {
    let json = r#"{"serviceInfo":{"name":"a","hosts":[
        {"ip":"1.1.1.1","metadata":{"a":"1","b":"2"}},
        {"ip":"1.1.1.2","metadata":{"a":"1","b":"2"}},
        {"ip":"1.1.1.3","metadata":{"b":"2","a":"1"}},
        {"ip":"1.1.1.4","metadata":{"a":"1"}},
        {"ip":"1.1.1.5","metadata":{"a":"1","b":"2"}},
        {"ip":"1.1.1.6","metadata":{"a":"1","b":"3"}},
        {"ip":"1.1.1.7"}]}}"#;
    assert_eq!(by_one_pass(json), by_dto(json));
    let push = one_pass(json.as_bytes(), "ns").expect("reads");
    let snapshot = push.snapshot.expect("a service").expect("a view");
    let metadata = |ip: &str| {
        let found = snapshot.instances.iter().find(|i| &*i.ip == ip);
        found.expect("the host").metadata.clone()
    };
    let first = metadata("1.1.1.1");
    for same in ["1.1.1.2", "1.1.1.3", "1.1.1.5"] {
        assert!(first.same_allocation(&metadata(same)), "{same}");
    }
    assert_eq!(metadata("1.1.1.4").len(), 1);
    assert_eq!(metadata("1.1.1.6").get("b"), Some("3"));
    assert!(metadata("1.1.1.7").is_empty());
}

fn host() -> impl Strategy<Value = InstanceDto> {
    let text = "[a-z0-9.#@\"\\\\é -]{0,8}";
    (
        (
            proptest::option::of(text),
            proptest::option::of("[0-9.]{0,12}"),
            prop_oneof![0..70_000i64, Just(-1i64)],
            proptest::option::of(0.0..100.0f64),
        ),
        (
            proptest::option::of(any::<bool>()),
            proptest::option::weighted(0.3, any::<bool>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(prop_oneof![
                Just("DEFAULT".to_owned()),
                text.prop_map(String::from)
            ]),
            proptest::option::of(proptest::collection::btree_map(text, text, 0..4)),
        ),
    )
        .prop_map(
            |(
                (instance_id, ip, port, weight),
                (healthy, enabled, ephemeral, cluster_name, metadata),
            )| {
                InstanceDto {
                    instance_id,
                    ip,
                    port,
                    weight,
                    healthy,
                    enabled,
                    ephemeral,
                    cluster_name,
                    service_name: None,
                    metadata: metadata.map(|m: BTreeMap<String, String>| m),
                }
            },
        )
}

proptest! {
    #[test]
    fn generated_pushes_read_the_same_both_ways(
        request_id in proptest::option::of("[0-9]{1,4}"),
        name in proptest::option::of("[a-z@]{0,6}"),
        group_name in proptest::option::of("[A-Z_]{0,6}"),
        hosts in proptest::option::of(proptest::collection::vec(host(), 0..6)),
        derived_ids in any::<bool>(),
        last_ref_time in proptest::option::of(any::<i64>()),
        protected in proptest::option::of(any::<bool>()),
    ) {
        let mut hosts = hosts;
        if derived_ids {
            // Ids as the server derives them, so that dropping them is exercised.
            let group = group_name.clone().unwrap_or_else(|| "DEFAULT_GROUP".into());
            let service = name.clone().unwrap_or_default();
            for h in hosts.iter_mut().flatten() {
                h.instance_id = Some(format!(
                    "{}#{}#{}#{group}@@{service}",
                    h.ip.as_deref().unwrap_or(""),
                    h.port,
                    h.cluster_name.as_deref().unwrap_or("DEFAULT"),
                ));
            }
        }
        let request = NotifySubscriberRequest {
            request_id,
            module: Some("naming".into()),
            service_info: Some(ServiceInfoDto {
                name,
                group_name,
                hosts,
                last_ref_time,
                reach_protection_threshold: protected,
                ..Default::default()
            }),
        };
        let json = serde_json::to_string(&request).unwrap();
        prop_assert_eq!(by_one_pass(&json), by_dto(&json));
    }
}
