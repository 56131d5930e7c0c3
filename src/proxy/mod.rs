//! The request pipeline (sanity → local decisions; forwarding comes with the transaction
//! layer) and the reply pipeline.

pub mod pipeline;
pub mod sanity;
