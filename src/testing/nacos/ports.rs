//! A server's five ports ([`PortBlock`]): picked at random, checked free on every interface,
//! and held for this process until dropped, so parallel tests never pick the same ones.
//!
//! Must not: bind a port for longer than the check takes; java binds them.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use super::error::HarnessError;
use super::util::random_u64;
use crate::runtime::lock;

/// HTTP ports are drawn from here. Every port of a block (`P - 1000 ..= P + 1001`) stays in
/// 20000..=32001: below Linux's ephemeral range (32768+), where outgoing connections take their
/// local ports, and clear of Nacos' defaults (7848/8848/9848/9849) and of a developer's server
/// on 17848/18848/19848/19849.
const HTTP_PORT_RANGE: std::ops::Range<u16> = 21_000..31_000;
/// How many random port blocks to try before giving up.
const PORT_ATTEMPTS: u32 = 40;

/// HTTP ports of the blocks this process holds, so that parallel tests never pick the same one.
static RESERVED_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The five ports of one server, held for this process until dropped.
#[derive(Debug)]
pub(super) struct PortBlock {
    pub(super) http: u16,
}

impl PortBlock {
    pub(super) fn reserve() -> Result<Self, HarnessError> {
        let span = u64::from(HTTP_PORT_RANGE.end - HTTP_PORT_RANGE.start);
        for _ in 0..PORT_ATTEMPTS {
            let http = HTTP_PORT_RANGE.start + u16::try_from(random_u64() % span).unwrap_or(0);
            let mut reserved = lock(&RESERVED_PORTS);
            // Only a block that shares a port is ruled out: ruling out the whole window of 2001 either side left no
            // room in the range for a fourth server once three were running.
            let clash = reserved.iter().any(|other| blocks_overlap(http, *other));
            if !clash && block_of(http).iter().all(|port| port_is_free(*port)) {
                reserved.insert(http);
                return Ok(Self { http });
            }
        }
        Err(HarnessError::NoFreePorts {
            range: HTTP_PORT_RANGE,
            attempts: PORT_ATTEMPTS,
        })
    }

    pub(super) fn grpc(&self) -> u16 {
        self.http + 1000
    }

    pub(super) fn cluster_grpc(&self) -> u16 {
        self.http + 1001
    }

    pub(super) fn raft(&self) -> u16 {
        self.http - 1000
    }

    pub(super) fn console(&self) -> u16 {
        self.http + 1
    }

    pub(super) fn all(&self) -> [u16; 5] {
        block_of(self.http)
    }
}

/// The ports of the server whose HTTP port is `http`: JRaft, HTTP, console (3.x; reserved on
/// 2.x too, so one picker serves both), SDK gRPC, cluster gRPC.
fn block_of(http: u16) -> [u16; 5] {
    [http - 1000, http, http + 1, http + 1000, http + 1001]
}

/// Whether the blocks of two HTTP ports share a port.
fn blocks_overlap(a: u16, b: u16) -> bool {
    let theirs = block_of(b);
    block_of(a).iter().any(|port| theirs.contains(port))
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        lock(&RESERVED_PORTS).remove(&self.http);
    }
}

/// Whether nothing listens on `port` on any interface. Java binds the gRPC and JRaft ports on
/// the IPv6 wildcard (dual stack), so both wildcards are tried; a machine without IPv6 fails
/// that bind with another error, which does not count as "taken".
fn port_is_free(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
    if v4.is_err() {
        return false;
    }
    drop(v4);
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(err) => err.kind() != io::ErrorKind::AddrInUse,
    }
}

pub(super) fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_overlap_only_where_they_share_a_port() {
        // Blocks are P-1000, P, P+1 (console), P+1000, P+1001.
        for apart in [0, 1, 999, 1000, 1001, 2000, 2001] {
            assert!(blocks_overlap(25_000, 25_000 + apart), "{apart} apart");
            assert!(blocks_overlap(25_000 + apart, 25_000), "{apart} apart");
        }
        for apart in [2, 998, 1002, 1999, 2002, 3000] {
            assert!(!blocks_overlap(25_000, 25_000 + apart), "{apart} apart");
        }
    }
}
