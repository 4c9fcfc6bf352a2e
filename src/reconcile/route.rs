//! Routes: which services flow from which cluster to which, and under what
//! names they land.

use std::collections::BTreeMap;

use crate::model::{ClusterId, ServiceKey};

/// A route that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Source and destination are the same cluster.
    #[error("route {0} -> {0} would replicate a cluster into itself")]
    SelfLoop(ClusterId),
    /// A service-name pattern does not parse.
    #[error("invalid service pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A service-name glob (`*`, `?`, `[abc]`), matched against the bare name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(glob::Pattern);

impl Pattern {
    /// Parses a glob.
    pub fn new(pattern: &str) -> Result<Self, RouteError> {
        glob::Pattern::new(pattern)
            .map(Self)
            .map_err(|e| RouteError::Pattern {
                pattern: pattern.to_owned(),
                reason: e.msg.to_owned(),
            })
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.0.matches(name)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// What a route covers. Empty lists mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Source namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Source groups (all when empty).
    pub groups: Vec<String>,
    /// Service names to include (all when empty).
    pub include: Vec<Pattern>,
    /// Service names to leave out, even when included.
    pub exclude: Vec<Pattern>,
}

impl Scope {
    /// Whether the scope covers a source service.
    pub fn covers(&self, service: &ServiceKey) -> bool {
        let listed = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
        listed(&self.namespaces, &service.namespace)
            && listed(&self.groups, &service.group)
            && (self.include.is_empty() || self.include.iter().any(|p| p.matches(&service.name)))
            && !self.exclude.iter().any(|p| p.matches(&service.name))
    }
}

/// Renames on the way to the destination. Unmapped names stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Source namespace -> destination namespace.
    pub namespaces: BTreeMap<String, String>,
    /// Source group -> destination group.
    pub groups: BTreeMap<String, String>,
}

/// `source -> destination`, with a scope and a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    source: ClusterId,
    /// The source id as the origin tag's value, shared by every replica.
    origin: std::sync::Arc<str>,
    destination: ClusterId,
    /// What the route covers.
    pub scope: Scope,
    /// How names change on the way.
    pub mapping: Mapping,
}

impl Route {
    /// A route covering everything, with no renames.
    pub fn new(source: ClusterId, destination: ClusterId) -> Result<Self, RouteError> {
        if source == destination {
            return Err(RouteError::SelfLoop(source));
        }
        let origin = source.0.as_str().into();
        Ok(Self {
            source,
            origin,
            destination,
            scope: Scope::default(),
            mapping: Mapping::default(),
        })
    }

    /// The cluster read from.
    pub fn source(&self) -> &ClusterId {
        &self.source
    }

    /// The origin tag value of this route's replicas (the source id).
    pub fn origin(&self) -> &std::sync::Arc<str> {
        &self.origin
    }

    /// The cluster written to.
    pub fn destination(&self) -> &ClusterId {
        &self.destination
    }

    /// Whether the route carries this source service.
    pub fn covers(&self, service: &ServiceKey) -> bool {
        self.scope.covers(service)
    }

    /// The namespaces this route reads, given those its source cluster
    /// serves: its scope's when it names some, else every one served.
    pub fn source_namespaces(&self, served: &[String]) -> Vec<String> {
        if self.scope.namespaces.is_empty() {
            served.to_vec()
        } else {
            self.scope.namespaces.clone()
        }
    }

    /// Where a source namespace lands on the destination.
    pub fn landing_namespace(&self, namespace: &str) -> String {
        mapped(&self.mapping.namespaces, namespace)
    }

    /// Each namespace this route reads with the one it lands in.
    pub fn namespace_pairs(&self, served: &[String]) -> Vec<(String, String)> {
        self.source_namespaces(served)
            .into_iter()
            .map(|ns| {
                let landing = self.landing_namespace(&ns);
                (ns, landing)
            })
            .collect()
    }

    /// Where a source service lands on the destination. Unmapped parts are
    /// the source key's own shared strings.
    pub fn destination_key(&self, service: &ServiceKey) -> ServiceKey {
        let renamed = |map: &BTreeMap<String, String>, part: &std::sync::Arc<str>| {
            map.get(&**part)
                .map_or_else(|| part.clone(), |to| to.as_str().into())
        };
        ServiceKey {
            namespace: renamed(&self.mapping.namespaces, &service.namespace),
            group: renamed(&self.mapping.groups, &service.group),
            name: service.name.clone(),
        }
    }
}

/// `value` renamed by `map`, or as is.
fn mapped(map: &BTreeMap<String, String>, value: &str) -> String {
    map.get(value).cloned().unwrap_or_else(|| value.to_owned())
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{}", self.source, self.destination)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClusterId {
        ClusterId(s.into())
    }

    #[test]
    fn namespaces_read_and_where_they_land() {
        let served = vec!["public".to_owned(), "dev".to_owned()];
        let mut route = Route::new(id("a"), id("b")).expect("route");
        // No scope: every namespace the source serves, each landing as is.
        assert_eq!(
            route.namespace_pairs(&served),
            [
                ("public".into(), "public".into()),
                ("dev".into(), "dev".into())
            ]
        );
        route.scope.namespaces = vec!["dev".into()];
        route
            .mapping
            .namespaces
            .insert("dev".into(), "staging".into());
        assert_eq!(
            route.namespace_pairs(&served),
            [("dev".into(), "staging".into())]
        );
        assert_eq!(route.landing_namespace("public"), "public");
    }

    #[test]
    fn a_route_into_itself_is_refused() {
        assert_eq!(
            Route::new(id("a"), id("a")),
            Err(RouteError::SelfLoop(id("a")))
        );
    }

    #[test]
    fn scope_filters_by_namespace_group_and_patterns() {
        let mut route = Route::new(id("hz"), id("sh")).unwrap();
        route.scope = Scope {
            namespaces: vec!["prod".into()],
            groups: vec![],
            include: vec![
                Pattern::new("orders*").unwrap(),
                Pattern::new("users").unwrap(),
            ],
            exclude: vec![Pattern::new("*-canary").unwrap()],
        };
        let key = |ns: &str, name: &str| ServiceKey::new(ns, "G", name);
        assert!(route.covers(&key("prod", "orders")));
        assert!(route.covers(&key("prod", "orders-v2")));
        assert!(route.covers(&key("prod", "users")));
        assert!(!route.covers(&key("prod", "orders-canary")));
        assert!(!route.covers(&key("prod", "payments")));
        assert!(!route.covers(&key("dev", "orders")));
        assert!(Pattern::new("[").is_err());
    }

    #[test]
    fn mapping_renames_namespace_and_group_only() {
        let mut route = Route::new(id("hz"), id("sh")).unwrap();
        route
            .mapping
            .namespaces
            .insert("prod".into(), "prod-hz".into());
        route
            .mapping
            .groups
            .insert("DEFAULT_GROUP".into(), "FROM_HZ".into());
        let mapped = route.destination_key(&ServiceKey::new("prod", "DEFAULT_GROUP", "orders"));
        assert_eq!(mapped, ServiceKey::new("prod-hz", "FROM_HZ", "orders"));
        let source = ServiceKey::new("dev", "OTHER", "orders");
        let untouched = route.destination_key(&source);
        assert_eq!(untouched, source);
        assert!(
            std::sync::Arc::ptr_eq(&untouched.namespace, &source.namespace)
                && std::sync::Arc::ptr_eq(&untouched.group, &source.group)
                && std::sync::Arc::ptr_eq(&untouched.name, &source.name),
            "an unmapped key copied its strings"
        );
    }
}
