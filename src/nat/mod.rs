//! Far-end NAT traversal (the seed's nathelper usage): detection of phones behind NAT
//! (`detect`, used for `;nat=yes` and flow tokens in our Record-Route, force_rport and the media
//! decision) and keepalives to their bindings (`keepalive`).

pub mod detect;
pub mod keepalive;
