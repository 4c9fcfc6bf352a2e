//! One contract, two servers: a real Nacos started by the harness, or the
//! in-process fake. Contract tests take a [`Backend`] and never ask which.

use std::time::Duration;

use nacos_replicator::cluster::{Client, ClientConfig, Credentials};
use nacos_replicator::runtime::Tasks;
use nacos_replicator::testing::fake::{FakeNacos, FakeOptions};
use nacos_replicator::testing::nacos::{NacosServer, ServerOptions};

/// What a contract needs of its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any server; on the real side, the one shared by this test process.
    Shared,
    /// A server of its own (it will be restarted).
    Own,
    /// A server of its own with auth on.
    Auth,
}

/// The server a contract runs against.
pub enum Backend {
    /// A real Nacos 2.x server (shared or owned).
    Real(RealServer),
    /// The in-process fake.
    Fake(Box<FakeNacos>),
}

/// A real server, shared by the process or owned by one test.
pub enum RealServer {
    /// `support::shared_server()`.
    Shared(&'static NacosServer),
    /// Started for one test, stopped when dropped.
    Own(Box<NacosServer>),
}

impl Backend {
    /// A real server meeting `need` (blocking start: call from a test).
    pub fn real(need: Need) -> Self {
        let start = || match need {
            Need::Shared => RealServer::Shared(super::shared_server()),
            Need::Own => RealServer::Own(Box::new(super::own_server(ServerOptions::default()))),
            Need::Auth => RealServer::Own(Box::new(super::own_server(ServerOptions::with_auth()))),
        };
        Backend::Real(tokio::task::block_in_place(start))
    }

    /// A fresh fake server meeting `need`.
    pub async fn fake(need: Need) -> Self {
        let options = match need {
            Need::Auth => FakeOptions::with_auth(),
            Need::Shared | Need::Own => FakeOptions::default(),
        };
        Backend::Fake(Box::new(
            FakeNacos::start(options)
                .await
                .expect("the fake server starts"),
        ))
    }

    /// `real` or `fake`, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Real(_) => "real",
            Backend::Fake(_) => "fake",
        }
    }

    /// The server's major version: the real one's, or 2 for the fake (which
    /// imitates 2.3.2).
    pub fn major(&self) -> u32 {
        self.real_server().map_or(2, NacosServer::major)
    }

    fn real_server(&self) -> Option<&NacosServer> {
        match self {
            Backend::Real(RealServer::Shared(s)) => Some(s),
            Backend::Real(RealServer::Own(s)) => Some(s),
            Backend::Fake(_) => None,
        }
    }

    /// The HTTP port.
    pub fn http_port(&self) -> u16 {
        match (self, self.real_server()) {
            (_, Some(s)) => s.http_port(),
            (Backend::Fake(f), None) => f.http_port(),
            (Backend::Real(_), None) => unreachable!("a real backend has a server"),
        }
    }

    /// `127.0.0.1:<http port>`, as a client takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port())
    }

    /// `127.0.0.1:<grpc port>`, for raw sessions.
    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port() + 1000)
    }

    /// A client configuration for `namespace` with a short reconnect cap.
    pub fn config(&self, namespace: &str) -> ClientConfig {
        let mut config = ClientConfig::new(self.name(), vec![self.addr()], namespace);
        config.reconnect_max = Duration::from_secs(2);
        config
    }

    /// A client of this server in `namespace`.
    pub fn client(&self, namespace: &str, tasks: &Tasks) -> Client {
        Client::start(self.config(namespace), tasks).expect("valid client config")
    }

    /// A client with the server's admin credentials (auth servers).
    pub fn authed_client(&self, namespace: &str, tasks: &Tasks) -> Client {
        let mut config = self.config(namespace);
        config.credentials = Some(self.admin());
        Client::start(config, tasks).expect("valid client config")
    }

    /// The credentials an auth server accepts.
    pub fn admin(&self) -> Credentials {
        let (username, password) = match self {
            Backend::Fake(f) => {
                let auth = f.options().auth.clone().unwrap_or_default();
                (auth.username, auth.password)
            }
            Backend::Real(_) => self
                .real_server()
                .and_then(NacosServer::admin_credentials)
                .expect("an auth server"),
        };
        Credentials { username, password }
    }

    /// Makes a namespace usable (the real server's console creates it; the
    /// gRPC API accepts any id either way).
    pub fn create_namespace(&self, namespace: &str) {
        if let Some(s) = self.real_server() {
            tokio::task::block_in_place(|| s.create_namespace_http(namespace))
                .expect("create namespace");
        }
    }

    /// Sends `ConnectResetRequest` to connection `id`, naming `target`.
    pub fn reset_connection(&self, id: &str, target: Option<&str>) {
        match self {
            Backend::Fake(f) => assert!(
                f.reset_connection(id, target),
                "no connection {id} on the fake"
            ),
            Backend::Real(_) => {
                let s = self.real_server().expect("a real server");
                tokio::task::block_in_place(|| s.reset_connection(id, target))
                    .expect("reset accepted");
            }
        }
    }

    /// Stops the server and starts it again on the same ports, with no state.
    pub async fn restart(&self) {
        match self {
            Backend::Fake(f) => f.restart().await.expect("the fake restarts"),
            Backend::Real(RealServer::Own(s)) => {
                tokio::task::block_in_place(|| s.restart()).expect("restart")
            }
            Backend::Real(RealServer::Shared(_)) => panic!("the shared server is never restarted"),
        }
    }
}
