//! Media, split the rtpengine way (DESIGN §4 "Media"):
//!
//! - `sdp`: the SDP offer/answer inspection and rewrite. Pure.
//! - `call`: the per-call state machine (`Offered → Early → Confirmed → Ended`, per branch
//!   too): decides which relay session each SDP goes through and emits [`call::RelayOp`]s. Pure.
//! - `relay_client`: executes those operations against the relay, one round trip per SDP.
//! - `report`: the end-of-call stats line and the CDR row. Pure.
//! - `cdr`: the CDR writer with its retries and spool.
//! - `session`: [`session::Media`], the thin async facade the proxy calls (`offer`, `answer`,
//!   `finished`): the call table, the limits, and the glue between the modules above.

pub(crate) mod call;
pub mod cdr;
pub(crate) mod relay_client;
pub(crate) mod report;
pub(crate) mod sdp;
pub mod session;
