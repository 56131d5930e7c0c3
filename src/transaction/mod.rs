//! RFC 3261 §17 transactions with the RFC 6026 corrections, sans-IO.
