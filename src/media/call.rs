//! The media state of one relayed call, as a pure state machine (the rtpengine split: `call.c`
//! decides, the relay client executes). No tokio, no relay handle, no clock: wall time comes
//! in as `now_unix`, and every method returns what the relay must do as data ([`RelayOp`]);
//! `session::Media` executes it and hands the result back.
//!
//! States: the call goes `Offered → Early → Confirmed → Ended` ([`CallState`]), and so does each
//! branch of its initial INVITE ([`BranchState`]): a branch is `Offered` when the INVITE goes
//! out on it, `Early` after a provisional response with a To-tag (an early dialog), `Confirmed`
//! when its 2xx goes upstream (the winner), `Ended` when it lost to the winner or the call is
//! over. Each branch owns at most one relay session, made at its first SDP (early media from
//! several forks, rtpengine#502, #439); every later SDP of the dialog goes through the
//! winner's session, or before the 2xx through the branch of the early dialog's To-tag
//! (PRACK/UPDATE, RFC 3262/3311).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use sipedge_relay::{
    Allocation, Direction as RelayDirection, Endpoint, SessionId, SessionStats, Side, StreamPorts,
};

use crate::acc::{Hangup, Start};
use crate::media::sdp::{Direction, SdpInfo};

/// Why a call's media ended (the `reason` field of the stats line and the CDR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// A BYE.
    Bye,
    /// A CANCEL, or a 487 final.
    Cancel,
    /// Another final ≥ 300.
    Failed,
    /// The relay closed the media (no packets, or an offer never answered).
    Timeout,
    /// The server stopped.
    Shutdown,
}

impl EndReason {
    /// The name written to the log line and the CDR.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bye => "bye",
            Self::Cancel => "cancel",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Identifiers of a call taken from a message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallIds<'a> {
    /// Call-ID.
    pub(crate) call_id: &'a str,
    /// The From-tag (the caller's, for the initial INVITE).
    pub(crate) from_tag: &'a str,
    /// The To-tag, when there is one.
    pub(crate) to_tag: Option<&'a str>,
    /// The From URI (for the CDR).
    pub(crate) from_uri: &'a str,
    /// The To URI (for the CDR).
    pub(crate) to_uri: &'a str,
}

/// Where a call is (its initial INVITE and its dialog).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CallState {
    /// The INVITE is out; no response opened a dialog yet.
    Offered,
    /// A provisional response with a To-tag opened an early dialog.
    Early,
    /// A 2xx went upstream on `winner`: every later SDP goes through its session.
    Confirmed {
        /// Our branch id of the answering fork.
        winner: String,
    },
    /// The relay closed the media before the INVITE got its final response (an offer never
    /// answered): the report waits for that response, so the CDR has the call's status.
    TimedOut {
        /// What the relay counted.
        stats: SessionStats,
    },
    /// Over: every session is deleted (or being deleted), the report is written.
    Ended,
}

/// Where one branch of the initial INVITE is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BranchState {
    /// The INVITE went out on it.
    Offered,
    /// A provisional response with a To-tag came back on it.
    Early,
    /// Its 2xx went upstream: the winner.
    Confirmed,
    /// It lost to the winner, or the call is over: no session any more.
    Ended,
}

/// Whether the INVITE has its final response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invite {
    /// No final response upstream yet.
    Pending,
    /// This final status went upstream.
    Final(u16),
}

/// A branch's relay session.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Session {
    /// The relay's id.
    pub(crate) id: SessionId,
    /// One entry per relayed stream.
    pub(crate) ports: Vec<StreamPorts>,
    /// The m= line (index in the SDP) of each relayed stream: port-0 lines have none.
    pub(crate) lines: Vec<usize>,
    /// m= lines of the SDP it was made for.
    pub(crate) m_lines: usize,
}

impl Session {
    /// Whether this SDP fits the session: same m= lines, and every line with a port is one
    /// that has relay ports (RFC 3264 §8.2: a re-offer may enable a disabled stream).
    fn fits(&self, info: &SdpInfo) -> bool {
        info.streams.len() == self.m_lines
            && info
                .streams
                .iter()
                .enumerate()
                .all(|(i, s)| s.port == 0 || self.lines.contains(&i))
    }
}

/// One branch of the initial INVITE.
#[derive(Debug, Clone)]
struct Branch {
    /// Our branch id (the Via branch of the forwarded INVITE).
    id: String,
    state: BranchState,
    session: Option<Session>,
    /// The To-tags of the early dialogs that came back on this branch.
    tags: Vec<String>,
}

/// Early dialogs one branch may open (a downstream fork per tag); more are not tracked.
pub(crate) const MAX_EARLY_DIALOGS: usize = 16;

/// One side's SDP as the relay needs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SideSdp {
    /// Who sent it.
    pub(crate) side: Side,
    /// Its endpoints, one per relayed stream.
    pub(crate) streams: Vec<Option<Endpoint>>,
    /// Where its signalling came from (strict-source latching).
    pub(crate) sources: Vec<IpAddr>,
    /// Whether the call has an answer (the relay switches to the idle/hold timeouts).
    pub(crate) answered: bool,
}

/// What the relay must do for a call: data, executed by `relay_client`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RelayOp {
    /// A new session for `branch` with the sender's SDP already set (one control round trip),
    /// closing `replace` first (the branch's old session, when a re-offer changed its m= lines).
    Open {
        /// Our branch id: the session is stored there by [`Call::opened`].
        branch: String,
        /// The session this one replaces.
        replace: Option<SessionId>,
        /// The relay's label (the Call-ID).
        label: String,
        /// The m= lines that get ports.
        lines: Vec<usize>,
        /// The m= lines of the SDP.
        m_lines: usize,
        /// The sender's SDP.
        sdp: SideSdp,
    },
    /// A new SDP for an existing session.
    Update {
        /// The session.
        id: SessionId,
        /// The sender's SDP.
        sdp: SideSdp,
    },
    /// Close a session.
    Delete(SessionId),
}

/// What to do with one SDP.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SdpStep {
    /// Nothing to relay: forward it unchanged.
    Unchanged,
    /// More m= lines with a port than `media.max_streams`.
    TooManyStreams,
    /// Execute this, then rewrite the SDP with [`Call::ports`] (after [`Call::opened`] for
    /// an `Open`). A `Delete` here (every stream of a re-offer disabled) leaves the SDP as is.
    Relay(RelayOp),
}

/// What the INVITE's final response does to the call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Finished {
    /// The relay already ended the media: report it now with this reason and these stats.
    Report(EndReason, SessionStats),
    /// Answered: delete the losing forks' sessions. `forget`: nothing of the call is relayed
    /// (no SDP on the winner, or a branch that was not relayed won): drop it, no report.
    Answered {
        /// The losers' sessions.
        delete: Vec<SessionId>,
        /// Drop the call without a report.
        forget: bool,
    },
    /// Failed or cancelled: end the call ([`Call::end`]) with this reason.
    End(EndReason),
    /// The call was already over.
    Nothing,
}

/// What a session the relay closed by itself does to the call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RelayClosed {
    /// Another fork still relays media: nothing more.
    Continue,
    /// The call's media is over: delete the other sessions; `report`: report now with
    /// [`EndReason::Timeout`] and the closed session's stats (else the INVITE is pending and
    /// [`Call::finished`] reports).
    Over {
        /// The other forks' sessions.
        delete: Vec<SessionId>,
        /// Report now.
        report: bool,
    },
}

/// What [`Call::end`] leaves to do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ending {
    /// Every session of the call, to delete.
    pub(crate) delete: Vec<SessionId>,
    /// The winner's session: its stats are the call's (else the forks' sum: early media).
    pub(crate) winner: Option<SessionId>,
    /// The media the relay ended before: the reason becomes `Timeout`, with these stats.
    pub(crate) timed_out: Option<SessionStats>,
}

/// One relayed call: the key is (Call-ID, caller's From-tag).
#[derive(Debug)]
pub(crate) struct Call {
    /// Call-ID.
    pub(crate) call_id: String,
    /// The caller's From-tag.
    pub(crate) caller_tag: String,
    /// From URI.
    pub(crate) from_uri: String,
    /// To URI.
    pub(crate) to_uri: String,
    /// When the INVITE came (Unix seconds).
    pub(crate) start_unix: u64,
    /// When its 2xx went upstream.
    pub(crate) answer_unix: Option<u64>,
    /// Who the sessions are counted against: `user:NAME` or `ip:ADDR`.
    pub(crate) caller: String,
    /// The INVITE's final status.
    pub(crate) invite: Invite,
    /// The call's accounting record (route, authenticated user, source), from the proxy
    /// when the final went upstream; the CDR row takes its columns from it.
    pub(crate) acc: Option<Start>,
    /// Who sent the BYE that ended the call.
    pub(crate) hangup: Option<Hangup>,
    state: CallState,
    branches: Vec<Branch>,
    /// Per side ([`Side::Caller`], [`Side::Callee`]), where its last SIP message with SDP
    /// came from: besides the SDP address, the only source its media may latch from.
    sources: [Option<IpAddr>; 2],
}

fn side_idx(side: Side) -> usize {
    match side {
        Side::Caller => 0,
        Side::Callee => 1,
    }
}

/// The m= lines of an SDP that take relay ports: those with a non-zero port.
pub(crate) fn enabled_lines(info: &SdpInfo) -> Vec<usize> {
    info.streams
        .iter()
        .enumerate()
        .filter(|(_, s)| s.port != 0)
        .map(|(i, _)| i)
        .collect()
}

/// The endpoint a side announced for each m= line (`None` for a disabled stream).
pub(crate) fn endpoints(info: &SdpInfo) -> Vec<Option<Endpoint>> {
    info.streams
        .iter()
        .map(|s| {
            if s.port == 0 {
                return None;
            }
            // No usable c= (a host name, or none): latching will find the source.
            let ip = s.addr.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let rtcp = match s.rtcp {
                Some((port, addr)) => SocketAddr::new(addr.unwrap_or(ip), port),
                None => SocketAddr::new(ip, s.port.wrapping_add(1)),
            };
            Some(Endpoint {
                rtp: SocketAddr::new(ip, s.port),
                rtcp,
                rtcp_mux: s.rtcp_mux,
                direction: match s.direction {
                    Direction::SendRecv => RelayDirection::SendRecv,
                    Direction::SendOnly => RelayDirection::SendOnly,
                    Direction::RecvOnly => RelayDirection::RecvOnly,
                    Direction::Inactive => RelayDirection::Inactive,
                },
                clock_rate: s.clock_rate,
            })
        })
        .collect()
}

/// The endpoints of the given m= lines only, in that order (relay stream order).
fn endpoints_of(info: &SdpInfo, lines: &[usize]) -> Vec<Option<Endpoint>> {
    let all = endpoints(info);
    lines
        .iter()
        .map(|&i| all.get(i).copied().flatten())
        .collect()
}

/// The relay ports to advertise to the party opposite `from`, per m= line; `None` keeps the
/// line's port (0 for a disabled stream, RFC 3264 §8.2).
pub(crate) fn ports_for(info: &SdpInfo, session: &Session, from: Side) -> Vec<Option<u16>> {
    info.streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let k = session.lines.iter().position(|&l| l == i)?;
            let p = session.ports.get(k)?;
            (s.port != 0).then_some(match from {
                // The caller's SDP goes to the callee: it sends to the callee-facing leg.
                Side::Caller => p.callee.rtp,
                Side::Callee => p.caller.rtp,
            })
        })
        .collect()
}

impl Call {
    /// A new call from its initial INVITE; `caller` is the key its sessions count against.
    pub(crate) fn new(ids: &CallIds<'_>, caller: String, now_unix: u64) -> Self {
        Self {
            call_id: ids.call_id.to_owned(),
            caller_tag: ids.from_tag.to_owned(),
            from_uri: ids.from_uri.to_owned(),
            to_uri: ids.to_uri.to_owned(),
            start_unix: now_unix,
            answer_unix: None,
            caller,
            invite: Invite::Pending,
            acc: None,
            hangup: None,
            state: CallState::Offered,
            branches: Vec::new(),
            sources: [None, None],
        }
    }

    /// Where the call is.
    #[cfg(test)]
    pub(crate) fn state(&self) -> &CallState {
        &self.state
    }

    /// Where a branch is (`None`: no such branch).
    #[cfg(test)]
    pub(crate) fn branch_state(&self, branch: &str) -> Option<BranchState> {
        self.branch(branch).map(|b| b.state)
    }

    /// Whether the call's media is over (ended, or timed out waiting for the final response).
    pub(crate) fn is_over(&self) -> bool {
        matches!(self.state, CallState::Ended | CallState::TimedOut { .. })
    }

    /// Whether any branch holds a relay session.
    pub(crate) fn holds_sessions(&self) -> bool {
        self.branches.iter().any(|b| b.session.is_some())
    }

    /// A branch's session.
    pub(crate) fn session(&self, branch: &str) -> Option<&Session> {
        self.branch(branch).and_then(|b| b.session.as_ref())
    }

    fn branch(&self, branch: &str) -> Option<&Branch> {
        self.branches.iter().find(|b| b.id == branch)
    }

    fn branch_mut(&mut self, branch: &str) -> Option<&mut Branch> {
        self.branches.iter_mut().find(|b| b.id == branch)
    }

    fn winner(&self) -> Option<&str> {
        match &self.state {
            CallState::Confirmed { winner } => Some(winner),
            CallState::Offered
            | CallState::Early
            | CallState::TimedOut { .. }
            | CallState::Ended => None,
        }
    }

    /// What `sipedge show calls` lists of this call: its state and the session carrying its
    /// media now (the answering fork's, or before an answer the first fork's that has one).
    pub(crate) fn view(&self) -> (&'static str, Option<&Session>) {
        let state = match self.state {
            CallState::Offered => "offered",
            CallState::Early => "early",
            CallState::Confirmed { .. } => "confirmed",
            CallState::TimedOut { .. } => "timed-out",
            CallState::Ended => "ended",
        };
        let session = self
            .winner_session()
            .or_else(|| self.branches.iter().find_map(|b| b.session.as_ref()));
        (state, session)
    }

    fn winner_session(&self) -> Option<&Session> {
        self.winner().and_then(|w| self.session(w))
    }

    /// The initial INVITE goes out on a relayed branch.
    pub(crate) fn branch_out(&mut self, branch: &str) {
        if self.branch(branch).is_none() {
            self.branches.push(Branch {
                id: branch.to_owned(),
                state: BranchState::Offered,
                session: None,
                tags: Vec::new(),
            });
        }
    }

    /// One SDP through a branch's session, sent by `side` from `src`: the relay operation
    /// (a new session on the branch's first SDP, ports only for the m= lines with a port; a
    /// fresh one when a re-offer adds, enables or renumbers m= lines, RFC 3264 §8; else an
    /// update), or why it is not relayed.
    pub(crate) fn sdp(
        &mut self,
        branch: &str,
        side: Side,
        info: &SdpInfo,
        src: IpAddr,
        answered: bool,
        max_streams: usize,
    ) -> SdpStep {
        if self.is_over() {
            return SdpStep::Unchanged;
        }
        self.sources[side_idx(side)] = Some(src);
        let lines = enabled_lines(info);
        if lines.len() > max_streams {
            return SdpStep::TooManyStreams;
        }
        let sdp = |lines: &[usize]| SideSdp {
            side,
            streams: endpoints_of(info, lines),
            sources: vec![src],
            answered,
        };
        self.branch_out(branch);
        let label = self.call_id.clone();
        // invariant: `branch_out` just made sure the branch exists.
        let Some(b) = self.branch_mut(branch) else {
            return SdpStep::Unchanged;
        };
        let replace = match b.session.take() {
            Some(s) if s.fits(info) => {
                let op = RelayOp::Update {
                    id: s.id,
                    sdp: sdp(&s.lines),
                };
                b.session = Some(s);
                return SdpStep::Relay(op);
            }
            Some(s) => Some(s.id),
            None => None,
        };
        if lines.is_empty() {
            // Every stream disabled: nothing to relay (the old session's ports go back).
            return match replace {
                Some(id) => SdpStep::Relay(RelayOp::Delete(id)),
                None => SdpStep::Unchanged,
            };
        }
        SdpStep::Relay(RelayOp::Open {
            branch: branch.to_owned(),
            replace,
            label,
            sdp: sdp(&lines),
            lines,
            m_lines: info.streams.len(),
        })
    }

    /// The relay made the session of an `Open`.
    pub(crate) fn opened(
        &mut self,
        branch: &str,
        alloc: Allocation,
        lines: Vec<usize>,
        m_lines: usize,
    ) {
        if let Some(b) = self.branch_mut(branch) {
            b.session = Some(Session {
                id: alloc.id,
                ports: alloc.streams,
                lines,
                m_lines,
            });
        }
    }

    /// The ports to write into an SDP sent by `side` on `branch`, per m= line (after its
    /// [`RelayOp`] succeeded).
    pub(crate) fn ports(
        &self,
        branch: &str,
        info: &SdpInfo,
        side: Side,
    ) -> Option<Vec<Option<u16>>> {
        self.session(branch).map(|s| ports_for(info, s, side))
    }

    /// A response on a branch of the initial INVITE went upstream (1xx/2xx, with SDP or not):
    /// a To-tag opens an early dialog on the branch, a 2xx makes it the winner.
    pub(crate) fn response(&mut self, branch: &str, status: u16, to_tag: Option<&str>) {
        if self.is_over() {
            return;
        }
        let confirmed = (200..300).contains(&status);
        if confirmed {
            // The first 2xx wins; a later one from another fork keeps it.
            if self.winner().is_none() {
                self.state = CallState::Confirmed {
                    winner: branch.to_owned(),
                };
            }
        } else if to_tag.is_some() && self.state == CallState::Offered {
            self.state = CallState::Early;
        }
        let winner = self.winner().is_some_and(|w| w == branch);
        let Some(b) = self.branch_mut(branch) else {
            return;
        };
        if let Some(tag) = to_tag
            && !b.tags.iter().any(|t| t == tag)
            && b.tags.len() < MAX_EARLY_DIALOGS
        {
            b.tags.push(tag.to_owned());
        }
        b.state = match b.state {
            BranchState::Offered | BranchState::Early if confirmed && winner => {
                BranchState::Confirmed
            }
            BranchState::Offered if to_tag.is_some() && !confirmed => BranchState::Early,
            s => s,
        };
    }

    /// The branch and side of an SDP inside the dialog of `tags` (From, To of the message),
    /// sent by the party whose tag is `sender_tag`: the winner once confirmed, else the
    /// branch of the callee's early dialog. `None`: not a dialog this call relays.
    pub(crate) fn route(
        &self,
        tags: (&str, Option<&str>),
        sender_tag: &str,
    ) -> Option<(String, Side)> {
        if self.is_over() {
            return None;
        }
        let side = if sender_tag == self.caller_tag {
            Side::Caller
        } else {
            Side::Callee
        };
        let branch = match self.winner() {
            Some(w) => w.to_owned(),
            None => {
                let callee_tag = [Some(tags.0), tags.1]
                    .into_iter()
                    .flatten()
                    .find(|t| *t != self.caller_tag)?;
                self.branches
                    .iter()
                    .find(|b| b.tags.iter().any(|t| t == callee_tag))?
                    .id
                    .clone()
            }
        };
        Some((branch, side))
    }

    /// A limit refused the offer on a branch: whether the call is to be dropped (nothing of
    /// it relayed: no call to end, no CDR for a refused flood).
    pub(crate) fn refused(&mut self) -> bool {
        if self.holds_sessions() {
            return false;
        }
        self.state = CallState::Ended;
        true
    }

    /// The INVITE's final response went upstream (`cancelled`: a CANCEL came).
    pub(crate) fn finished(&mut self, status: u16, cancelled: bool, now_unix: u64) -> Finished {
        self.invite = Invite::Final(status);
        match std::mem::replace(&mut self.state, CallState::Ended) {
            CallState::TimedOut { stats } => return Finished::Report(EndReason::Timeout, stats),
            CallState::Ended => return Finished::Nothing,
            s @ (CallState::Offered | CallState::Early | CallState::Confirmed { .. }) => {
                self.state = s;
            }
        }
        if !(200..300).contains(&status) {
            return Finished::End(if cancelled || status == 487 {
                EndReason::Cancel
            } else {
                EndReason::Failed
            });
        }
        self.answer_unix = Some(now_unix);
        // The losing forks give their ports back at once.
        let winner = self.winner().map(str::to_owned);
        let mut delete = Vec::new();
        for b in &mut self.branches {
            if Some(&b.id) != winner.as_ref() {
                b.state = BranchState::Ended;
                delete.extend(b.session.take().map(|s| s.id));
            }
        }
        self.branches.retain(|b| b.state != BranchState::Ended);
        // A 2xx without SDP anywhere (or from a branch not relayed): nothing to relay.
        let forget = !self.holds_sessions();
        if forget {
            self.state = CallState::Ended;
        }
        Finished::Answered { delete, forget }
    }

    /// The relay closed session `id` by itself (a timeout).
    pub(crate) fn relay_closed(&mut self, id: SessionId, stats: SessionStats) -> RelayClosed {
        let is_winner = self.winner_session().is_some_and(|s| s.id == id);
        for b in &mut self.branches {
            if b.session.as_ref().is_some_and(|s| s.id == id) {
                b.session = None;
            }
        }
        if self.is_over() || (!is_winner && self.holds_sessions()) {
            return RelayClosed::Continue;
        }
        // The other forks of a call whose winner timed out.
        let delete = self.take_sessions();
        let report = match self.invite {
            Invite::Pending => {
                self.state = CallState::TimedOut { stats };
                false
            }
            Invite::Final(_) => {
                self.state = CallState::Ended;
                true
            }
        };
        RelayClosed::Over { delete, report }
    }

    fn take_sessions(&mut self) -> Vec<SessionId> {
        let mut ids = Vec::new();
        for b in &mut self.branches {
            b.state = BranchState::Ended;
            ids.extend(b.session.take().map(|s| s.id));
        }
        ids
    }

    /// Ends the call (BYE, failure, CANCEL, shutdown): the sessions to delete and how to
    /// report. The call is [`CallState::Ended`] afterwards.
    pub(crate) fn end(&mut self) -> Ending {
        let winner = self.winner_session().map(|s| s.id);
        let timed_out = match std::mem::replace(&mut self.state, CallState::Ended) {
            CallState::TimedOut { stats } => Some(stats),
            CallState::Offered
            | CallState::Early
            | CallState::Confirmed { .. }
            | CallState::Ended => None,
        };
        Ending {
            delete: self.take_sessions(),
            winner,
            timed_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::sdp;
    use sipedge_relay::PortPair;

    const OFFER: &[u8] = b"v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 8\r\na=sendonly\r\n\
m=video 0 RTP/AVP 96\r\n\
m=audio 4002 RTP/AVP 0\r\na=rtcp:5001 IN IP4 10.0.0.3\r\na=rtcp-mux\r\n";

    const AUDIO: &[u8] = b"v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 8\r\n";

    const ANSWER: &[u8] =
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.9\r\ns=-\r\nc=IN IP4 10.0.0.9\r\nt=0 0\r\n\
m=audio 6000 RTP/AVP 8\r\n";

    const CALLER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const CALLEE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    fn pair(rtp: u16) -> PortPair {
        PortPair { rtp, rtcp: rtp + 1 }
    }

    fn info(b: &[u8]) -> SdpInfo {
        sdp::inspect(b).unwrap()
    }

    fn call() -> Call {
        let ids = CallIds {
            call_id: "c1@test",
            from_tag: "caller",
            to_tag: None,
            from_uri: "sip:a@test",
            to_uri: "sip:b@test",
        };
        Call::new(&ids, "ip:192.0.2.1".into(), 1000)
    }

    /// Executes an op as a relay that always succeeds: session `n` gets ports 30000 + 4n…
    fn relay(c: &mut Call, step: SdpStep, n: u64) -> Option<SessionId> {
        match step {
            SdpStep::Relay(RelayOp::Open {
                branch,
                lines,
                m_lines,
                ..
            }) => {
                let id = SessionId(n);
                let streams = lines
                    .iter()
                    .map(|_| StreamPorts {
                        caller: pair(30000 + 4 * n as u16),
                        callee: pair(30002 + 4 * n as u16),
                    })
                    .collect();
                c.opened(&branch, Allocation { id, streams }, lines, m_lines);
                Some(id)
            }
            SdpStep::Relay(RelayOp::Update { id, .. } | RelayOp::Delete(id)) => Some(id),
            SdpStep::Unchanged | SdpStep::TooManyStreams => None,
        }
    }

    /// The caller's INVITE with an offer forked to `branches`, each with its own session.
    fn offered(branches: &[&str]) -> Call {
        let mut c = call();
        for (n, b) in branches.iter().enumerate() {
            c.branch_out(b);
            let step = c.sdp(b, Side::Caller, &info(AUDIO), CALLER, false, 4);
            assert!(
                matches!(&step, SdpStep::Relay(RelayOp::Open { replace: None, sdp, .. })
                    if sdp.side == Side::Caller && sdp.sources == vec![CALLER] && !sdp.answered),
                "{step:?}"
            );
            relay(&mut c, step, n as u64 + 1);
        }
        c
    }

    #[test]
    fn endpoints_from_sdp() {
        let eps = endpoints(&info(OFFER));
        assert_eq!(eps.len(), 3);
        let a = eps[0].as_ref().unwrap();
        assert_eq!(a.rtp, "10.0.0.2:4000".parse().unwrap());
        assert_eq!(
            a.rtcp,
            "10.0.0.2:4001".parse().unwrap(),
            "RTCP on RTP+1 by default"
        );
        assert_eq!(a.direction, RelayDirection::SendOnly);
        assert!(eps[1].is_none(), "port 0: disabled");
        let c = eps[2].as_ref().unwrap();
        assert_eq!(
            c.rtcp,
            "10.0.0.3:5001".parse().unwrap(),
            "a=rtcp with an address"
        );
        assert!(c.rtcp_mux);
    }

    #[test]
    fn ports_face_the_receiver() {
        let info = info(OFFER);
        // The disabled video line (m= line 1) takes no ports: two relayed streams.
        let lines = enabled_lines(&info);
        assert_eq!(lines, vec![0, 2]);
        let session = Session {
            id: SessionId(1),
            ports: (0..2)
                .map(|i| StreamPorts {
                    caller: pair(30000 + 4 * i),
                    callee: pair(30002 + 4 * i),
                })
                .collect(),
            lines,
            m_lines: 3,
        };
        assert!(session.fits(&info));
        // The caller's offer goes to the callee: the callee-facing ports; the disabled stream
        // keeps port 0.
        assert_eq!(
            ports_for(&info, &session, Side::Caller),
            vec![Some(30002), None, Some(30006)]
        );
        assert_eq!(
            ports_for(&info, &session, Side::Callee),
            vec![Some(30000), None, Some(30004)]
        );
        // The relay hears about the relayed streams only, in order.
        let eps = endpoints_of(&info, &session.lines);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].unwrap().rtp, "10.0.0.2:4002".parse().unwrap());
        // A re-offer enabling the video line needs a new session; one disabling audio fits.
        let video_on = String::from_utf8(OFFER.to_vec())
            .unwrap()
            .replace("m=video 0", "m=video 5000");
        assert!(!session.fits(&sdp::inspect(video_on.as_bytes()).unwrap()));
        let audio_off = String::from_utf8(OFFER.to_vec())
            .unwrap()
            .replace("m=audio 4000", "m=audio 0");
        assert!(session.fits(&sdp::inspect(audio_off.as_bytes()).unwrap()));
    }

    #[test]
    fn early_media_on_two_forks_then_one_answers() {
        let mut c = offered(&["b1", "b2"]);
        assert_eq!(c.state(), &CallState::Offered);
        // 183 with SDP on both forks: each answer updates its own branch's session.
        for (b, tag, id) in [("b1", "t1", 1), ("b2", "t2", 2)] {
            c.response(b, 183, Some(tag));
            let step = c.sdp(b, Side::Callee, &info(ANSWER), CALLEE, true, 4);
            match &step {
                SdpStep::Relay(RelayOp::Update { id: got, sdp }) => {
                    assert_eq!(*got, SessionId(id));
                    assert_eq!(sdp.side, Side::Callee);
                    assert!(sdp.answered);
                    assert_eq!(sdp.sources, vec![CALLEE]);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(c.branch_state(b), Some(BranchState::Early));
        }
        assert_eq!(c.state(), &CallState::Early);
        // Early media goes to the caller from each fork's caller-facing port.
        assert_eq!(
            c.ports("b2", &info(ANSWER), Side::Callee),
            Some(vec![Some(30008)])
        );
        // An UPDATE in b2's early dialog goes through b2's session.
        assert_eq!(
            c.route(("caller", Some("t2")), "caller"),
            Some(("b2".into(), Side::Caller))
        );
        // 200 on b2: the winner; its final deletes b1's session and keeps b2's.
        c.response("b2", 200, Some("t2"));
        assert_eq!(
            c.state(),
            &CallState::Confirmed {
                winner: "b2".into()
            }
        );
        assert_eq!(c.branch_state("b2"), Some(BranchState::Confirmed));
        assert_eq!(
            c.finished(200, false, 1005),
            Finished::Answered {
                delete: vec![SessionId(1)],
                forget: false
            }
        );
        assert_eq!(c.answer_unix, Some(1005));
        assert_eq!(c.invite, Invite::Final(200));
        assert_eq!(c.branch_state("b1"), None, "the loser is gone");
        assert_eq!(c.session("b2").map(|s| s.id), Some(SessionId(2)));
        // A late 2xx from the other fork does not move the winner.
        c.response("b1", 200, Some("t1"));
        assert_eq!(
            c.state(),
            &CallState::Confirmed {
                winner: "b2".into()
            }
        );
    }

    #[test]
    fn a_failure_after_the_offer_ends_the_call() {
        let mut c = offered(&["b1"]);
        c.response("b1", 180, Some("t1"));
        assert_eq!(
            c.finished(486, false, 1002),
            Finished::End(EndReason::Failed)
        );
        assert_eq!(c.invite, Invite::Final(486));
        let ending = c.end();
        assert_eq!(
            ending,
            Ending {
                delete: vec![SessionId(1)],
                winner: None,
                timed_out: None
            }
        );
        assert_eq!(c.state(), &CallState::Ended);
        assert_eq!(c.branch_state("b1"), Some(BranchState::Ended));
        assert!(!c.holds_sessions());
        // Nothing more is relayed.
        assert_eq!(
            c.sdp("b1", Side::Callee, &info(ANSWER), CALLEE, true, 4),
            SdpStep::Unchanged
        );
        assert_eq!(c.finished(486, false, 1003), Finished::Nothing);
    }

    #[test]
    fn cancel_ends_with_reason_cancel() {
        let mut c = offered(&["b1"]);
        assert_eq!(
            c.finished(487, true, 1002),
            Finished::End(EndReason::Cancel)
        );
        let mut c = offered(&["b1"]);
        assert_eq!(
            c.finished(487, false, 1002),
            Finished::End(EndReason::Cancel),
            "a 487 is a cancel"
        );
        let mut c = offered(&["b1"]);
        assert_eq!(
            c.finished(408, false, 1002),
            Finished::End(EndReason::Failed)
        );
    }

    #[test]
    fn re_invite_after_confirm_goes_to_the_winner_and_bye_ends() {
        let mut c = offered(&["b1", "b2"]);
        c.response("b1", 200, Some("t1"));
        c.sdp("b1", Side::Callee, &info(ANSWER), CALLEE, true, 4);
        c.finished(200, false, 1003);
        // The callee's re-INVITE (From = callee, To = caller): the winner's session, callee side.
        assert_eq!(
            c.route(("t1", Some("caller")), "t1"),
            Some(("b1".into(), Side::Callee))
        );
        let step = c.sdp("b1", Side::Callee, &info(ANSWER), CALLEE, true, 4);
        assert!(
            matches!(
                step,
                SdpStep::Relay(RelayOp::Update {
                    id: SessionId(1),
                    ..
                })
            ),
            "{step:?}"
        );
        // A re-offer adding a stream: a fresh session replacing the old one.
        let step = c.sdp("b1", Side::Caller, &info(OFFER), CALLER, true, 4);
        match &step {
            SdpStep::Relay(RelayOp::Open {
                replace,
                lines,
                m_lines,
                ..
            }) => {
                assert_eq!(*replace, Some(SessionId(1)));
                assert_eq!(lines, &vec![0, 2]);
                assert_eq!(*m_lines, 3);
            }
            other => panic!("{other:?}"),
        }
        relay(&mut c, step, 7);
        // BYE: the winner's (new) session is deleted and its stats are the call's.
        let ending = c.end();
        assert_eq!(ending.delete, vec![SessionId(7)]);
        assert_eq!(ending.winner, Some(SessionId(7)));
        assert_eq!(c.route(("t1", Some("caller")), "t1"), None);
    }

    #[test]
    fn limits_and_disabled_streams() {
        let mut c = call();
        c.branch_out("b1");
        assert_eq!(
            c.sdp("b1", Side::Caller, &info(OFFER), CALLER, false, 1),
            SdpStep::TooManyStreams
        );
        // Refused with nothing relayed: the call is dropped.
        assert!(c.refused());
        assert_eq!(c.state(), &CallState::Ended);
        // A re-offer with other m= lines, all disabled, gives the ports back and is not
        // rewritten.
        let mut c = offered(&["b1"]);
        let off = String::from_utf8(AUDIO.to_vec()).unwrap().replace(
            "m=audio 4000 RTP/AVP 8",
            "m=audio 0 RTP/AVP 8\r\nm=video 0 RTP/AVP 96",
        );
        assert_eq!(
            c.sdp("b1", Side::Caller, &info(off.as_bytes()), CALLER, true, 4),
            SdpStep::Relay(RelayOp::Delete(SessionId(1)))
        );
        assert!(!c.holds_sessions());
        // Enabled again: a new session, nothing to replace.
        assert!(matches!(
            c.sdp("b1", Side::Caller, &info(AUDIO), CALLER, true, 4),
            SdpStep::Relay(RelayOp::Open { replace: None, .. })
        ));
    }

    #[test]
    fn relay_timeouts() {
        // One fork of two times out: the other keeps the call.
        let mut c = offered(&["b1", "b2"]);
        assert_eq!(
            c.relay_closed(SessionId(1), SessionStats::default()),
            RelayClosed::Continue
        );
        // The last one: the INVITE is pending, so the final response reports.
        let stats = SessionStats {
            duration: std::time::Duration::from_secs(120),
            ..SessionStats::default()
        };
        assert_eq!(
            c.relay_closed(SessionId(2), stats.clone()),
            RelayClosed::Over {
                delete: vec![],
                report: false
            }
        );
        assert!(matches!(c.state(), CallState::TimedOut { .. }));
        assert_eq!(
            c.finished(408, false, 1120),
            Finished::Report(EndReason::Timeout, stats)
        );
        // A confirmed call whose winner idles out: the other sessions go, report now.
        let mut c = offered(&["b1"]);
        c.response("b1", 200, Some("t1"));
        c.finished(200, false, 1001);
        assert_eq!(
            c.relay_closed(SessionId(1), SessionStats::default()),
            RelayClosed::Over {
                delete: vec![],
                report: true
            }
        );
        assert_eq!(c.state(), &CallState::Ended);
    }

    #[test]
    fn an_answer_without_sdp_from_a_direct_branch_forgets_the_call() {
        let mut c = offered(&["b1"]);
        // The 2xx came on a branch that is not relayed (not in this call).
        c.response("direct", 200, Some("t9"));
        assert_eq!(
            c.finished(200, false, 1001),
            Finished::Answered {
                delete: vec![SessionId(1)],
                forget: true
            }
        );
        assert_eq!(c.state(), &CallState::Ended);
    }
}
