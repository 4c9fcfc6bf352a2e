//! The fuzzy watch of the current session (3.x): the server sends every
//! service key of the namespace at the start and each one created or
//! removed since, so a listing is current without polling. The set is
//! reset with each new session, which asks for the watch again; a refused
//! or withdrawn watch leaves the client on HTTP listings.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::calls::send;
use super::{Client, ClientError, Live, Shared};
use crate::runtime::lock;
use crate::transport::FuzzyPush;
use crate::wire::convert;

/// The fuzzy watch of the current session.
pub(super) struct Fuzzy {
    /// The server accepted the watch on this session.
    accepted: bool,
    /// Its init sync has finished: `services` is the whole namespace.
    complete: bool,
    services: BTreeSet<(String, String)>,
    /// When the server last confirmed the watch.
    verified: Instant,
}

impl Default for Fuzzy {
    fn default() -> Self {
        Self {
            accepted: false,
            complete: false,
            services: Default::default(),
            verified: Instant::now(),
        }
    }
}

/// The least time a listing waits for the fuzzy watch's init sync.
const FUZZY_INIT_WAIT: Duration = Duration::from_secs(10);

/// How often a listing through the fuzzy watch asks the server to confirm it.
const FUZZY_REVERIFY_EVERY: Duration = Duration::from_secs(30);

/// The ability a server announces when it serves fuzzy watches (3.x).
pub(super) const FUZZY_WATCH_ABILITY: &str = "fuzzyWatch";

impl Client {
    /// The server fuzzy-watches this namespace for the current session: it
    /// reports services created and removed, so polling is needless.
    pub(super) fn fuzzy_watch_accepted(&self) -> bool {
        lock(&self.shared.fuzzy).accepted
    }

    /// The fuzzy-watched set, once the current session's init sync is done
    /// (waiting up to [`FUZZY_INIT_WAIT`] for it); `None` when the server does
    /// not fuzzy-watch for us (2.x, refused, over its limits).
    pub(super) async fn fuzzy_catalog(&self, live: &Live) -> Option<Vec<(String, String)>> {
        self.reverify_fuzzy_watch(live).await;
        let mut changes = self.shared.catalog_changes.subscribe();
        // The server sends the init sync through its push queue (delayed like
        // any push): give it more than one request's time.
        let deadline = tokio::time::Instant::now()
            + self
                .shared
                .config
                .session
                .request_timeout
                .max(FUZZY_INIT_WAIT);
        loop {
            {
                let fuzzy = lock(&self.shared.fuzzy);
                if !fuzzy.accepted {
                    return None;
                }
                if fuzzy.complete {
                    return Some(fuzzy.services.iter().cloned().collect());
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    debug!("fuzzy watch init sync not finished in time; listing over HTTP");
                    return None;
                }
            }
        }
    }

    /// Past its match limit a server drops new matches silently, and a push
    /// may be lost with a connection hiccup: at most every
    /// [`FUZZY_REVERIFY_EVERY`], the watch is asked for again with the keys
    /// held, so the server sends what differs, or says the watch is over its
    /// limit (then the client lists over HTTP from now on).
    async fn reverify_fuzzy_watch(&self, live: &Live) {
        let request = {
            let mut fuzzy = lock(&self.shared.fuzzy);
            if !fuzzy.accepted || !fuzzy.complete || fuzzy.verified.elapsed() < FUZZY_REVERIFY_EVERY
            {
                return;
            }
            fuzzy.verified = Instant::now();
            let mut request = convert::fuzzy_watch_all_request(&self.shared.config.namespace);
            request.initializing = false;
            request.received_group_keys = fuzzy
                .services
                .iter()
                .map(|(group, name)| format!("{}@@{group}@@{name}", self.shared.config.namespace))
                .collect();
            request
        };
        if let Err(e) = send(&self.shared, live, "fuzzy watch check", &request).await {
            if matches!(&e, ClientError::Call { source, .. } if source.is_retryable()) {
                debug!(error = %e, "fuzzy watch check failed; kept");
                return;
            }
            warn!(error = %e, "the server no longer fuzzy-watches the whole namespace for us; listing services over HTTP instead");
            *lock(&self.shared.fuzzy) = Fuzzy::default();
        }
    }
}

/// Asks the server to fuzzy-watch every service of the namespace. A refusal
/// (too many patterns on the server, 50310; more matches than it tracks,
/// 50311; anything else) leaves the client on HTTP listings, with a warning
/// that says why.
pub(super) async fn start_fuzzy_watch(shared: &Shared, live: &Live) {
    let request = convert::fuzzy_watch_all_request(&shared.config.namespace);
    match send(shared, live, "fuzzy watch", &request).await {
        Ok(_) => {
            lock(&shared.fuzzy).accepted = true;
            debug!(pattern = %request.group_key_pattern, "fuzzy watch accepted");
        }
        Err(e) => {
            // Cancel it: a watch over its match limit stays registered on the server.
            let mut cancel = request.clone();
            cancel.watch_type = "CANCEL_WATCH".to_owned();
            cancel.initializing = false;
            let _ = send(shared, live, "cancel fuzzy watch", &cancel).await;
            warn!(error = %e, "the server refused a fuzzy watch of the namespace; listing services over HTTP instead");
        }
    }
}

/// The next fuzzy-watch push; without a receiver, never (a `select!`
/// branch that stays off).
pub(super) async fn recv_fuzzy(rx: &mut Option<mpsc::Receiver<FuzzyPush>>) -> Option<FuzzyPush> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies a fuzzy-watch push to the set, and tells the watchers when it moved.
pub(super) fn on_fuzzy(shared: &Shared, push: FuzzyPush) {
    let namespace = &shared.config.namespace;
    let mut fuzzy = lock(&shared.fuzzy);
    let mut apply = |key: &str, changed_type: &str| match (
        convert::fuzzy_service_key(namespace, key),
        changed_type,
    ) {
        (Some((group, name)), "ADD_SERVICE") => {
            fuzzy.services.insert((group.to_owned(), name.to_owned()))
        }
        (Some((group, name)), "DELETE_SERVICE") => {
            fuzzy.services.remove(&(group.to_owned(), name.to_owned()))
        }
        _ => {
            debug!(key, changed_type, "fuzzy-watch entry ignored");
            false
        }
    };
    let mut moved = false;
    match &push {
        FuzzyPush::Sync(sync) => {
            for context in sync.contexts.iter().flatten() {
                moved |= apply(&context.service_key, &context.changed_type);
            }
            if sync.sync_type == "FINISH_FUZZY_WATCH_INIT_NOTIFY" && !fuzzy.complete {
                fuzzy.complete = true;
                moved = true;
                debug!(
                    services = fuzzy.services.len(),
                    "fuzzy watch init sync finished"
                );
            }
        }
        FuzzyPush::Change(change) => moved |= apply(&change.service_key, &change.changed_type),
    }
    drop(fuzzy);
    if moved {
        shared
            .catalog_changes
            .send_modify(|n| *n = n.wrapping_add(1));
    }
}
