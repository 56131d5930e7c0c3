//! The I/O side of the relay: threads, runtimes, sockets and syscalls. Decisions are made by
//! the pure modules; this only moves bytes and messages.

pub(crate) mod control;
mod pace;
pub(crate) mod sys;
pub(crate) mod worker;
