//! The UDP receive loop: one datagram in, handed to the [`Receiver`].

use std::io;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Proto, Receiver, Source};

/// Largest UDP payload; a datagram this long or longer cannot be a complete message anyway.
const RECV_BUF: usize = 65536;

/// Receives on `sock` until shutdown. Several of these may run on one socket.
pub(super) async fn run(
    sock: Arc<UdpSocket>,
    receiver: Arc<dyn Receiver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(error) => {
            warn!(%error, "UDP socket has no local address; receive loop not started");
            return;
        }
    };
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let received = tokio::select! {
            _ = shutdown.changed() => break,
            r = sock.recv_from(&mut buf) => r,
        };
        let (n, remote) = match received {
            Ok(r) => r,
            // ICMP port unreachable for an earlier send surfaces here on Linux; it says
            // nothing about this socket, so keep receiving.
            Err(e) if is_transient(&e) => {
                debug!(error = %e, "transient UDP receive error");
                continue;
            }
            Err(error) => {
                warn!(%error, socket = %local, "UDP receive error");
                continue;
            }
        };
        let source = Source {
            proto: Proto::Udp,
            remote,
            local,
        };
        receiver.receive(&buf[..n], source);
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
