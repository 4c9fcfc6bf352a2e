//! The request path every naming call takes: wait for a live session (or
//! say why there is none), hold the apply lock shared while a recorded
//! change is sent, add auth headers, and log in again once when the server
//! refuses the token. Owns no state of its own.

use std::collections::HashMap;
use std::time::Duration;

use super::{Client, ClientError, ConnectionState, Live, Shared};
use crate::cluster::auth::Relogin;
use crate::model::{ServiceKey, ServiceSnapshot};
use crate::runtime::lock;
use crate::transport::{AUTH_FAILED, TransportError};
use crate::wire::{self, convert};

impl Client {
    pub(super) fn snapshot_of(
        &self,
        info: Option<&wire::ServiceInfoDto>,
        key: &ServiceKey,
    ) -> Result<ServiceSnapshot, ClientError> {
        match info {
            Some(info) => {
                convert::snapshot(&self.shared.config.namespace, info).map_err(|source| {
                    ClientError::Wire {
                        cluster: self.cluster().clone(),
                        source,
                    }
                })
            }
            None => Ok(ServiceSnapshot::empty(key.clone())),
        }
    }

    pub(super) async fn live_session(&self, deadline: Duration) -> Result<Live, ClientError> {
        let mut live = self.shared.live.subscribe();
        let waited = tokio::time::timeout(
            deadline,
            live.wait_for(|l| l.as_ref().is_some_and(|l| !l.session.is_closed())),
        );
        match waited.await {
            Ok(Ok(l)) => l.clone().ok_or_else(|| self.not_connected()),
            Ok(Err(_)) => Err(ClientError::Stopped(self.cluster().clone())),
            Err(_) if self.shared.token.is_cancelled() => {
                Err(ClientError::Stopped(self.cluster().clone()))
            }
            Err(_) => Err(self.not_connected()),
        }
    }

    pub(super) fn not_connected(&self) -> ClientError {
        let last_error = match (
            &*self.shared.state.borrow(),
            lock(&self.shared.last_error).clone(),
        ) {
            (ConnectionState::Disconnected { error, .. }, _) => error.clone(),
            // Retrying now: the reason the last attempt failed.
            (_, Some(error)) => error,
            (other, None) => format!("{other:?}"),
        };
        ClientError::NotConnected {
            cluster: self.cluster().clone(),
            last_error,
        }
    }

    /// Waits for a session, then takes the apply lock shared. Mutating
    /// calls record their intent and send while holding it.
    pub(super) async fn ready_to_apply(
        &self,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, ClientError> {
        self.live_session(self.shared.config.session.request_timeout)
            .await?;
        Ok(self.shared.apply.read().await)
    }

    /// Sends a change already recorded in the redo table: waits for a session,
    /// then sends while holding the apply lock shared, so the change lands
    /// either before a redo (which then replays it) or on the new session.
    pub(super) async fn apply<Q: wire::Request>(
        &self,
        op: &'static str,
        request: &Q,
    ) -> Result<(), ClientError> {
        let _apply = self.ready_to_apply().await?;
        self.call_now(op, request).await.map(|_| ())
    }

    /// Sends on the current session (no waiting for one), with auth headers
    /// and one retry after a token refresh.
    pub(super) async fn call_now<Q: wire::Request>(
        &self,
        op: &'static str,
        request: &Q,
    ) -> Result<Q::Response, ClientError> {
        let live = self
            .shared
            .live
            .borrow()
            .clone()
            .ok_or_else(|| self.not_connected())?;
        send(&self.shared, &live, op, request).await
    }

    /// Waits for a session, then sends.
    pub(super) async fn call<Q: wire::Request>(
        &self,
        op: &'static str,
        request: &Q,
    ) -> Result<Q::Response, ClientError> {
        let live = self
            .live_session(self.shared.config.session.request_timeout)
            .await?;
        send(&self.shared, &live, op, request).await
    }
}

/// The server refused the request's content (parameter check, 400):
/// sending it again can never succeed.
pub(super) fn refused_as_invalid(e: &ClientError) -> bool {
    matches!(e, ClientError::Call { source, .. } if source.code() == Some(crate::transport::INVALID_PARAMS))
}

/// Sends `request` on `live` with auth headers; a 403 about the token
/// forgets it and retries once with a fresh login.
pub(super) async fn send<Q: wire::Request>(
    shared: &Shared,
    live: &Live,
    op: &'static str,
    request: &Q,
) -> Result<Q::Response, ClientError> {
    let cluster = || shared.config.cluster.clone();
    let mut relogin = Relogin::default();
    loop {
        let headers = match &shared.auth {
            Some(auth) => auth
                .headers(&live.server)
                .await
                .map_err(|source| ClientError::Auth {
                    cluster: cluster(),
                    source,
                })?,
            None => HashMap::new(),
        };
        let result = live.session.request(request, &headers).await;
        let refused = result
            .as_ref()
            .is_err_and(|e| e.code() == Some(AUTH_FAILED));
        if relogin.retry(shared.auth.as_ref(), refused, op).await {
            continue;
        }
        match result {
            Ok(reply) => return Ok(reply),
            // Plainly, for a server that wants a user (3.3+ by default) and got none.
            Err(TransportError::Rejected {
                call,
                code: AUTH_FAILED,
                message,
            }) if shared.auth.is_none() => {
                let message = format!(
                    "{message} (the server requires a user and this client has none: set username and \
                     password for cluster {})",
                    shared.config.cluster
                );
                return Err(ClientError::Call {
                    cluster: cluster(),
                    op,
                    source: TransportError::Rejected {
                        call,
                        code: AUTH_FAILED,
                        message,
                    },
                });
            }
            Err(source) => {
                return Err(ClientError::Call {
                    cluster: cluster(),
                    op,
                    source,
                });
            }
        }
    }
}
