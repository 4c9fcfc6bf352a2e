//! The service catalog: every service of the namespace, in every group.
//!
//! The fuzzy watch (3.x, see `fuzzy`) is read first; without one, the
//! server's HTTP listing: 3.x's admin API or 2.x's catalog, the one that
//! answers learnt from the server's replies and remembered in
//! [`ServerInfo`], which also carries the version the state document gave.

use tokio::sync::watch;
use tracing::{debug, info};

use super::{Client, ClientError, Live, Shared};
use crate::cluster::auth::{Relogin, TOKEN_KEY};
use crate::model::ClusterId;

/// How a cluster lists a namespace's services in every group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogApi {
    /// Nacos 2.x: `GET /v1/ns/catalog/services` (`count`, `serviceList[].{name,groupName}`).
    V1Catalog,
    /// Nacos 3.x: `GET /v3/admin/ns/service/list` (`data.totalCount`,
    /// `data.pageItems[].{name,groupName}`), which needs a user's token.
    V3Admin,
    /// Nacos 3.x over gRPC: a fuzzy watch of `namespace>>*>>*`. The server
    /// sends every service key at the start and each one created or removed
    /// since, so a new service is seen at once; it needs no user when client
    /// auth is off. The server tracks up to 500 services per pattern by
    /// default (`nacos.naming.fuzzy.watch.max.pattern.match.service.count`):
    /// past that it refuses the watch (50311) and the HTTP listing is used.
    FuzzyWatch,
}

impl CatalogApi {
    /// Words for logs, `check` and `/status`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::V1Catalog => "v1 catalog (Nacos 2.x)",
            Self::V3Admin => "v3 admin service list (Nacos 3.x)",
            Self::FuzzyWatch => "fuzzy watch (Nacos 3.x gRPC)",
        }
    }
}

/// The two HTTP listings, one per server line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpCatalog {
    V1,
    V3,
}

impl From<HttpCatalog> for CatalogApi {
    fn from(http: HttpCatalog) -> Self {
        match http {
            HttpCatalog::V1 => Self::V1Catalog,
            HttpCatalog::V3 => Self::V3Admin,
        }
    }
}

impl HttpCatalog {
    /// The path under the context path.
    fn path(self) -> &'static str {
        match self {
            Self::V1 => "/v1/ns/catalog/services",
            Self::V3 => "/v3/admin/ns/service/list",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::V1 => Self::V3,
            Self::V3 => Self::V1,
        }
    }

    /// One page: its entries as `(group, name)` and the total count.
    fn parse_page(self, body: &str) -> Result<(Vec<(String, String)>, u64), serde_json::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry {
            name: String,
            group_name: String,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V1Page {
            count: u64,
            #[serde(default)]
            service_list: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V3Data {
            total_count: u64,
            #[serde(default)]
            page_items: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct V3Page {
            data: V3Data,
        }
        let pairs = |entries: Vec<Entry>| {
            entries
                .into_iter()
                .map(|e| (e.group_name, e.name))
                .collect()
        };
        Ok(match self {
            Self::V1 => {
                let page: V1Page = serde_json::from_str(body)?;
                (pairs(page.service_list), page.count)
            }
            Self::V3 => {
                let page: V3Page = serde_json::from_str(body)?;
                (pairs(page.data.page_items), page.data.total_count)
            }
        })
    }
}

/// What a catalog listing is called in errors.
const LISTING: &str = "listing the service catalog";

/// A listing through one API: failed, or not served by this server at all.
enum CatalogError {
    Unsupported(u16),
    Failed(ClientError),
}

impl CatalogError {
    fn into_client(self, cluster: &ClusterId) -> ClientError {
        match self {
            Self::Failed(e) => e,
            Self::Unsupported(status) => ClientError::Http {
                cluster: cluster.clone(),
                op: LISTING,
                url: String::new(),
                reason: format!(
                    "HTTP {status}: the server serves neither the v1 catalog (Nacos 2.x) nor the v3 admin \
                     service list (Nacos 3.x)"
                ),
            },
        }
    }
}

/// What a client knows of the server it is connected to, for operators
/// (`check --connect`, `/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// The exact version when the server told it (its state document:
    /// `/v1/console/server/state` on 2.x, `/v3/admin/core/state` on 3.x).
    pub version: Option<String>,
    /// The line, from what the connection showed: `3.x` when the server
    /// announces fuzzy watch, `2.x` otherwise.
    pub line: Option<String>,
    /// How services are listed, once a listing succeeded.
    pub listing: Option<CatalogApi>,
}

impl std::fmt::Display for ServerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.version, &self.line) {
            (Some(v), _) => write!(f, "Nacos {v}")?,
            (None, Some(line)) => write!(f, "Nacos {line} (exact version not reported)")?,
            (None, None) => write!(f, "Nacos (version unknown)")?,
        }
        if let Some(listing) = self.listing {
            write!(f, ", listing by {}", listing.describe())?;
        }
        Ok(())
    }
}

/// A fingerprint of a catalog (see [`Client::catalog_probe`]): two that
/// differ mean a service was created or removed in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogProbe {
    /// Services in the namespace, as the server counts them.
    pub services: u64,
    /// The first entry of the server's first page, as `(group, name)`.
    pub first: Option<(String, String)>,
}

impl Client {
    /// Every service of the namespace, in every group, as `(group, name)`,
    /// sorted. The gRPC list needs an exact group, so this reads the
    /// server's HTTP listing (all pages) from the server the client is
    /// connected to: 2.x's catalog (`/v1/ns/catalog/services`) or 3.x's admin
    /// API (`/v3/admin/ns/service/list`; 3.x answers the v1 catalog 410 unless
    /// a deprecated compatibility switch is on, and 3.2 removes it). Which one
    /// a cluster serves is learnt from its answers (404 to the v3 path on 2.x,
    /// 410 to the v1 path on 3.x) and remembered; see [`Client::catalog_api`].
    /// Services with no instances are included. While the session's fuzzy
    /// watch (3.x) covers the namespace, its set is the answer, without HTTP.
    pub async fn catalog(&self) -> Result<Vec<(String, String)>, ClientError> {
        let live = self
            .live_session(self.shared.config.session.request_timeout)
            .await?;
        if let Some(services) = self.fuzzy_catalog(&live).await {
            self.remember_catalog_api(CatalogApi::FuzzyWatch);
            return Ok(services);
        }
        let page_size = self.shared.config.list_page_size.max(1);
        let (mut out, _) = self.http_catalog(&live, page_size, None).await?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// A cheap fingerprint of the catalog, for polling often between
    /// listings: the first page of one entry, which gives the service count
    /// and one name. On 2.x the server answers it from its namespace set
    /// without walking it (the count is the set's size, the page the set's
    /// first element), so it costs about what a health check does whatever
    /// the catalog's size; 3.x's admin list copies the set into a list
    /// first, still microseconds at 10,000 services. When two probes differ,
    /// something was created or removed in between; a creation and a removal
    /// that cancel out can look the same, which the periodic full listing
    /// catches. `None` while the session's fuzzy watch (3.x) is accepted: it
    /// reports changes itself, there is nothing to poll; once it is refused
    /// or withdrawn, probing resumes.
    pub async fn catalog_probe(&self) -> Result<Option<CatalogProbe>, ClientError> {
        if self.fuzzy_watch_accepted() {
            return Ok(None);
        }
        let live = self
            .live_session(self.shared.config.session.request_timeout)
            .await?;
        let (mut first, services) = self.http_catalog(&live, 1, Some(1)).await?;
        Ok(Some(CatalogProbe {
            services,
            first: first.pop(),
        }))
    }

    /// Pages of the HTTP listing this server serves (the remembered one
    /// first, the other line's when that one is not served at all), at most
    /// `max_pages` of them: the entries and the total the server reported.
    async fn http_catalog(
        &self,
        live: &Live,
        page_size: u32,
        max_pages: Option<u32>,
    ) -> Result<(Vec<(String, String)>, u64), ClientError> {
        let first = match self.catalog_api() {
            Some(CatalogApi::V1Catalog) => HttpCatalog::V1,
            _ => HttpCatalog::V3,
        };
        let cluster = &self.shared.config.cluster;
        match self.catalog_with(live, first, page_size, max_pages).await {
            Err(CatalogError::Unsupported(_)) => {
                let other = first.other();
                let out = self
                    .catalog_with(live, other, page_size, max_pages)
                    .await
                    .map_err(|e| e.into_client(cluster))?;
                self.remember_catalog_api(other.into());
                Ok(out)
            }
            Err(e) => Err(e.into_client(cluster)),
            Ok(out) => {
                self.remember_catalog_api(first.into());
                Ok(out)
            }
        }
    }

    /// A change counter of the namespace's service set, bumped by the fuzzy
    /// watch (3.x) when a service appears or goes: list again when it moves.
    /// On 2.x it never moves; poll.
    pub fn catalog_changes(&self) -> watch::Receiver<u64> {
        self.shared.catalog_changes.subscribe()
    }

    /// Asks the watchers of this client for a fresh full listing (`Init`,
    /// every service queried afresh, `InitDone`) as soon as they can; a
    /// watcher that is not connected lists in full on its reconnect anyway.
    pub fn request_relist(&self) {
        self.shared.relists.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Moves on every [`Client::request_relist`].
    pub fn relist_requests(&self) -> watch::Receiver<u64> {
        self.shared.relists.subscribe()
    }

    /// The listing this cluster has answered with, once a listing succeeded.
    pub fn catalog_api(&self) -> Option<CatalogApi> {
        self.shared.server_info.borrow().listing
    }

    fn remember_catalog_api(&self, api: CatalogApi) {
        let changed = self.shared.server_info.send_if_modified(|i| {
            let changed = i.listing != Some(api);
            i.listing = Some(api);
            changed
        });
        if changed {
            info!(
                listing = api.describe(),
                "service listing method chosen from the server's answers"
            );
        }
    }

    /// What the client has learnt of its server (version, line, listing
    /// method), as a watch: the current value and every change.
    pub fn server_info(&self) -> watch::Receiver<ServerInfo> {
        self.shared.server_info.subscribe()
    }

    /// Pages of one HTTP listing (all of them, or the first `max_pages`):
    /// the entries as the server ordered them, and the total it reported.
    async fn catalog_with(
        &self,
        live: &Live,
        api: HttpCatalog,
        page_size: u32,
        max_pages: Option<u32>,
    ) -> Result<(Vec<(String, String)>, u64), CatalogError> {
        let url = self.shared.http.url(&live.server, api.path());
        let mut out = Vec::new();
        let mut relogin = Relogin::default();
        let mut page_no = 1u32;
        loop {
            let (status, body) = self
                .fetch_catalog_page(live, &url, page_no, page_size)
                .await?;
            let auth = self.shared.auth.as_ref();
            if relogin.retry(auth, status == 403, "catalog").await {
                continue;
            }
            self.check_catalog_status(api, &url, page_no, status, &body)?;
            let (entries, total) = api
                .parse_page(&body)
                .map_err(|e| self.catalog_http_error(&url, format!("unreadable reply: {e}")))?;
            let got = entries.len();
            out.extend(entries);
            let last = max_pages.is_some_and(|max| page_no >= max);
            if last || got < page_size as usize || out.len() as u64 >= total {
                return Ok((out, total));
            }
            page_no += 1;
        }
    }

    /// One page of a listing, with the token when the client has a user:
    /// the HTTP status and the body.
    async fn fetch_catalog_page(
        &self,
        live: &Live,
        url: &str,
        page_no: u32,
        page_size: u32,
    ) -> Result<(u16, String), CatalogError> {
        let mut query = vec![
            ("namespaceId", self.shared.config.namespace.clone()),
            ("pageNo", page_no.to_string()),
            ("pageSize", page_size.to_string()),
        ];
        if let Some(auth) = &self.shared.auth {
            let headers = auth.headers(&live.server).await.map_err(|source| {
                CatalogError::Failed(ClientError::Auth {
                    cluster: self.cluster().clone(),
                    source,
                })
            })?;
            if let Some(token) = headers.get(TOKEN_KEY) {
                query.push((TOKEN_KEY, token.clone()));
            }
        }
        let response = self
            .shared
            .http
            .client()
            .get(url)
            .query(&query)
            .send()
            .await
            .map_err(|e| self.catalog_http_error(url, e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| self.catalog_http_error(url, e.to_string()))?;
        Ok((status, body))
    }

    /// What a page's status other than 200 means (a 403 the client could
    /// retry with a fresh token has been retried already).
    fn check_catalog_status(
        &self,
        api: HttpCatalog,
        url: &str,
        page_no: u32,
        status: u16,
        body: &str,
    ) -> Result<(), CatalogError> {
        // The server does not serve this API at all: 2.x has no v3 path
        // (404); 3.x retired the v1 catalog (410, or 404 once removed).
        if page_no == 1 && matches!(status, 404 | 410) {
            return Err(CatalogError::Unsupported(status));
        }
        if status == 403 && api == HttpCatalog::V3 && self.shared.auth.is_none() {
            return Err(self.catalog_http_error(
                url,
                format!(
                    "HTTP 403: Nacos 3.x lists services only through its admin API, which wants a user even \
                     when client auth is off: give cluster {} a username and password (read permission on \
                     namespace {:?} is enough)",
                    self.cluster(),
                    self.shared.config.namespace
                ),
            ));
        }
        if status != 200 {
            return Err(self.catalog_http_error(
                url,
                format!(
                    "HTTP {status}: {}",
                    body.chars().take(200).collect::<String>()
                ),
            ));
        }
        Ok(())
    }

    fn catalog_http_error(&self, url: &str, reason: String) -> CatalogError {
        CatalogError::Failed(ClientError::Http {
            cluster: self.cluster().clone(),
            op: LISTING,
            url: url.to_owned(),
            reason,
        })
    }
}

/// The server's exact version from its state document, which needs no user
/// on either line: 2.x's `/v1/console/server/state` (`version`), 3.x's
/// `/v3/admin/core/state` (`data.version`; 3.x answers the v1 path 410).
pub(super) async fn probe_version(shared: &Shared, server: &str, v3: bool) -> Option<String> {
    let (path, pointer) = if v3 {
        ("/v3/admin/core/state", "/data/version")
    } else {
        ("/v1/console/server/state", "/version")
    };
    let mut request = shared.http.client().get(shared.http.url(server, path));
    if let Some(auth) = &shared.auth
        && let Ok(headers) = auth.headers(server).await
        && let Some(token) = headers.get(TOKEN_KEY)
    {
        request = request.query(&[(TOKEN_KEY, token.as_str())]);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        debug!(status = %response.status(), path, "server version not readable");
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body.pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
}
