//! The harness's own HTTP client for the server's API: the [`NacosServer`] methods that call it
//! (login, instances, namespaces, services, subscribers, connection resets), the request and
//! decoding helpers under them, and the data they send and receive ([`HttpInstance`],
//! [`ListedInstance`]).
//!
//! Must not: share code with the replicator's own client (tests check the replicator through
//! code written apart from it), or send traffic anywhere but loopback.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::error::HarnessError;
use super::util::{bool_str, is_loopback, quote};
use super::{ADMIN_PASSWORD, ADMIN_USERNAME, NacosServer};
use crate::runtime::lock;

impl NacosServer {
    /// Logs in over HTTP (`POST /v1/auth/users/login` on 2.x, `/v3/auth/user/login` on 3.x)
    /// and returns the access token.
    ///
    /// A wrong user or password is an [`HarnessError::HttpStatus`] with status 403 on 2.x, 500
    /// on 3.x.
    pub fn login(&self, username: &str, password: &str) -> Result<String, HarnessError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Login {
            access_token: String,
        }
        let path = if self.major >= 3 {
            "/v3/auth/user/login"
        } else {
            "/v1/auth/users/login"
        };
        let params = [("username", username), ("password", password)];
        let body = self.request(Method::Post, path, &params, false)?;
        let login: Login = self.decode(Method::Post, path, &body)?;
        Ok(login.access_token)
    }

    /// The admin's access token when auth is on (logged in once, then cached), else `None`.
    /// The HTTP helpers below pass it themselves.
    pub fn access_token(&self) -> Result<Option<String>, HarnessError> {
        if self.opts.auth.is_none() {
            return Ok(None);
        }
        let mut token = lock(&self.token);
        if token.is_none() {
            *token = Some(self.login(ADMIN_USERNAME, ADMIN_PASSWORD)?);
        }
        Ok(token.clone())
    }

    /// Registers an instance through the v1 open API (`POST /v1/ns/instance`).
    ///
    /// A persistent instance must have a loopback address (see the module docs); an ephemeral
    /// one expires about 30 s after registration, as nothing renews it.
    pub fn register_instance_http(&self, instance: &HttpInstance) -> Result<(), HarnessError> {
        if !instance.ephemeral && !is_loopback(&instance.ip) {
            return Err(HarnessError::NonLoopbackPersistent {
                ip: instance.ip.clone(),
                port: instance.port,
            });
        }
        self.send_instance(Method::Post, instance)
    }

    /// Changes an instance's weight, enabled flag and metadata through the open API
    /// (`PUT /v1/ns/instance` on 2.x, `PUT /v3/admin/ns/instance` on 3.x, whose v1 answers
    /// 410), as the console's edit and "offline" do. A real server keeps
    /// this as an overlay beside the instance (weight and enabled replaced, metadata merged
    /// in) and applies it whichever connection registered the instance: the owner is not
    /// told, and its registering the instance again does not undo it.
    pub fn update_instance_http(&self, instance: &HttpInstance) -> Result<(), HarnessError> {
        self.send_instance(Method::Put, instance)
    }

    /// Registers (POST) or changes (PUT) an instance: the v1 path on 2.x, and for a change on
    /// 3.x the v3 admin path.
    fn send_instance(&self, method: Method, instance: &HttpInstance) -> Result<(), HarnessError> {
        let metadata = serde_json::to_string(&instance.metadata).map_err(|err| {
            HarnessError::InvalidOptions {
                reason: format!("instance metadata cannot be encoded: {err}"),
            }
        })?;
        let port = instance.port.to_string();
        let weight = instance.weight.to_string();
        let mut params = instance.identity_params(&port);
        params.extend([
            ("weight", weight.as_str()),
            ("enabled", bool_str(instance.enabled)),
            ("healthy", bool_str(instance.healthy)),
            ("metadata", metadata.as_str()),
        ]);
        if self.major >= 3 && matches!(method, Method::Put) {
            let path = "/v3/admin/ns/instance";
            let body = self.request(method, path, &params, true)?;
            return self.expect_v3_success(method, path, &body);
        }
        self.request(method, "/v1/ns/instance", &params, true)
            .map(drop)
    }

    /// Deregisters an instance through the v1 open API (`DELETE /v1/ns/instance`); only its
    /// namespace, group, service, cluster, ip, port and `ephemeral` matter.
    pub fn deregister_instance_http(&self, instance: &HttpInstance) -> Result<(), HarnessError> {
        let port = instance.port.to_string();
        let params = instance.identity_params(&port);
        self.request(Method::Delete, "/v1/ns/instance", &params, true)
            .map(drop)
    }

    /// Lists a service's instances through the v1 open API (`GET /v1/ns/instance/list`),
    /// healthy or not. Instances with `enabled=false` are never listed; an unknown service
    /// lists nothing.
    pub fn list_instances_http(
        &self,
        namespace: &str,
        group: &str,
        service: &str,
    ) -> Result<Vec<ListedInstance>, HarnessError> {
        #[derive(Deserialize)]
        struct Listing {
            #[serde(default)]
            hosts: Vec<ListedInstance>,
        }
        let path = "/v1/ns/instance/list";
        let params = [
            ("namespaceId", namespace),
            ("groupName", group),
            ("serviceName", service),
            ("healthyOnly", "false"),
        ];
        let body = self.request(Method::Get, path, &params, true)?;
        let listing: Listing = self.decode(Method::Get, path, &body)?;
        Ok(listing.hosts)
    }

    /// Creates a namespace whose id and name are `id` (`POST /v1/console/namespaces` on 2.x,
    /// `POST /v3/admin/core/namespace` on 3.x).
    pub fn create_namespace_http(&self, id: &str) -> Result<(), HarnessError> {
        // The same request but for the id's key (3.x refuses `customNamespaceId`).
        let (path, id_key) = if self.major >= 3 {
            ("/v3/admin/core/namespace", "namespaceId")
        } else {
            ("/v1/console/namespaces", "customNamespaceId")
        };
        let params = [
            (id_key, id),
            ("namespaceName", id),
            (
                "namespaceDesc",
                "created by the nacos-replicator test harness",
            ),
        ];
        let body = self.request(Method::Post, path, &params, true)?;
        if self.major >= 3 {
            return self.expect_v3_success(Method::Post, path, &body);
        }
        if body.trim() == "true" {
            Ok(())
        } else {
            Err(self.bad_response(Method::Post, path, "expected `true`".to_owned(), &body))
        }
    }

    /// Makes the server send a `ConnectResetRequest` to one SDK connection,
    /// naming `redirect` (`host:http_port`) as the server to move to, if given
    /// (`GET /v2/core/loader/reloadClient` on 2.x, `POST /v3/admin/core/loader/reloadClient`
    /// on 3.x).
    pub fn reset_connection(
        &self,
        connection_id: &str,
        redirect: Option<&str>,
    ) -> Result<(), HarnessError> {
        let mut params = vec![("connectionId", connection_id)];
        if let Some(redirect) = redirect {
            params.push(("redirectAddress", redirect));
        }
        if self.major >= 3 {
            let path = "/v3/admin/core/loader/reloadClient";
            let body = self.request(Method::Post, path, &params, true)?;
            return self.expect_v3_success(Method::Post, path, &body);
        }
        let path = "/v2/core/loader/reloadClient";
        self.request(Method::Get, path, &params, true).map(|_| ())
    }

    /// Every service of `namespace` in every group, as `(group, name)`, sorted, through the
    /// server's own listing: `/v1/ns/catalog/services` on 2.x, `/v3/admin/ns/service/list` on
    /// 3.x (one page of up to 1,000; tests list fewer).
    pub fn list_services_http(
        &self,
        namespace: &str,
    ) -> Result<Vec<(String, String)>, HarnessError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry {
            name: String,
            group_name: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V2 {
            #[serde(default)]
            service_list: Vec<Entry>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V3Page {
            #[serde(default)]
            page_items: Vec<Entry>,
        }
        #[derive(Deserialize)]
        struct V3 {
            data: V3Page,
        }
        let params = [
            ("namespaceId", namespace),
            ("pageNo", "1"),
            ("pageSize", "1000"),
        ];
        let entries = if self.major >= 3 {
            let path = "/v3/admin/ns/service/list";
            let body = self.request(Method::Get, path, &params, true)?;
            self.decode::<V3>(Method::Get, path, &body)?.data.page_items
        } else {
            let path = "/v1/ns/catalog/services";
            let body = self.request(Method::Get, path, &params, true)?;
            self.decode::<V2>(Method::Get, path, &body)?.service_list
        };
        let mut out: Vec<(String, String)> = entries
            .into_iter()
            .map(|e| (e.group_name, e.name))
            .collect();
        out.sort();
        Ok(out)
    }

    /// How many subscribers the server lists for a service: `count` of
    /// `/v1/ns/service/subscribers` on 2.x, `data.totalCount` of
    /// `/v3/admin/ns/service/subscribers` on 3.x.
    pub fn subscriber_count_http(
        &self,
        namespace: &str,
        group: &str,
        service: &str,
    ) -> Result<u64, HarnessError> {
        let params = [
            ("namespaceId", namespace),
            ("groupName", group),
            ("serviceName", service),
            ("pageNo", "1"),
            ("pageSize", "100"),
        ];
        let (path, pointer) = if self.major >= 3 {
            ("/v3/admin/ns/service/subscribers", "/data/totalCount")
        } else {
            ("/v1/ns/service/subscribers", "/count")
        };
        let body = self.request(Method::Get, path, &params, true)?;
        let value: serde_json::Value = self.decode(Method::Get, path, &body)?;
        value
            .pointer(pointer)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| self.bad_response(Method::Get, path, format!("no {pointer}"), &body))
    }

    /// A 3.x answer `{"code":0,...}` is success; anything else is a bad response.
    fn expect_v3_success(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> Result<(), HarnessError> {
        #[derive(Deserialize)]
        struct Reply {
            code: i64,
        }
        match self.decode::<Reply>(method, path, body)? {
            Reply { code: 0 } => Ok(()),
            Reply { code } => Err(self.bad_response(method, path, format!("code {code}"), body)),
        }
    }

    /// One request to the HTTP API: form body for POST, query otherwise; the admin's token
    /// added when `with_token` and auth is on. Returns the body of a 200.
    pub(super) fn request(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, &str)],
        with_token: bool,
    ) -> Result<String, HarnessError> {
        if !self.is_running() {
            return Err(HarnessError::Stopped);
        }
        let token = if with_token {
            self.access_token()?
        } else {
            None
        };
        let mut pairs = params.to_vec();
        if let Some(token) = token.as_deref() {
            pairs.push(("accessToken", token));
        }
        let url = format!("{}{path}", self.http_base());
        // 3.x guards its admin API even with auth off: the harness passes as the server
        // identity there (never on 2.x, whose tests check what a token allows).
        let identity = self
            .secrets
            .as_ref()
            .filter(|_| self.major >= 3)
            .map(|s| (s.identity_key.as_str(), s.identity_value.as_str()));
        let result = match (method, identity) {
            (Method::Get, None) => self.http.get(&url).query_pairs(pairs).call(),
            (Method::Get, Some((k, v))) => {
                self.http.get(&url).header(k, v).query_pairs(pairs).call()
            }
            (Method::Delete, None) => self.http.delete(&url).query_pairs(pairs).call(),
            (Method::Delete, Some((k, v))) => self
                .http
                .delete(&url)
                .header(k, v)
                .query_pairs(pairs)
                .call(),
            (Method::Post, None) => self.http.post(&url).send_form(pairs),
            (Method::Post, Some((k, v))) => self.http.post(&url).header(k, v).send_form(pairs),
            (Method::Put, None) => self.http.put(&url).send_form(pairs),
            (Method::Put, Some((k, v))) => self.http.put(&url).header(k, v).send_form(pairs),
        };
        let http_error = |source| HarnessError::Http {
            method: method.name(),
            url: url.clone(),
            source: Box::new(source),
        };
        let mut response = result.map_err(http_error)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(http_error)?;
        if status == 200 {
            Ok(body)
        } else {
            Err(HarnessError::HttpStatus {
                method: method.name(),
                url,
                status,
                body: quote(&body),
            })
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> Result<T, HarnessError> {
        serde_json::from_str(body)
            .map_err(|err| self.bad_response(method, path, err.to_string(), body))
    }

    fn bad_response(&self, method: Method, path: &str, reason: String, body: &str) -> HarnessError {
        HarnessError::BadResponse {
            method: method.name(),
            url: format!("{}{path}", self.http_base()),
            reason,
            body: quote(body),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

pub(super) fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

// ---------------------------------------------------------------------------------------------
// The HTTP client's data.

/// An instance for the v1 open API helpers.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpInstance {
    /// Namespace id (`namespaceId`), e.g. `public`.
    pub namespace: String,
    /// Group (`groupName`), e.g. `DEFAULT_GROUP`.
    pub group: String,
    /// Service name without group (`serviceName`).
    pub service: String,
    /// Nacos' per-service cluster (`clusterName`), e.g. `DEFAULT`; no `_` allowed.
    pub cluster: String,
    /// Address (must be loopback when persistent).
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Ephemeral (expires after ~30 s without v1 heartbeats) or persistent (stays until
    /// deregistered; its `healthy` follows a TCP probe of `ip:port`).
    pub ephemeral: bool,
    /// Weight.
    pub weight: f64,
    /// Whether it is enabled (disabled instances are never listed).
    pub enabled: bool,
    /// The health it is registered with.
    pub healthy: bool,
    /// Metadata, sent as one JSON object.
    pub metadata: BTreeMap<String, String>,
}

impl Default for HttpInstance {
    /// A persistent, enabled, healthy instance of weight 1 in namespace `public`, group
    /// `DEFAULT_GROUP`, cluster `DEFAULT`, without metadata; service, ip and port are empty.
    fn default() -> Self {
        Self {
            namespace: "public".to_owned(),
            group: "DEFAULT_GROUP".to_owned(),
            service: String::new(),
            cluster: "DEFAULT".to_owned(),
            ip: String::new(),
            port: 0,
            ephemeral: false,
            weight: 1.0,
            enabled: true,
            healthy: true,
            metadata: BTreeMap::new(),
        }
    }
}

impl HttpInstance {
    /// The [`Default`] instance with this service, ip and port.
    pub fn new(service: impl Into<String>, ip: impl Into<String>, port: u16) -> Self {
        Self {
            service: service.into(),
            ip: ip.into(),
            port,
            ..Self::default()
        }
    }

    fn identity_params<'a>(&'a self, port: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("namespaceId", self.namespace.as_str()),
            ("groupName", self.group.as_str()),
            ("serviceName", self.service.as_str()),
            ("clusterName", self.cluster.as_str()),
            ("ip", self.ip.as_str()),
            ("port", port),
            ("ephemeral", bool_str(self.ephemeral)),
        ]
    }
}

/// An instance as `GET /v1/ns/instance/list` reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedInstance {
    /// Instance id, e.g. `127.0.0.1#8080#DEFAULT#DEFAULT_GROUP@@orders`.
    #[serde(default)]
    pub instance_id: String,
    /// Address.
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Weight.
    #[serde(default)]
    pub weight: f64,
    /// Health as the server sees it.
    #[serde(default)]
    pub healthy: bool,
    /// Whether it is enabled.
    #[serde(default)]
    pub enabled: bool,
    /// Whether it is ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
    /// Nacos' per-service cluster.
    #[serde(default)]
    pub cluster_name: String,
    /// `group@@service`.
    #[serde(default)]
    pub service_name: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}
