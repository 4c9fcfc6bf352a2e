//! Decoding against JSON captured from a real Nacos 2.3.2 server
//! (`tests/fixtures/wire/`), round trips, and malformed input.

use std::collections::HashMap;

use super::*;
use crate::proto::{Metadata, Payload};

fn payload(class: &str, json: &str) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: class.to_owned(),
            client_ip: String::new(),
            headers: HashMap::new(),
        }),
        body: Some(prost_types::Any {
            type_url: String::new(),
            value: json.as_bytes().to_vec(),
        }),
    }
}

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/wire/",
            $name,
            ".json"
        ))
    };
}

/// Decodes the fixture as `Q`'s reply, re-encodes it, decodes again: same value.
fn round_trip_reply<Q: Request>(json: &str) -> Q::Response
where
    Q::Response: PartialEq + std::fmt::Debug + serde::Serialize,
{
    let class = <Q::Response as Message>::TYPE;
    let Reply::Response(first) = decode_reply::<Q>(&payload(class, json)).expect("fixture decodes")
    else {
        panic!("fixture decoded as an error reply")
    };
    let again = encode(&first, &HashMap::new(), "");
    let Reply::Response(second) = decode_reply::<Q>(&again).expect("re-encoded decodes") else {
        panic!("round trip turned into an error reply")
    };
    assert_eq!(first, second);
    first
}

#[test]
fn server_check_response() {
    let r = round_trip_reply::<ServerCheckRequest>(fixture!("ServerCheckResponse"));
    assert!(r.status.is_success());
    assert!(r.support_ability_negotiation);
    assert!(r.connection_id.is_some_and(|id| id.contains("_127.0.0.1_")));
}

#[test]
fn plain_responses() {
    assert!(
        round_trip_reply::<HealthCheckRequest>(fixture!("HealthCheckResponse"))
            .status
            .is_success()
    );
    let batch = round_trip_reply::<BatchInstanceRequest>(fixture!("BatchInstanceResponse"));
    assert_eq!(batch.kind.as_deref(), Some("batchRegisterInstance"));
    let single = round_trip_reply::<InstanceRequest>(fixture!("InstanceResponse"));
    assert_eq!(single.kind.as_deref(), Some("registerInstance"));
}

#[test]
fn rejected_instance_response_keeps_code_and_reason() {
    let r = round_trip_reply::<InstanceRequest>(fixture!("InstanceResponse.rejected"));
    assert!(!r.status.is_success());
    assert_eq!((r.status.result_code, r.status.error_code), (500, 400));
    assert!(
        r.status
            .message
            .unwrap_or_default()
            .contains("Param check invalid")
    );
}

#[test]
fn service_list_response() {
    let r = round_trip_reply::<ServiceListRequest>(fixture!("ServiceListResponse"));
    assert_eq!(r.count, 1);
    assert_eq!(r.service_names, Some(vec!["golden".to_owned()]));
}

#[test]
fn subscribe_and_query_responses_convert_to_snapshots() {
    // Captured right after a batch register: the subscribe reply was served
    // from a cache the register had not reached yet (the push that followed
    // carried both hosts), so it holds none. A real server does this.
    let subscribed =
        round_trip_reply::<SubscribeServiceRequest>(fixture!("SubscribeServiceResponse"));
    let early =
        convert::snapshot("public", &subscribed.service_info.expect("service info")).unwrap();
    assert_eq!((&*early.service.name, early.instances.len()), ("golden", 0));

    let queried =
        round_trip_reply::<ServiceQueryRequest>(fixture!("QueryServiceResponse")).service_info;
    let pushed: NotifySubscriberRequest =
        serde_json::from_str(fixture!("NotifySubscriberRequest")).unwrap();
    for info in [queried, pushed.service_info] {
        let info = info.expect("service info present");
        let snapshot = convert::snapshot("public", &info).expect("valid snapshot");
        assert_eq!(&*snapshot.service.name, "golden");
        assert_eq!(&*snapshot.service.group, "DEFAULT_GROUP");
        assert_eq!(snapshot.instances.len(), 2);
        let zoned = snapshot
            .instances
            .iter()
            .find(|i| i.port == 81)
            .expect("instance on port 81");
        assert_eq!(zoned.metadata.get("zone"), Some("hz"));
        assert_eq!(zoned.weight, 2.0);
        assert_eq!(
            zoned.id_in(&snapshot.service),
            "10.0.0.2#81#DEFAULT#DEFAULT_GROUP@@golden"
        );
        assert_eq!(zoned.instance_id, None, "the default id is not stored");
    }
}

#[test]
fn server_requests_decode_and_get_replies_with_the_same_id() {
    let push = decode_server_request(&payload(
        "NotifySubscriberRequest",
        fixture!("NotifySubscriberRequest"),
    ))
    .unwrap();
    let ServerRequest::Notify(n) = &push else {
        panic!("not a push: {push:?}")
    };
    assert_eq!(n.request_id.as_deref(), Some("4"));
    let reply = reply_to(&push, &HashMap::new(), "").expect("pushes are answered");
    assert_eq!(payload_type(&reply).unwrap(), "NotifySubscriberResponse");
    let body: NotifySubscriberResponse = decode_body(&reply).unwrap();
    assert_eq!(body.status.request_id.as_deref(), Some("4"));
    assert_eq!(body.status.result_code, 200);

    let reset = decode_server_request(&payload(
        "ConnectResetRequest",
        fixture!("ConnectResetRequest"),
    ))
    .unwrap();
    let ServerRequest::Reset(r) = &reset else {
        panic!("not a reset: {reset:?}")
    };
    assert_eq!(
        (r.server_ip.as_deref(), r.server_port.as_deref()),
        (Some("127.0.0.1"), Some("18848"))
    );
    let reply: ConnectResetResponse =
        decode_body(&reply_to(&reset, &HashMap::new(), "").unwrap()).unwrap();
    assert_eq!(reply.status.request_id, r.request_id);

    let ack =
        decode_server_request(&payload("SetupAckRequest", fixture!("SetupAckRequest"))).unwrap();
    assert!(
        matches!(&ack, ServerRequest::SetupAck(a) if a.ability_table.get("supportPersistentInstanceByGrpc") == Some(&true))
    );
    assert!(
        reply_to(&ack, &HashMap::new(), "").is_none(),
        "SetupAck needs no reply"
    );
}

#[test]
fn unknown_server_requests_are_answered_with_an_error() {
    let req = decode_server_request(&payload(
        "FutureRequest",
        r#"{"requestId":"9","whatever":1}"#,
    ))
    .unwrap();
    let reply = reply_to(&req, &HashMap::new(), "").unwrap();
    assert_eq!(payload_type(&reply).unwrap(), "ErrorResponse");
    let body: ErrorResponse = decode_body(&reply).unwrap();
    assert_eq!(
        (body.status.error_code, body.status.request_id.as_deref()),
        (-500, Some("9"))
    );
}

#[test]
fn unknown_keys_and_both_all_ips_spellings_are_accepted() {
    let two_x = r#"{"name":"s","groupName":"G","hosts":[],"allIPs":true,"newField":{"x":1}}"#;
    let three_x = r#"{"name":"s","groupName":"G","hosts":null,"allIps":true}"#;
    for json in [two_x, three_x] {
        let info: ServiceInfoDto = serde_json::from_str(json).unwrap();
        assert_eq!(info.all_ips, Some(true), "{json}");
    }
}

#[test]
fn error_reply_class_is_reported_as_such() {
    // The server's answer to a request class it has no handler for.
    let reply =
        decode_reply::<HealthCheckRequest>(&payload("ErrorResponse", fixture!("ErrorResponse")))
            .unwrap();
    let Reply::Error(e) = reply else {
        panic!("not an error reply: {reply:?}")
    };
    assert_eq!((e.status.result_code, e.status.error_code), (500, 302));
    assert_eq!(
        e.status.message.as_deref(),
        Some("RequestHandler Not Found")
    );
}

#[test]
fn liveness_probe_is_answered_with_its_id() {
    let probe = decode_server_request(&payload(
        "ClientDetectionRequest",
        fixture!("ClientDetectionRequest"),
    ))
    .unwrap();
    assert!(matches!(&probe, ServerRequest::Detection(d) if d.request_id.as_deref() == Some("1")));
    let reply = reply_to(&probe, &HashMap::new(), "").expect("probes are answered");
    assert_eq!(payload_type(&reply).unwrap(), "ClientDetectionResponse");
    let body: ClientDetectionResponse = decode_body(&reply).unwrap();
    assert_eq!(
        (body.status.result_code, body.status.request_id.as_deref()),
        (200, Some("1"))
    );
}

#[test]
fn malformed_payloads_are_typed_errors() {
    let bad_json = decode_reply::<HealthCheckRequest>(&payload("HealthCheckResponse", "{not json"));
    assert!(matches!(bad_json, Err(WireError::Json { .. })));
    let wrong_shape =
        decode_reply::<ServiceListRequest>(&payload("ServiceListResponse", r#"{"count":"many"}"#));
    assert!(matches!(wrong_shape, Err(WireError::Json { .. })));
    let other_class = decode_reply::<HealthCheckRequest>(&payload("ServiceListResponse", "{}"));
    assert!(matches!(other_class, Err(WireError::UnexpectedType { .. })));
    let no_body = Payload {
        metadata: Some(Metadata::default()),
        body: None,
    };
    assert!(matches!(
        decode_server_request(&no_body),
        Err(WireError::Incomplete("body"))
    ));
    let no_meta = Payload {
        metadata: None,
        body: None,
    };
    assert!(matches!(
        decode_server_request(&no_meta),
        Err(WireError::Incomplete("metadata"))
    ));
    let bad_port =
        r#"{"requestId":"1","serviceInfo":{"name":"s","hosts":[{"ip":"1.2.3.4","port":99999}]}}"#;
    let ServerRequest::Notify(n) =
        decode_server_request(&payload("NotifySubscriberRequest", bad_port)).unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        convert::snapshot("public", n.service_info.as_ref().unwrap()),
        Err(WireError::Invalid { .. })
    ));
}

#[test]
fn requests_encode_as_nacos_expects() {
    let key = crate::model::ServiceKey::new("public", "DEFAULT_GROUP", "orders");
    let instance = crate::model::Instance::new("10.0.0.5", 8080).with_metadata("zone", "hz");
    let request = convert::instance_request(&key, convert::InstanceOp::Register, &instance);
    let p = encode(
        &request,
        &HashMap::from([("accessToken".to_owned(), "t".to_owned())]),
        "10.0.0.9",
    );
    let meta = p.metadata.as_ref().unwrap();
    assert_eq!(meta.r#type, "InstanceRequest");
    assert_eq!(
        meta.headers.get("accessToken").map(String::as_str),
        Some("t")
    );
    let json: serde_json::Value = serde_json::from_slice(&p.body.as_ref().unwrap().value).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "headers": {}, "module": "naming", "namespace": "public", "serviceName": "orders",
            "groupName": "DEFAULT_GROUP", "type": "registerInstance",
            "instance": {"ip": "10.0.0.5", "port": 8080, "weight": 1.0, "healthy": true, "enabled": true,
                         "ephemeral": true, "clusterName": "DEFAULT", "metadata": {"zone": "hz"}}
        })
    );
    let batch = serde_json::to_value(convert::batch_request(&key, &[])).unwrap();
    assert_eq!(batch["type"], "batchRegisterInstance");
    assert_eq!(batch["instances"], serde_json::json!([]));
    let deregister = serde_json::to_value(convert::instance_request(
        &key,
        convert::InstanceOp::Deregister,
        &instance,
    ))
    .unwrap();
    assert_eq!(deregister["type"], "deregisterInstance");
}
