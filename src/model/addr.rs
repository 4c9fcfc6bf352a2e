//! A Nacos server's address: `host:http_port`, as configured, and the gRPC
//! port beside it (`http_port + offset`, 1000 by default). Parsed once, here.

use std::fmt;

/// A server as `host:port` (the host as written: a name, an IPv4 address,
/// or a bracketed IPv6 one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    host: String,
    port: u16,
}

/// Why a server address was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Not `host:port`, or the port is not a number up to 65535.
    #[error("{0:?} is not host:port")]
    Malformed(String),
    /// The gRPC port (`port + offset`) would be above 65535.
    #[error("{addr}: the gRPC port {port} + {offset} is above 65535")]
    NoGrpcPort {
        /// The address.
        addr: String,
        /// Its HTTP port.
        port: u16,
        /// The gRPC offset.
        offset: u16,
    },
}

impl ServerAddr {
    /// Parses `host:port`.
    pub fn parse(text: &str) -> Result<ServerAddr, AddrError> {
        let malformed = || AddrError::Malformed(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(malformed)?;
        let port = port.parse::<u16>().map_err(|_| malformed())?;
        if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
            return Err(malformed());
        }
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    }

    /// The host as written (brackets kept around an IPv6 address).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host to verify a TLS certificate against (no brackets).
    pub fn host_name(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The gRPC address beside this HTTP one.
    pub fn grpc(&self, offset: u16) -> Result<ServerAddr, AddrError> {
        let port = self
            .port
            .checked_add(offset)
            .ok_or_else(|| AddrError::NoGrpcPort {
                addr: self.to_string(),
                port: self.port,
                offset,
            })?;
        Ok(ServerAddr {
            host: self.host.clone(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_and_the_grpc_port_beside_them() {
        let a = ServerAddr::parse("nacos.example:8848").expect("valid");
        assert_eq!((a.host(), a.port()), ("nacos.example", 8848));
        assert_eq!(
            a.grpc(1000).expect("room").to_string(),
            "nacos.example:9848"
        );
        let v6 = ServerAddr::parse("[::1]:8848").expect("valid");
        assert_eq!((v6.host(), v6.host_name()), ("[::1]", "::1"));
        assert_eq!(v6.grpc(1000).expect("room").to_string(), "[::1]:9848");
    }

    #[test]
    fn malformed_addresses_and_ports_out_of_range() {
        for bad in [
            "nacos",
            ":8848",
            "nacos:",
            "nacos:http",
            "nacos:70000",
            "::1:8848",
        ] {
            assert_eq!(
                ServerAddr::parse(bad),
                Err(AddrError::Malformed(bad.into())),
                "{bad}"
            );
        }
        let high = ServerAddr::parse("h:65000").expect("valid");
        assert!(matches!(high.grpc(1000), Err(AddrError::NoGrpcPort { .. })));
    }
}
