//! The bottom layer of the signalling side: sockets, stream framing, the TCP connection
//! table and the send path. It moves bytes and knows nothing above it: what a message means
//! is decided by whoever implements [`Receiver`] (the driver, [`crate::driver`]).
//!
//! ```text
//!   bind(listen, Limits) ─► Listeners::run(receiver) ─► Receiver::receive(bytes, Source)
//!                                                      ▲
//!   anyone ─► Transports::send(Transmit) ─► UDP socket / per-connection TCP/TLS queue (never waits)
//!                                            └► no connection yet: connect on demand (tcp.rs),
//!                                               or Receiver::transport_failed
//! ```

pub mod framing;
mod listen;
mod send;
mod tcp;
pub mod tls;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use listen::Listeners;
pub use send::{TransportStats, Transports};

/// A transport of SIP (RFC 3261 §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    Tcp,
    /// TLS over TCP (RFC 3261 §26.2.1): framed like TCP.
    Tls,
}

impl Proto {
    /// The Via transport token (`UDP`, `TCP`, `TLS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
        }
    }

    /// Whether the transport delivers reliably (no retransmissions, RFC 3261 §17).
    pub fn is_reliable(self) -> bool {
        match self {
            Self::Udp => false,
            Self::Tcp | Self::Tls => true,
        }
    }

    /// The transport of a Via token (`UDP`, `TCP`, `TLS`, any case); `None` for others.
    pub fn from_token(token: &str) -> Option<Self> {
        [Self::Udp, Self::Tcp, Self::Tls]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(token))
    }

    /// The port a URI without one means (RFC 3263 §4.2: 5061 for TLS).
    pub fn default_port(self) -> u16 {
        match self {
            Self::Udp | Self::Tcp => 5060,
            Self::Tls => 5061,
        }
    }
}

/// Where a message came from: the transport, the peer and our socket it arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub proto: Proto,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// A message to send. Over UDP it leaves from the socket bound to `local`; over TCP and TLS
/// it goes through the connection to `dest` (RFC 3261 §18.2.2: responses use the connection
/// the request came in on), which is opened when there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub proto: Proto,
    pub local: SocketAddr,
    pub dest: SocketAddr,
    pub bytes: Vec<u8>,
}

/// What the receive loops hand every message to. Called on the loop itself: it must not
/// wait (anything slow is spawned by the implementation), so that one peer never holds up
/// the others on the same socket.
pub trait Receiver: Send + Sync + 'static {
    /// One complete message: a datagram, or one framed out of a TCP stream.
    fn receive(&self, bytes: &[u8], source: Source);

    /// Whether a TCP connection from `ip` may be accepted at all (banned sources are not).
    fn admit(&self, ip: IpAddr) -> bool;

    /// A connection to `dest` could not be opened (refused, timed out, TLS handshake or
    /// certificate failed, or a limit): `unsent` are the messages that were waiting for it,
    /// never sent. Called on a task of the transport; it must not wait either.
    fn transport_failed(&self, proto: Proto, dest: SocketAddr, unsent: Vec<Vec<u8>>);
}

/// What the transport layer is told by the configuration (`[server]`, `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Receive loops per UDP socket.
    pub udp_workers: usize,
    /// Largest message; a longer one on a stream gets 513 and the connection closes.
    pub max_message_size: usize,
    /// A connection without a complete message for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Open TCP connections in total, and per source IP.
    pub tcp_connections: usize,
    pub tcp_connections_per_ip: usize,
    /// A message must arrive within this of its first byte (slowloris).
    pub tcp_message_timeout: Duration,
    /// A write must drain within this; also the kernel's TCP_USER_TIMEOUT.
    pub tcp_write_timeout: Duration,
    /// Bytes queued per TCP connection at most; beyond, the connection is closed. Also the
    /// queue of a connection we are still opening.
    pub tcp_send_queue: usize,
    /// A connection we open must be established within this (TLS: plus the handshake).
    pub tcp_connect_timeout: Duration,
    /// Connections we are opening at once, at most; beyond, a send fails at once.
    pub tcp_connects: usize,
}
