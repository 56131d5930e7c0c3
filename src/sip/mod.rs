//! The SIP message layer: received bytes plus an index, typed views of the headers a proxy
//! needs, targeted rewrites that leave every other byte untouched, and locally generated
//! responses.
//!
//! Nothing here does I/O or reads a clock.

pub mod header;
pub mod headers;
pub mod parse;
pub mod reply;
pub mod rewrite;
pub(crate) mod scan;
pub mod text;
pub mod uri;

pub use header::HeaderName;
pub use headers::{CSeq, ContactValue, NameAddr, Via};
pub use parse::{Framing, Malformed, Message, StartLine};
pub use rewrite::Rewrite;
pub use uri::{SipUri, UriError};
