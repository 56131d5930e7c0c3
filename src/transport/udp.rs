//! The UDP receive loop: one datagram in, handed to the [`Receiver`].
//!
//! One loop per socket, and a second one only while the first is behind. Two loops on one
//! socket are both woken by every datagram and all but one find nothing: at moderate load
//! that costs 7-16 % more CPU per call or registration (issue #15) for nothing. But one loop
//! is also one thread's worth of parsing and routing: at about 4,700 calls/s the socket's
//! queue grew to its 4 MiB and dropped datagrams while sipedge used 1.1 of the 2 cores. So
//! the loop counts the datagrams it finds already waiting, one after the other; after
//! [`BEHIND_AFTER`] of them it starts a helper loop on the same socket, which ends once its
//! wake-ups keep finding no backlog (at most one datagram, [`CAUGHT_UP_AFTER`] times in a
//! row) or once the socket has been quiet for [`HELPER_IDLE`]: the first loop keeps up again.
//! (Not "an empty socket": at low load both loops race for each datagram and the helper wins
//! about half the races, so it would almost never see 32 empty wake-ups in a row.) The
//! decisions are [`Streak`]'s, pure.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{Instrument, debug, warn};

use super::send::Transports;
use super::{Proto, Receiver, Source};

/// Largest UDP payload; a datagram this long or longer cannot be a complete message anyway.
const RECV_BUF: usize = 65536;
/// Datagrams in a row found waiting (no wait for the socket in between) after which the loop
/// is behind and starts a helper.
const BEHIND_AFTER: u32 = 256;
/// Wake-ups in a row that find no backlog (at most one datagram) after which the helper ends.
const CAUGHT_UP_AFTER: u32 = 32;

/// A helper that waits this long for a datagram ends (the socket is quiet).
const HELPER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Which of a socket's loops this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Always running; starts the helper when it is behind.
    First,
    /// Running while the first is behind.
    Helper,
}

/// What a loop has seen lately: pure, one per loop.
#[derive(Debug, Default)]
struct Streak {
    /// Datagrams received since the socket was last found empty.
    waiting: u32,
    /// Wake-ups in a row that found no backlog.
    idle: u32,
}

impl Streak {
    /// A datagram was received; true when the loop is behind (time for a helper).
    fn received(&mut self) -> bool {
        self.waiting = self.waiting.saturating_add(1);
        self.waiting >= BEHIND_AFTER
    }

    /// The socket was found empty after `got` datagrams since the wake-up; true when a helper
    /// should end.
    fn drained(&mut self, got: u32) -> bool {
        self.waiting = 0;
        self.idle = if got <= 1 { self.idle + 1 } else { 0 };
        self.idle >= CAUGHT_UP_AFTER
    }
}

/// Receives on `sock` until shutdown.
pub(super) async fn run(
    sock: Arc<UdpSocket>,
    receiver: Arc<dyn Receiver>,
    transports: Arc<Transports>,
    shutdown: watch::Receiver<bool>,
) {
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(error) => {
            warn!(%error, "UDP socket has no local address; receive loop not started");
            return;
        }
    };
    let loops = Loops {
        sock,
        receiver,
        transports,
        local,
        helping: Arc::new(AtomicBool::new(false)),
    };
    serve(Arc::new(loops), shutdown, Role::First).await;
}

/// What a socket's loops share.
struct Loops {
    sock: Arc<UdpSocket>,
    receiver: Arc<dyn Receiver>,
    /// For the helper counters.
    transports: Arc<Transports>,
    local: SocketAddr,
    /// Set while the helper runs: at most one per socket.
    helping: Arc<AtomicBool>,
}

/// Counts the helper out when it ends, however it ends.
struct HelperDone(Arc<Loops>);

impl Drop for HelperDone {
    fn drop(&mut self) {
        let stats = self.0.transports.stats();
        stats
            .udp_receive_helpers_running
            .fetch_sub(1, Ordering::Relaxed);
        self.0.helping.store(false, Ordering::Release);
    }
}

async fn serve(me: Arc<Loops>, mut shutdown: watch::Receiver<bool>, role: Role) {
    let local = me.local;
    let mut buf = vec![0u8; RECV_BUF];
    let mut streak = Streak::default();
    loop {
        // A helper on a socket gone quiet has no wake-ups to count: it ends after HELPER_IDLE.
        let idle = async {
            match role {
                Role::First => std::future::pending().await,
                Role::Helper => tokio::time::sleep(HELPER_IDLE).await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            () = idle => {
                debug!(socket = %local, "socket quiet; the second loop ends");
                return;
            }
            r = me.sock.readable() => if let Err(error) = r {
                warn!(%error, socket = %local, "UDP socket not readable; receive loop ends");
                return;
            },
        }
        let mut got = 0;
        loop {
            let (n, remote) = match me.sock.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP port unreachable for an earlier send surfaces here on Linux; it says
                // nothing about this socket, so keep receiving.
                Err(e) if is_transient(&e) => {
                    debug!(error = %e, "transient UDP receive error");
                    continue;
                }
                Err(error) => {
                    warn!(%error, socket = %local, "UDP receive error");
                    break;
                }
            };
            got += 1;
            let source = Source {
                proto: Proto::Udp,
                remote,
                local,
            };
            me.receiver.receive(&buf[..n], source);
            if streak.received() && role == Role::First && !me.helping.swap(true, Ordering::AcqRel)
            {
                debug!(socket = %local, "receive loop behind; a second loop helps");
                spawn_helper(&me, &shutdown);
            }
            if *shutdown.borrow() {
                return;
            }
            // Other tasks run when this one has used its share (a flood must not starve them).
            tokio::task::coop::consume_budget().await;
        }
        if streak.drained(got) && role == Role::Helper {
            debug!(socket = %local, "receive loop caught up; the second loop ends");
            return;
        }
    }
}

/// Starts the helper loop (a function of its own: a loop future cannot contain itself).
fn spawn_helper(me: &Arc<Loops>, shutdown: &watch::Receiver<bool>) {
    let stats = me.transports.stats();
    stats.udp_receive_helpers.fetch_add(1, Ordering::Relaxed);
    stats
        .udp_receive_helpers_running
        .fetch_add(1, Ordering::Relaxed);
    // Counted out when the task ends or is dropped, polled or not.
    let done = HelperDone(me.clone());
    let helper: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(serve(me.clone(), shutdown.clone(), Role::Helper));
    let helper = async move {
        let _done = done;
        helper.await;
    };
    tokio::spawn(helper.in_current_span());
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_after_a_long_streak_of_waiting_datagrams() {
        let mut s = Streak::default();
        for _ in 1..BEHIND_AFTER {
            assert!(!s.received());
        }
        assert!(s.received(), "the 256th waiting datagram in a row");
        // Finding the socket empty starts the count again.
        assert!(!s.drained(BEHIND_AFTER));
        assert!(!s.received());
    }

    #[test]
    fn a_helper_ends_after_waking_to_no_backlog_again_and_again() {
        let mut s = Streak::default();
        for _ in 1..CAUGHT_UP_AFTER {
            assert!(!s.drained(0));
        }
        // A wake-up that found a backlog breaks the run.
        assert!(!s.drained(5));
        // At low load the helper wins some races for single datagrams: no backlog either.
        for i in 1..CAUGHT_UP_AFTER {
            assert!(!s.drained(i % 2));
        }
        assert!(s.drained(1));
    }
}
