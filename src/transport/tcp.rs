//! TCP: the accept loop and one task per connection. Messages are cut out of the stream by
//! [`super::framing`]; answers go back on the same connection (RFC 3261 §18.2.2), which is
//! registered under the peer's address so that later requests to that flow reuse it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, debug_span, warn};

use super::framing::{Frame, FrameError, StreamFramer};
use super::server::Dispatcher;
use super::{Outbound, Proto, Source};
use crate::sip::{Framing, Message, reply};

/// Frames queued for one connection's writer before senders wait.
const WRITE_QUEUE: usize = 64;

pub(super) async fn accept_loop(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher>,
    shutdown: watch::Receiver<bool>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(error) => {
            warn!(%error, "TCP listener has no local address; not accepting");
            return;
        }
    };
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                // The accepted socket knows which of our addresses the peer connected to,
                // even on a wildcard listener.
                let source = Source {
                    proto: Proto::Tcp,
                    remote,
                    local: stream.local_addr().unwrap_or(local),
                };
                let span = debug_span!("conn", peer.addr = %remote, local.addr = %local);
                tokio::spawn(
                    connection(stream, source, dispatcher.clone(), shutdown.clone())
                        .instrument(span),
                );
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    source: Source,
    dispatcher: Arc<Dispatcher>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let transports = &dispatcher.transports;
    transports.register_tcp(source.remote, tx.clone());
    debug!("connection open");

    let writer = tokio::spawn(
        async move {
            while let Some(bytes) = rx.recv().await {
                if let Err(error) = wr.write_all(&bytes).await {
                    debug!(%error, "write failed");
                    break;
                }
            }
            let _ = wr.shutdown().await;
        }
        .in_current_span(),
    );

    let cfg = dispatcher.core.config();
    let idle = cfg.server.tcp_idle_timeout;
    let mut framer = StreamFramer::new(cfg.server.max_message_size);
    let mut buf = vec![0u8; 16 * 1024];
    'conn: loop {
        let read = tokio::select! {
            _ = shutdown.changed() => break,
            r = tokio::time::timeout(idle, rd.read(&mut buf)) => r,
        };
        let n = match read {
            Err(_) => {
                debug!(idle_s = idle.as_secs(), "closing idle connection");
                break;
            }
            Ok(Ok(0)) => {
                if framer.pending() > 0 {
                    debug!(bytes = framer.pending(), "peer closed mid-message");
                }
                break;
            }
            Ok(Ok(n)) => n,
            Ok(Err(error)) => {
                debug!(%error, "read failed");
                break;
            }
        };
        framer.extend(&buf[..n]);
        loop {
            match framer.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Ping)) => {
                    // RFC 5626 §4.4.1: answer a CRLFCRLF ping with a CRLF pong.
                    if tx.send(b"\r\n".to_vec()).await.is_err() {
                        break 'conn;
                    }
                }
                Ok(Some(Frame::Message(bytes))) => {
                    let d = dispatcher.core.handle(&bytes, source, Framing::Stream);
                    dispatcher.execute(d).await;
                }
                Err(FrameError::TooLarge { size, max }) => {
                    // Answer 513 from the head if it is a request, then close: the rest of
                    // the stream cannot be trusted to resynchronise.
                    debug!(size, max, "message too large on stream");
                    let head = framer.take_head();
                    if let Ok(msg) = Message::parse(&head, Framing::Stream) {
                        if msg.is_request() && msg.top_via().is_ok() && msg.method() != Some("ACK")
                        {
                            let bytes =
                                reply::response(&msg, source.remote, 513, "Message Too Large", &[]);
                            transports
                                .send(Outbound {
                                    proto: Proto::Tcp,
                                    local: source.local,
                                    dest: source.remote,
                                    bytes,
                                })
                                .await;
                        }
                    }
                    break 'conn;
                }
                Err(error @ FrameError::BadContentLength) => {
                    debug!(%error, "closing connection");
                    break 'conn;
                }
            }
        }
    }
    transports.unregister_tcp(source.remote, &tx);
    drop(tx);
    let _ = writer.await;
    debug!("connection closed");
}
