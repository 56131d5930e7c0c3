//! The request pipeline (sanity → local decisions → routing → forwarding) and the reply
//! pipeline (the response context of a stateful proxy).

pub mod accounting;
pub mod forward;
pub mod linger;
pub mod pipeline;
pub mod probe;
pub mod response;
pub mod sanity;
pub mod stateful;
pub mod txn;
#[cfg(test)]
mod txn_tests;
