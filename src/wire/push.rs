//! Service pushes read in one pass: from the payload's bytes straight into
//! the model.
//!
//! Why: a profile of the agent at 1,000 changes/s put 18% of its CPU in
//! reading pushes, half of it in building the DTO (a `String` per field,
//! a `BTreeMap` per host's metadata) that the conversion then copied into
//! the model and dropped. Here the strings are read where they lie (a
//! borrowed slice of the payload unless the JSON escapes something) and
//! only the model's own copies are made, through the snapshot's interner.
//!
//! The rules are the DTO path's own: [`Host::instance`], [`keep_id`] and
//! [`service_name`] are what [`convert::snapshot`] applies, and every field
//! is read as the type the DTO declares. Whatever this reader does not
//! take (a field twice, a value of another type, a struct sent as an
//! array) goes to the DTO path, which takes or refuses it as it always
//! did: this is a faster way to the same answer, never another answer.
//! The tests hold the two paths equal on generated pushes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::convert::{self, Host, keep_id, service_name};
use super::{
    NotifySubscriberRequest, NotifySubscriberResponse, ResponseStatus, WireError, body,
    decode_body, encode,
};
use crate::model::{Instance, Interner, Metadata, ServiceKey, ServiceSnapshot};
use crate::proto::Payload;

/// A service push, read.
#[derive(Debug)]
pub struct Push {
    /// The id its ack echoes.
    pub request_id: Option<String>,
    /// The service's new view, or why the model cannot hold it; `None` when
    /// the push named no service.
    pub snapshot: Option<Result<ServiceSnapshot, WireError>>,
}

/// Reads a `NotifySubscriberRequest` payload that a session in `namespace`
/// received. An error means the body is no such request at all (so it
/// cannot even be acknowledged).
pub fn decode_push(payload: &Payload, namespace: &str) -> Result<Push, WireError> {
    if let Ok(push) = one_pass(body(payload)?, namespace) {
        return Ok(push);
    }
    let request: NotifySubscriberRequest = decode_body(payload)?;
    Ok(Push {
        snapshot: request
            .service_info
            .as_ref()
            .map(|info| convert::snapshot(namespace, info)),
        request_id: request.request_id,
    })
}

/// The ack of a push: the request id it came with, success. The one
/// builder of it, whichever path read the push (see [`super::reply_to`]).
pub fn ack(
    request_id: Option<String>,
    headers: &HashMap<String, String>,
    client_ip: &str,
) -> Payload {
    let reply = NotifySubscriberResponse {
        status: ResponseStatus::ok(request_id),
    };
    encode(&reply, headers, client_ip)
}

/// The one pass; an error only says "ask the DTO path".
fn one_pass(bytes: &[u8], namespace: &str) -> Result<Push, serde_json::Error> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let push = RequestSeed { namespace }.deserialize(&mut json)?;
    json.end()?;
    Ok(push)
}

/// A JSON string, borrowed from the input unless it had escapes.
#[derive(PartialEq)]
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

fn text<'a>(t: &'a Option<Text<'_>>) -> Option<&'a str> {
    t.as_ref().map(|t| &*t.0)
}

/// The fields of one object seen so far: a second sighting is an error,
/// as it is for the DTOs' derived readers.
#[derive(Default)]
struct Seen(u32);

impl Seen {
    fn first<E: de::Error>(&mut self, bit: u32, field: &'static str) -> Result<(), E> {
        if self.0 & (1 << bit) != 0 {
            return Err(E::duplicate_field(field));
        }
        self.0 |= 1 << bit;
        Ok(())
    }
}

/// `null` or the seed's value, as an `Option` field of a DTO reads.
struct OrNull<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OrNull<S> {
    type Value = Option<S::Value>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OrNull<S> {
    type Value = Option<S::Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or a value")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(deserializer).map(Some)
    }
}

/// The request: `requestId`, `module`, `serviceInfo`.
struct RequestSeed<'n> {
    namespace: &'n str,
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = Push;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Push, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = Push;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a NotifySubscriberRequest object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Push, A::Error> {
        let mut seen = Seen::default();
        let mut push = Push {
            request_id: None,
            snapshot: None,
        };
        while let Some(key) = map.next_key::<Text>()? {
            match &*key.0 {
                "requestId" => {
                    seen.first(0, "requestId")?;
                    push.request_id = map.next_value()?;
                }
                "module" => {
                    seen.first(1, "module")?;
                    map.next_value::<Option<Text>>()?;
                }
                "serviceInfo" => {
                    seen.first(2, "serviceInfo")?;
                    let info = InfoSeed {
                        namespace: self.namespace,
                    };
                    push.snapshot = map.next_value_seed(OrNull(info))?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(push)
    }
}

/// The service's view, as [`convert::snapshot`] reads a `ServiceInfoDto`.
struct InfoSeed<'n> {
    namespace: &'n str,
}

impl<'de> DeserializeSeed<'de> for InfoSeed<'_> {
    type Value = Result<ServiceSnapshot, WireError>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for InfoSeed<'_> {
    type Value = Result<ServiceSnapshot, WireError>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a ServiceInfo object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Seen::default();
        let mut name: Option<Text> = None;
        let mut group: Option<Text> = None;
        let mut last_ref_time: Option<i64> = None;
        let mut protected: Option<bool> = None;
        // One interner per snapshot, as on the DTO path.
        let mut interner = Interner::default();
        let mut hosts = Hosts::default();
        while let Some(key) = map.next_key::<Text>()? {
            match &*key.0 {
                "name" => {
                    seen.first(0, "name")?;
                    name = map.next_value()?;
                }
                "groupName" => {
                    seen.first(1, "groupName")?;
                    group = map.next_value()?;
                }
                "clusters" => {
                    seen.first(2, "clusters")?;
                    map.next_value::<Option<Text>>()?;
                }
                "cacheMillis" => {
                    seen.first(3, "cacheMillis")?;
                    map.next_value::<Option<i64>>()?;
                }
                "hosts" => {
                    seen.first(4, "hosts")?;
                    let seed = HostsSeed {
                        interner: &mut interner,
                    };
                    hosts = map.next_value_seed(OrNull(seed))?.unwrap_or_default();
                }
                "lastRefTime" => {
                    seen.first(5, "lastRefTime")?;
                    last_ref_time = map.next_value()?;
                }
                "checksum" => {
                    seen.first(6, "checksum")?;
                    map.next_value::<Option<Text>>()?;
                }
                // One field under either spelling, as the DTO's alias reads it.
                "allIPs" | "allIps" => {
                    seen.first(7, "allIPs")?;
                    map.next_value::<Option<bool>>()?;
                }
                "reachProtectionThreshold" => {
                    seen.first(8, "reachProtectionThreshold")?;
                    protected = map.next_value()?;
                }
                "valid" => {
                    seen.first(9, "valid")?;
                    map.next_value::<Option<bool>>()?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(
            service_name(text(&name), text(&group)).and_then(|(group, name)| {
                let instances = hosts.into_instances(group, name)?;
                Ok(ServiceSnapshot {
                    service: ServiceKey::new(self.namespace, group, name),
                    instances: instances.into(),
                    last_ref_time_ms: last_ref_time.unwrap_or(0),
                    protect_threshold_reached: protected.unwrap_or(false),
                })
            }),
        )
    }
}

/// The enabled hosts read so far, each with the id the server sent (kept
/// only once the service's name says whether it is the default one), or
/// the first that the model could not hold.
#[derive(Default)]
struct Hosts<'de> {
    read: Vec<(Instance, Option<Text<'de>>)>,
    error: Option<WireError>,
}

impl Hosts<'_> {
    fn into_instances(self, group: &str, name: &str) -> Result<Vec<Instance>, WireError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Ok(self
            .read
            .into_iter()
            .map(|(mut instance, id)| {
                keep_id(&mut instance, text(&id), Some((group, name)));
                instance
            })
            .collect())
    }
}

struct HostsSeed<'i> {
    interner: &'i mut Interner,
}

impl<'de> DeserializeSeed<'de> for HostsSeed<'_> {
    type Value = Hosts<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for HostsSeed<'_> {
    type Value = Hosts<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of hosts")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut hosts = Hosts {
            read: Vec::with_capacity(seq.size_hint().unwrap_or(0)),
            error: None,
        };
        // One buffer for every host's metadata, emptied per host.
        let mut metadata = Vec::new();
        // The metadata of the host before, as read and as made: the hosts
        // of a service mostly repeat it, and an equal read makes an equal
        // value (the DTO path's interner would hand out that one too).
        let mut before: Vec<(Text, Text)> = Vec::new();
        let mut made_before: Option<Metadata> = None;
        while let Some(host) = seq.next_element_seed(HostSeed {
            metadata: &mut metadata,
        })? {
            // Disabled hosts are left out unchecked, as on the DTO path;
            // after an error the rest is only read (for its JSON).
            if !host.enabled.unwrap_or(true) || hosts.error.is_some() {
                continue;
            }
            let view = Host {
                ip: text(&host.ip),
                port: host.port,
                weight: host.weight,
                healthy: host.healthy,
                enabled: host.enabled,
                ephemeral: host.ephemeral,
                cluster_name: text(&host.cluster_name),
            };
            let made = match &made_before {
                Some(made) if metadata == before => made.clone(),
                _ => {
                    let pairs = metadata.iter().map(|(k, v)| (&*k.0, &*v.0));
                    let made = self.interner.metadata_of(pairs);
                    made_before = Some(made.clone());
                    std::mem::swap(&mut before, &mut metadata);
                    made
                }
            };
            match view.instance(made, self.interner) {
                Ok(instance) => hosts.read.push((instance, host.id)),
                Err(e) => hosts.error = Some(e),
            }
        }
        Ok(hosts)
    }
}

/// One host's fields as read (its metadata goes to the shared buffer).
#[derive(Default)]
struct RawHost<'de> {
    id: Option<Text<'de>>,
    ip: Option<Text<'de>>,
    port: i64,
    weight: Option<f64>,
    healthy: Option<bool>,
    enabled: Option<bool>,
    ephemeral: Option<bool>,
    cluster_name: Option<Text<'de>>,
}

struct HostSeed<'b, 'de> {
    metadata: &'b mut Vec<(Text<'de>, Text<'de>)>,
}

impl<'de> DeserializeSeed<'de> for HostSeed<'_, 'de> {
    type Value = RawHost<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HostSeed<'_, 'de> {
    type Value = RawHost<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an Instance object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.metadata.clear();
        let mut seen = Seen::default();
        let mut host = RawHost::default();
        while let Some(key) = map.next_key::<Text>()? {
            match &*key.0 {
                "instanceId" => {
                    seen.first(0, "instanceId")?;
                    host.id = map.next_value()?;
                }
                "ip" => {
                    seen.first(1, "ip")?;
                    host.ip = map.next_value()?;
                }
                "port" => {
                    seen.first(2, "port")?;
                    host.port = map.next_value()?;
                }
                "weight" => {
                    seen.first(3, "weight")?;
                    host.weight = map.next_value()?;
                }
                "healthy" => {
                    seen.first(4, "healthy")?;
                    host.healthy = map.next_value()?;
                }
                "enabled" => {
                    seen.first(5, "enabled")?;
                    host.enabled = map.next_value()?;
                }
                "ephemeral" => {
                    seen.first(6, "ephemeral")?;
                    host.ephemeral = map.next_value()?;
                }
                "clusterName" => {
                    seen.first(7, "clusterName")?;
                    host.cluster_name = map.next_value()?;
                }
                "serviceName" => {
                    seen.first(8, "serviceName")?;
                    map.next_value::<Option<Text>>()?;
                }
                "metadata" => {
                    seen.first(9, "metadata")?;
                    let seed = MetadataSeed {
                        pairs: &mut *self.metadata,
                    };
                    map.next_value_seed(OrNull(seed))?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(host)
    }
}

/// A host's metadata object, into the shared buffer (of equal keys the
/// last wins later, in the interner, as in the DTO's map).
struct MetadataSeed<'b, 'de> {
    pairs: &'b mut Vec<(Text<'de>, Text<'de>)>,
}

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a metadata object of strings")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(entry) = map.next_entry::<Text, Text>()? {
            self.pairs.push(entry);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "push_tests.rs"]
mod tests;
