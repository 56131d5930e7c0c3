//! Far-end NAT traversal (the seed's nathelper usage). Today: detection, used to mark NATed
//! callers in our Record-Route (`;nat=yes`). Contact fixing and keepalives come next.

pub mod detect;
