//! Conversion between Nacos DTOs and the domain model.
//!
//! Incoming values are checked here (ports in range, required names present),
//! so everything past this module holds valid model values. Outgoing
//! instances get the explicit defaults the gRPC API needs (it defaults nothing).

use std::collections::HashMap;

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::WireError;
use super::messages::{
    BatchInstanceRequest, BatchInstanceResponse, InstanceDto, InstanceRequest,
    NamingFuzzyWatchRequest, NamingTarget, ServiceInfoDto, ServiceListRequest, ServiceQueryRequest,
    SubscribeServiceRequest,
};
use crate::model::{
    DEFAULT_NACOS_CLUSTER, Instance, Interner, Metadata, ServiceKey, ServiceSnapshot,
    default_nacos_cluster,
};

const NAMING: &str = "naming";

/// Which way an [`InstanceRequest`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceOp {
    /// `registerInstance`.
    Register,
    /// `deregisterInstance`.
    Deregister,
}

impl InstanceOp {
    fn as_wire(self) -> &'static str {
        match self {
            Self::Register => "registerInstance",
            Self::Deregister => "deregisterInstance",
        }
    }
}

fn target(service: &ServiceKey) -> NamingTarget {
    NamingTarget {
        headers: HashMap::new(),
        module: NAMING.to_owned(),
        namespace: service.namespace.to_string(),
        service_name: service.name.to_string(),
        group_name: service.group.to_string(),
    }
}

/// The DTO sent for a model instance. The server derives the instance id and
/// the `group@@name` service name itself, so neither is sent.
pub fn instance_dto(instance: &Instance) -> InstanceDto {
    InstanceDto {
        instance_id: None,
        ip: Some(instance.ip.to_string()),
        port: i64::from(instance.port),
        weight: Some(instance.weight),
        healthy: Some(instance.healthy),
        enabled: Some(instance.enabled),
        ephemeral: Some(instance.ephemeral),
        cluster_name: Some(instance.nacos_cluster.to_string()),
        service_name: None,
        metadata: Some(instance.metadata.to_map()),
    }
}

/// Register or deregister one instance.
pub fn instance_request(
    service: &ServiceKey,
    op: InstanceOp,
    instance: &Instance,
) -> InstanceRequest {
    InstanceRequest {
        target: target(service),
        kind: op.as_wire().to_owned(),
        instance: instance_dto(instance),
    }
}

/// Replace the connection's set of instances of `service` with `instances`.
pub fn batch_request(service: &ServiceKey, instances: &[Instance]) -> BatchInstanceRequest {
    BatchInstanceRequest {
        target: target(service),
        kind: BATCH_REGISTER.to_owned(),
        instances: instances.iter().map(instance_dto).collect(),
    }
}

const BATCH_REGISTER: &str = "batchRegisterInstance";

/// The [`BatchInstanceRequest`] the client sends, serialised straight from
/// the model: the same JSON as [`batch_request`]'s, without building a DTO
/// (owned strings and a map per instance) for every publish.
#[derive(Debug, Clone, Copy)]
pub struct BatchRegister<'a> {
    /// The service whose set this connection replaces.
    pub service: &'a ServiceKey,
    /// The new set (may be empty).
    pub instances: &'a [Instance],
}

impl super::Message for BatchRegister<'_> {
    const TYPE: &'static str = <BatchInstanceRequest as super::Message>::TYPE;
}

impl super::Request for BatchRegister<'_> {
    type Response = BatchInstanceResponse;
}

impl Serialize for BatchRegister<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(7))?;
        // As `NamingTarget` writes itself: empty headers, module, names.
        map.serialize_entry("headers", &std::collections::BTreeMap::<&str, &str>::new())?;
        map.serialize_entry("module", NAMING)?;
        map.serialize_entry("namespace", &*self.service.namespace)?;
        map.serialize_entry("serviceName", &*self.service.name)?;
        map.serialize_entry("groupName", &*self.service.group)?;
        map.serialize_entry("type", BATCH_REGISTER)?;
        map.serialize_entry("instances", &InstancesOut(self.instances))?;
        map.end()
    }
}

struct InstancesOut<'a>(&'a [Instance]);

impl Serialize for InstancesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(InstanceOut))
    }
}

/// An instance as [`instance_dto`] would write it: no id, no service name.
struct InstanceOut<'a>(&'a Instance);

impl Serialize for InstanceOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let i = self.0;
        let mut map = serializer.serialize_map(Some(8))?;
        map.serialize_entry("ip", &*i.ip)?;
        map.serialize_entry("port", &i.port)?;
        map.serialize_entry("weight", &i.weight)?;
        map.serialize_entry("healthy", &i.healthy)?;
        map.serialize_entry("enabled", &i.enabled)?;
        map.serialize_entry("ephemeral", &i.ephemeral)?;
        map.serialize_entry("clusterName", &*i.nacos_cluster)?;
        map.serialize_entry("metadata", &MetadataOut(&i.metadata))?;
        map.end()
    }
}

/// Metadata as a JSON object, in key order (as the DTO's map writes it).
struct MetadataOut<'a>(&'a Metadata);

impl Serialize for MetadataOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter())
    }
}

/// Subscribe to (`true`) or unsubscribe from (`false`) every cluster of `service`.
pub fn subscribe_request(service: &ServiceKey, subscribe: bool) -> SubscribeServiceRequest {
    SubscribeServiceRequest {
        target: target(service),
        subscribe,
        clusters: String::new(),
    }
}

/// Query every host of `service` once.
pub fn query_request(service: &ServiceKey) -> ServiceQueryRequest {
    ServiceQueryRequest {
        target: target(service),
        cluster: String::new(),
        healthy_only: false,
        udp_port: 0,
    }
}

/// A fuzzy watch of every service in every group of `namespace` (3.x): a fresh
/// one (`initializing`, nothing held yet) after each connect.
pub fn fuzzy_watch_all_request(namespace: &str) -> NamingFuzzyWatchRequest {
    NamingFuzzyWatchRequest {
        headers: HashMap::new(),
        module: NAMING.to_owned(),
        namespace: namespace.to_owned(),
        group_key_pattern: fuzzy_pattern_all(namespace),
        received_group_keys: Vec::new(),
        watch_type: "WATCH".to_owned(),
        initializing: true,
    }
}

/// `namespace>>*>>*`: every group, every service.
pub fn fuzzy_pattern_all(namespace: &str) -> String {
    format!("{namespace}>>*>>*")
}

/// `(group, name)` of a fuzzy-watch service key `namespace@@group@@name` in
/// `namespace`; `None` for a key of another namespace or of another shape.
pub fn fuzzy_service_key<'a>(namespace: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(namespace)?.strip_prefix("@@")?;
    let (group, name) = rest.split_once("@@")?;
    (!group.is_empty() && !name.is_empty()).then_some((group, name))
}

/// One page of the names in `namespace` and `group`.
pub fn list_request(
    namespace: &str,
    group: &str,
    page_no: u32,
    page_size: u32,
) -> ServiceListRequest {
    ServiceListRequest {
        headers: HashMap::new(),
        module: NAMING.to_owned(),
        namespace: namespace.to_owned(),
        group_name: group.to_owned(),
        service_name: String::new(),
        page_no,
        page_size,
        selector: None,
    }
}

/// A model instance from a server's DTO.
pub fn instance(dto: &InstanceDto) -> Result<Instance, WireError> {
    instance_in(dto, None, &mut Interner::default())
}

/// As [`instance`], sharing metadata (and its strings) with what
/// `interner` saw before: the instances of one service mostly repeat it.
/// Given the `(group, name)` it belongs to, an instance keeps its id only
/// if it is not the default one (see [`Instance::instance_id`]).
fn instance_in(
    dto: &InstanceDto,
    service: Option<(&str, &str)>,
    interner: &mut Interner,
) -> Result<Instance, WireError> {
    let host = Host {
        ip: dto.ip.as_deref(),
        port: dto.port,
        weight: dto.weight,
        healthy: dto.healthy,
        enabled: dto.enabled,
        ephemeral: dto.ephemeral,
        cluster_name: dto.cluster_name.as_deref(),
    };
    let metadata = dto.metadata.iter().flatten();
    let metadata = interner.metadata_of(metadata.map(|(k, v)| (k.as_str(), v.as_str())));
    let mut instance = host.instance(metadata, interner)?;
    keep_id(&mut instance, dto.instance_id.as_deref(), service);
    Ok(instance)
}

/// The fields of a host as a server sends them, borrowed from wherever
/// they were read (a DTO, or the push's own bytes: `super::push`).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Host<'a> {
    pub(super) ip: Option<&'a str>,
    pub(super) port: i64,
    pub(super) weight: Option<f64>,
    pub(super) healthy: Option<bool>,
    pub(super) enabled: Option<bool>,
    pub(super) ephemeral: Option<bool>,
    pub(super) cluster_name: Option<&'a str>,
}

impl Host<'_> {
    /// The model instance with `metadata` (made by `interner`), without its
    /// id (see [`keep_id`]): the checks and the defaults every host read
    /// from a server gets.
    pub(super) fn instance(
        &self,
        metadata: Metadata,
        interner: &mut Interner,
    ) -> Result<Instance, WireError> {
        let invalid = |field, reason: String| WireError::Invalid {
            class: "Instance",
            field,
            reason,
        };
        let ip = self
            .ip
            .filter(|ip| !ip.is_empty())
            .map(Into::into)
            .ok_or_else(|| invalid("ip", "missing".into()))?;
        let port = u16::try_from(self.port)
            .map_err(|_| invalid("port", format!("{} is out of range", self.port)))?;
        Ok(Instance {
            ip,
            port,
            weight: self.weight.unwrap_or(1.0),
            healthy: self.healthy.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            ephemeral: self.ephemeral.unwrap_or(true),
            nacos_cluster: match self.cluster_name {
                Some(DEFAULT_NACOS_CLUSTER) | None => default_nacos_cluster(),
                Some(other) => interner.str(other),
            },
            metadata,
            instance_id: None,
        })
    }
}

/// Gives `instance` the id the server sent, unless, knowing the `(group,
/// name)` it belongs to, it is the default one (see [`Instance::instance_id`]).
pub(super) fn keep_id(instance: &mut Instance, id: Option<&str>, service: Option<(&str, &str)>) {
    if let Some(id) = id
        && !service.is_some_and(|(group, name)| instance.is_default_id(id, group, name))
    {
        instance.instance_id = Some(id.into());
    }
}

/// Splits a `group@@name` service name; a bare name gets `default_group`.
pub fn split_grouped_name<'a>(name: &'a str, default_group: &'a str) -> (&'a str, &'a str) {
    name.split_once("@@").unwrap_or((default_group, name))
}

/// A model snapshot from a server's `ServiceInfo`. gRPC pushes carry no
/// namespace: the caller supplies the one its connection serves.
pub fn snapshot(namespace: &str, info: &ServiceInfoDto) -> Result<ServiceSnapshot, WireError> {
    let (group, name) = service_name(info.name.as_deref(), info.group_name.as_deref())?;
    // One interner per snapshot: its instances share repeated strings and
    // metadata, and nothing is kept past this push.
    let mut interner = Interner::default();
    let instances = info
        .hosts
        .iter()
        .flatten()
        .filter(|h| h.enabled.unwrap_or(true))
        .map(|h| instance_in(h, Some((group, name)), &mut interner))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceSnapshot {
        service: ServiceKey::new(namespace, group, name),
        instances: instances.into(),
        last_ref_time_ms: info.last_ref_time.unwrap_or(0),
        protect_threshold_reached: info.reach_protection_threshold.unwrap_or(false),
    })
}

/// `(group, name)` of a service view from its `name` and `groupName`
/// fields: the name is required; gRPC sends the bare name and the group
/// apart, HTTP-era payloads `group@@name` (both are accepted).
pub(super) fn service_name<'a>(
    name: Option<&'a str>,
    group: Option<&'a str>,
) -> Result<(&'a str, &'a str), WireError> {
    let raw_name = name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| WireError::Invalid {
            class: "ServiceInfo",
            field: "name",
            reason: "missing".to_owned(),
        })?;
    Ok(split_grouped_name(
        raw_name,
        group.unwrap_or(crate::model::DEFAULT_GROUP),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_out_of_range_port_is_an_error() {
        let dto = InstanceDto {
            ip: Some("10.0.0.1".into()),
            port: 70000,
            ..Default::default()
        };
        let err = instance(&dto).unwrap_err();
        assert!(
            matches!(err, WireError::Invalid { field: "port", .. }),
            "{err}"
        );
    }

    #[test]
    fn instance_without_ip_is_an_error() {
        let dto = InstanceDto {
            port: 80,
            ..Default::default()
        };
        assert!(matches!(
            instance(&dto),
            Err(WireError::Invalid { field: "ip", .. })
        ));
    }

    #[test]
    fn snapshot_accepts_grouped_names_and_drops_disabled_hosts() {
        let info = ServiceInfoDto {
            name: Some("G1@@orders".into()),
            hosts: Some(vec![
                InstanceDto {
                    ip: Some("10.0.0.1".into()),
                    port: 80,
                    enabled: Some(true),
                    ..Default::default()
                },
                InstanceDto {
                    ip: Some("10.0.0.2".into()),
                    port: 80,
                    enabled: Some(false),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let snap = snapshot("ns1", &info).unwrap();
        assert_eq!(snap.service, ServiceKey::new("ns1", "G1", "orders"));
        assert_eq!(snap.instances.len(), 1);
        assert_eq!(&*snap.instances[0].ip, "10.0.0.1");
    }

    #[test]
    fn instances_of_a_snapshot_share_their_cluster_name_and_equal_metadata() {
        let host = |ip: &str| InstanceDto {
            ip: Some(ip.into()),
            port: 80,
            metadata: Some([("app".to_owned(), "orders".to_owned())].into()),
            cluster_name: Some("edge".into()),
            ..Default::default()
        };
        let info = ServiceInfoDto {
            name: Some("orders".into()),
            hosts: Some(vec![host("10.0.0.1"), host("10.0.0.2")]),
            ..Default::default()
        };
        let snap = snapshot("public", &info).unwrap();
        let (a, b) = (&snap.instances[0].metadata, &snap.instances[1].metadata);
        assert!(
            std::sync::Arc::ptr_eq(
                &snap.instances[0].nacos_cluster,
                &snap.instances[1].nacos_cluster
            ),
            "each instance decoded its own cluster name"
        );
        assert_eq!(&*snap.instances[0].nacos_cluster, "edge");
        assert_eq!(a.get("app"), Some("orders"));
        assert_eq!(
            format!("{:p}", a.iter().next().unwrap().0),
            format!("{:p}", b.iter().next().unwrap().0),
            "each instance decoded its own metadata"
        );
    }

    #[test]
    fn batch_register_writes_what_the_dto_writes() {
        let service = ServiceKey::new("ns1", "G1", "orders");
        let instances = [
            Instance::new("10.1.2.3", 8080)
                .with_weight(2.5)
                .with_metadata("zone", "hz")
                .with_metadata("rpl.origin", "sh\"q"),
            Instance {
                healthy: false,
                enabled: false,
                ephemeral: false,
                nacos_cluster: "edge".into(),
                ..Instance::new("10.1.2.4", 9090)
            },
        ];
        let dto = serde_json::to_value(batch_request(&service, &instances)).unwrap();
        let borrowed = serde_json::to_value(BatchRegister {
            service: &service,
            instances: &instances,
        })
        .unwrap();
        assert_eq!(borrowed, dto);
        assert_eq!(borrowed["instances"][1]["clusterName"], "edge");
        // Decoded as the server would, it is the request the DTO describes.
        let back: BatchInstanceRequest = serde_json::from_value(borrowed).unwrap();
        assert_eq!(back, batch_request(&service, &instances));
        let empty = serde_json::to_value(BatchRegister {
            service: &service,
            instances: &[],
        })
        .unwrap();
        assert_eq!(
            empty,
            serde_json::to_value(batch_request(&service, &[])).unwrap()
        );
    }

    #[test]
    fn model_instance_round_trips_through_the_dto() {
        let original = Instance::new("10.1.2.3", 8080)
            .with_weight(2.5)
            .with_metadata("zone", "hz");
        let back = instance(&instance_dto(&original)).unwrap();
        assert_eq!(back, original);
    }

    fn host(ip: &str, port: i64, cluster: &str, id: &str) -> InstanceDto {
        InstanceDto {
            ip: Some(ip.into()),
            port,
            cluster_name: Some(cluster.into()),
            instance_id: Some(id.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_keeps_only_ids_it_cannot_rebuild() {
        let ids = [
            ("10.0.0.1", 80, "DEFAULT", "10.0.0.1#80#DEFAULT#G1@@orders"),
            ("10.0.0.2", 80, "edge", "10.0.0.2#80#edge#G1@@orders"),
            // Not the default: another service, a padded port, an extra
            // part, a custom id.
            (
                "10.0.0.3",
                80,
                "DEFAULT",
                "10.0.0.3#80#DEFAULT#G1@@payments",
            ),
            ("10.0.0.4", 80, "DEFAULT", "10.0.0.4#080#DEFAULT#G1@@orders"),
            (
                "10.0.0.5",
                80,
                "DEFAULT",
                "10.0.0.5#80#DEFAULT#G1@@orders#x",
            ),
            ("10.0.0.6", 80, "DEFAULT", "orders-6"),
            ("10.0.0.7", 80, "DEFAULT", "10.0.0.7#+80#DEFAULT#G1@@orders"),
            ("10.0.0.8", 80, "DEFAULT", "10.0.0.8#80#edge#G1@@orders"),
        ];
        let info = ServiceInfoDto {
            name: Some("orders".into()),
            group_name: Some("G1".into()),
            hosts: Some(
                ids.iter()
                    .map(|(ip, port, c, id)| host(ip, *port, c, id))
                    .collect(),
            ),
            ..Default::default()
        };
        let snap = snapshot("public", &info).unwrap();
        let stored: Vec<Option<&str>> = snap
            .instances
            .iter()
            .map(|i| i.instance_id.as_deref())
            .collect();
        assert_eq!(
            stored[..2],
            [None, None],
            "default ids are rebuilt, not kept"
        );
        for (i, (_, _, _, id)) in ids.iter().enumerate() {
            let instance = &snap.instances[i];
            assert_eq!(instance.id_in(&snap.service), *id, "instance {i}");
            if i >= 2 {
                assert_eq!(stored[i], Some(*id), "instance {i} keeps its own id");
            }
        }
        // Without a service to rebuild from, an id is kept as reported.
        let alone = instance(&host("10.0.0.1", 80, "DEFAULT", ids[0].3)).unwrap();
        assert_eq!(alone.instance_id.as_deref(), Some(ids[0].3));
    }

    proptest::proptest! {
        #[test]
        fn an_id_is_dropped_only_when_it_is_rebuilt_exactly(
            ip in "[0-9a-z.:-]{1,12}",
            port in proptest::prelude::any::<u16>(),
            cluster in "[A-Za-z0-9_#@-]{1,8}",
            group in "[A-Za-z0-9_#@-]{1,8}",
            name in "[A-Za-z0-9_#@.-]{1,10}",
            id in "[0-9a-zA-Z#@._:-]{0,40}",
            derived in proptest::prelude::any::<bool>(),
        ) {
            let id = if derived { format!("{ip}#{port}#{cluster}#{group}@@{name}") } else { id };
            let info = ServiceInfoDto {
                name: Some(name.clone()),
                group_name: Some(group.clone()),
                hosts: Some(vec![host(&ip, i64::from(port), &cluster, &id)]),
                ..Default::default()
            };
            // Names the server would refuse (a group with "@@") are out of scope.
            proptest::prop_assume!(!group.contains("@@"));
            let snap = snapshot("public", &info).unwrap();
            let only = &snap.instances[0];
            // Whatever was dropped, the id reads back exactly as reported.
            proptest::prop_assert_eq!(only.id_in(&snap.service), id.as_str());
        }
    }
}
