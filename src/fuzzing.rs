//! Entry points for the fuzz targets in `fuzz/` into pure code that is otherwise private to
//! the crate (the SDP rewrite). Not a stable API: it exists so that the fuzzers can reach that
//! code without widening the crate's own privacy.

use std::net::IpAddr;

use crate::media::sdp;

/// One `m=` line as [`sdp_inspect`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdpStream {
    /// The `m=` port; 0 for a rejected or disabled stream.
    pub port: u16,
    /// The effective connection address, when it is an IP literal.
    pub addr: Option<IpAddr>,
    /// The `a=rtcp` port, when the section has the attribute.
    pub rtcp_port: Option<u16>,
    /// Whether the section has `a=rtcp-mux`.
    pub rtcp_mux: bool,
    /// The RTP clock rate of the first format.
    pub clock_rate: u32,
}

/// Why an SDP could not be inspected or rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdpFailure {
    /// The error's message.
    pub message: String,
    /// True when the error is the caller's (ours), false when the peer's SDP is at fault.
    pub internal: bool,
}

impl From<sdp::SdpError> for SdpFailure {
    fn from(e: sdp::SdpError) -> Self {
        Self {
            message: e.to_string(),
            internal: e.is_internal(),
        }
    }
}

/// The media streams of an offer or answer (the media session's `sdp::inspect`).
pub fn sdp_inspect(body: &[u8]) -> Result<Vec<SdpStream>, SdpFailure> {
    let info = sdp::inspect(body)?;
    Ok(info
        .streams
        .into_iter()
        .map(|s| SdpStream {
            port: s.port,
            addr: s.addr,
            rtcp_port: s.rtcp.map(|(p, _)| p),
            rtcp_mux: s.rtcp_mux,
            clock_rate: s.clock_rate,
        })
        .collect())
}

/// The body rewritten to the relay at `addr` with the relay port `ports[i]` for `m=` line `i`
/// (the media session's `sdp::rewrite`).
pub fn sdp_rewrite(
    body: &[u8],
    addr: IpAddr,
    ports: &[Option<u16>],
) -> Result<Vec<u8>, SdpFailure> {
    Ok(sdp::rewrite(body, addr, ports)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_entry_points_inspect_and_rewrite() {
        let body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
                     m=audio 4000 RTP/AVP 0\r\nm=video 0 RTP/AVP 96\r\n";
        let streams = sdp_inspect(body).unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!((streams[0].port, streams[1].port), (4000, 0));
        assert_eq!(streams[0].addr, Some("192.0.2.1".parse().unwrap()));
        let relay: IpAddr = "203.0.113.5".parse().unwrap();
        let out = sdp_rewrite(body, relay, &[Some(30000), Some(30002)]).unwrap();
        let again = sdp_inspect(&out).unwrap();
        assert_eq!((again[0].port, again[0].addr), (30000, Some(relay)));
        assert_eq!(again[1].port, 0);
        let e = sdp_rewrite(body, relay, &[Some(30000)]).unwrap_err();
        assert!(e.internal, "{e:?}");
        assert!(!sdp_inspect(b"hello").unwrap_err().internal);
    }
}
