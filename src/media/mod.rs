//! Media: the SDP offer/answer rewrite for the in-process RTP relay (`sdp`, pure) and the
//! media session of each relayed dialog (`session`), DESIGN §4 "Media", and the CDR writer
//! with its spool (`cdr`).

pub mod cdr;
pub(crate) mod sdp;
pub mod session;
