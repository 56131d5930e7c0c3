//! The registrar (RFC 3261 §10.3): digest-authenticated REGISTER processing, the location
//! service, and its write-through to the store.
//!
//! - [`register`]: the §10.3 rules as a pure decision.
//! - [`cache`]: the bounded cache of sent responses, for retransmissions (Timer J).
//! - [`location`]: bindings in memory with an expiry index.
//! - [`order`]: which REGISTERs of a shard may run at once (one AOR's in order).
//! - [`keepalive`]: OPTIONS / CRLF pings to NATed bindings (nathelper's `natping`), removal
//!   of the ones that stop answering.
//! - [`service`]: the async side: authentication, sharded processing, store writes, replies.

pub mod cache;
pub mod keepalive;
pub mod location;
pub mod order;
pub mod register;
pub mod service;
