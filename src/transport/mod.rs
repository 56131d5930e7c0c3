//! Sockets: UDP and TCP listeners for every `server.listen` entry, the send path, and stream
//! framing. This layer only moves bytes; every decision is made by [`crate::proxy`].

pub mod framing;
pub mod server;
mod tcp;
mod udp;

use std::net::SocketAddr;

pub use crate::config::Proto;

/// Where a message came from: the transport, the peer and our socket it arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub proto: Proto,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// A message to send. Over UDP it leaves from the socket bound to `local`; over TCP it goes
/// through the connection to `dest` (RFC 3261 §18.2.2: responses use the connection the
/// request came in on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub proto: Proto,
    pub local: SocketAddr,
    pub dest: SocketAddr,
    pub bytes: Vec<u8>,
}
