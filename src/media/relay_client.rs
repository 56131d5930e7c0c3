//! The relay client: executes the [`RelayOp`]s of the pure call state machine against the
//! in-process relay ([`RelayHandle`]). A first SDP waits for its session (`Open` = allocate +
//! set the sender's side, [`RelayHandle::open`]: the rewritten SDP needs its ports); a later
//! one and a delete are queued for the session's worker without waking it
//! ([`RelayHandle::update_later`], [`RelayHandle::delete_later`]): the worker serves them
//! before it forwards its next datagram, so nothing the endpoints see depends on them, and an
//! idle worker is not woken twice per call for them (issue #15).

use sipedge_relay::{Allocation, Open, RelayError, RelayHandle, SessionId, SessionStats};
use tracing::debug;

use crate::media::call::RelayOp;

/// What the relay answered to one [`RelayOp`].
#[derive(Debug)]
pub(crate) enum Done {
    /// `Open`: the new session and its ports.
    Opened(Allocation),
    /// `Update`: the SDP is set.
    Updated,
    /// `Delete`: the session is closed.
    Deleted,
}

/// The relay handle, seen from the media side.
#[derive(Debug, Clone)]
pub(crate) struct RelayClient {
    handle: RelayHandle,
}

impl RelayClient {
    /// A client over a started relay.
    pub(crate) fn new(handle: RelayHandle) -> Self {
        Self { handle }
    }

    /// The relay itself (counts, shutdown).
    pub(crate) fn handle(&self) -> &RelayHandle {
        &self.handle
    }

    /// Executes one operation.
    pub(crate) async fn execute(&self, op: &RelayOp) -> Result<Done, RelayError> {
        match op {
            RelayOp::Open {
                replace,
                label,
                sdp,
                ..
            } => self
                .handle
                .open(Open {
                    label: label.clone(),
                    replace: *replace,
                    side: sdp.side,
                    streams: sdp.streams.clone(),
                    sources: sdp.sources.clone(),
                    answered: sdp.answered,
                })
                .await
                .map(Done::Opened),
            RelayOp::Update { id, sdp } => self
                .handle
                .update_later(
                    *id,
                    sdp.side,
                    sdp.streams.clone(),
                    sdp.sources.clone(),
                    sdp.answered,
                )
                .map(|()| Done::Updated),
            RelayOp::Delete(id) => {
                drop(self.delete_later(*id));
                Ok(Done::Deleted)
            }
        }
    }

    /// Closes a session without waking its worker ([`RelayHandle::delete_later`]): the future
    /// gives its stats; dropped, the session is closed all the same.
    pub(crate) fn delete_later(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<SessionStats, RelayError>> + Send + 'static {
        self.handle.delete_later(id)
    }

    /// Closes a session and returns its stats.
    pub(crate) async fn delete(&self, id: SessionId) -> Result<SessionStats, RelayError> {
        let r = self.handle.delete(id).await;
        if let Err(error) = &r {
            debug!(%error, session = %id, "deleting a relay session");
        }
        r
    }
}
