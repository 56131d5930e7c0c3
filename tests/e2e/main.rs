//! End-to-end tests: one integration binary (hickory-style). Servers run in-process on
//! 127.0.0.1 ephemeral ports; tests talk real UDP and TCP and assert on the wire.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod acc;
mod cli;
mod control;
mod corpus;
mod dns;
mod harness;
mod identity;
mod media;
mod media_limits;
#[cfg(feature = "postgres")]
mod multi;
mod nat;
mod proxy;
mod public;
mod registrar;
mod reload;
mod security;
mod store;
mod tls;
mod transport;
mod trunk;
