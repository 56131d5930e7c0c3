//! Zero-copy, checked views of RTP and RTCP packets (RFC 3550 §5.1 and §6.4, RFC 5761 §4).
//!
//! The relay forwards bytes unchanged; it only reads a few header fields to validate a source
//! (latching) and to keep receiver statistics. `new_checked` validates once so that no
//! accessor can panic afterwards (the smoltcp `wire` contract).

/// Why a buffer is not an RTP or RTCP packet. Unit-like and `Copy`: it is built per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Shorter than the fixed header, or than the lengths its header announces.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// The version field is not 2 (RFC 3550 §5.1).
    #[error("RTP version is not 2")]
    Version,
    /// The RTCP packet type is outside the types a first RTCP packet can have.
    #[error("not an RTCP packet type")]
    PacketType,
    /// The padding count is zero or larger than the payload (RFC 3550 §5.1 P bit).
    #[error("bad padding")]
    Padding,
}

mod field {
    use std::ops::Range;
    pub(super) const SEQ: Range<usize> = 2..4;
    pub(super) const TIMESTAMP: Range<usize> = 4..8;
    pub(super) const SSRC: Range<usize> = 8..12;
    pub(super) const RTCP_LENGTH: Range<usize> = 2..4;
}

/// RTP fixed header size (RFC 3550 §5.1).
const RTP_HEADER: usize = 12;
/// RTCP common header plus the sender SSRC.
const RTCP_HEADER: usize = 8;

/// RTCP packet types a (possibly reduced-size, RFC 5506) compound packet may start with:
/// SR 200, RR 201, SDES 202, BYE 203, APP 204 (RFC 3550), RTPFB 205 and PSFB 206 (RFC 4585),
/// XR 207 (RFC 3611).
const RTCP_TYPES: std::ops::RangeInclusive<u8> = 200..=207;

/// RFC 5761 §4: with rtcp-mux, a second byte in 192..=223 is RTCP (RTP payload types 64-95,
/// which would collide, must not be used on a multiplexed port).
pub fn looks_like_rtcp(buf: &[u8]) -> bool {
    matches!(buf.get(1), Some(192..=223))
}

/// RTCP SR..APP (200-204) on a port without rtcp-mux: RFC 3551 §3 reserves RTP payload types
/// 72-76 so that, even with the marker bit, no RTP packet has these second bytes.
pub fn is_misdirected_rtcp(buf: &[u8]) -> bool {
    matches!(buf.get(1), Some(200..=204))
}

fn be16(b: &[u8], r: std::ops::Range<usize>) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[r]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], r: std::ops::Range<usize>) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[r]);
    u32::from_be_bytes(a)
}

/// A validated RTP packet.
#[derive(Debug, Clone, Copy)]
pub struct RtpView<'a> {
    buf: &'a [u8],
}

impl<'a> RtpView<'a> {
    /// Checks the version, the fixed header, the CSRC list, the extension header and padding
    /// against the buffer length; after this no accessor panics.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, Malformed> {
        if buf.len() < RTP_HEADER {
            return Err(Malformed::Truncated("RTP header"));
        }
        if buf[0] >> 6 != 2 {
            return Err(Malformed::Version);
        }
        let csrc = usize::from(buf[0] & 0x0f);
        let mut header = RTP_HEADER + 4 * csrc;
        if buf.len() < header {
            return Err(Malformed::Truncated("CSRC list"));
        }
        if buf[0] & 0x10 != 0 {
            // RFC 3550 §5.3.1: 16-bit profile field, 16-bit length in 32-bit words.
            if buf.len() < header + 4 {
                return Err(Malformed::Truncated("extension header"));
            }
            let words = usize::from(be16(buf, header + 2..header + 4));
            header += 4 + 4 * words;
            if buf.len() < header {
                return Err(Malformed::Truncated("extension"));
            }
        }
        if buf[0] & 0x20 != 0 {
            let pad = usize::from(buf[buf.len() - 1]);
            if pad == 0 || header + pad > buf.len() {
                return Err(Malformed::Padding);
            }
        }
        Ok(Self { buf })
    }

    /// The marker bit.
    pub fn marker(&self) -> bool {
        self.buf[1] & 0x80 != 0
    }

    /// The 7-bit payload type.
    pub fn payload_type(&self) -> u8 {
        self.buf[1] & 0x7f
    }

    /// The 16-bit sequence number.
    pub fn seq(&self) -> u16 {
        be16(self.buf, field::SEQ)
    }

    /// The media timestamp, in clock-rate units.
    pub fn timestamp(&self) -> u32 {
        be32(self.buf, field::TIMESTAMP)
    }

    /// The synchronisation source.
    pub fn ssrc(&self) -> u32 {
        be32(self.buf, field::SSRC)
    }

    /// The whole packet.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
}

/// A validated RTCP packet: the first packet of a compound (RFC 3550 §6.1).
///
/// Only the first header is checked: SRTCP (RFC 3711 §3.4) appends an index and an
/// authentication tag after the compound, so the lengths of all parts do not add up to the
/// datagram and a stricter check would drop encrypted calls.
#[derive(Debug, Clone, Copy)]
pub struct RtcpView<'a> {
    buf: &'a [u8],
}

impl<'a> RtcpView<'a> {
    /// Checks the version, the packet type and the first packet's length field.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, Malformed> {
        if buf.len() < RTCP_HEADER {
            return Err(Malformed::Truncated("RTCP header"));
        }
        if buf[0] >> 6 != 2 {
            return Err(Malformed::Version);
        }
        if !RTCP_TYPES.contains(&buf[1]) {
            return Err(Malformed::PacketType);
        }
        // RFC 3550 §6.4.1: length in 32-bit words minus one.
        let len = (usize::from(be16(buf, field::RTCP_LENGTH)) + 1) * 4;
        if len > buf.len() {
            return Err(Malformed::Truncated("RTCP length"));
        }
        Ok(Self { buf })
    }

    /// The packet type of the first packet (200 SR, 201 RR, ...).
    pub fn packet_type(&self) -> u8 {
        self.buf[1]
    }

    /// The SSRC of the sender of the first packet.
    pub fn sender_ssrc(&self) -> u32 {
        be32(self.buf, field::SSRC.start - 4..field::SSRC.start)
    }

    /// The whole datagram.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
}

/// Builds a minimal RTP packet; for tests and the benchmark.
#[doc(hidden)]
pub fn build_rtp(seq: u16, timestamp: u32, ssrc: u32, payload_len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(RTP_HEADER + payload_len);
    p.extend_from_slice(&[0x80, 0x00]);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&timestamp.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.resize(RTP_HEADER + payload_len, 0xd5);
    p
}

/// Builds an empty RTCP receiver report (8 bytes); for tests.
#[doc(hidden)]
pub fn build_rtcp_rr(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 201, 0x00, 0x01];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_plain_rtp_packet() {
        let p = build_rtp(0xfffe, 160_000, 0xdead_beef, 160);
        let v = RtpView::new_checked(&p).unwrap();
        assert_eq!(v.seq(), 0xfffe);
        assert_eq!(v.timestamp(), 160_000);
        assert_eq!(v.ssrc(), 0xdead_beef);
        assert_eq!(v.payload_type(), 0);
        assert!(!v.marker());
        assert_eq!(v.as_bytes().len(), 172);
    }

    #[test]
    fn rejects_short_garbage_and_wrong_version_without_panic() {
        for len in 0..12 {
            let p = build_rtp(1, 1, 1, 0);
            assert_eq!(
                RtpView::new_checked(&p[..len]).unwrap_err(),
                Malformed::Truncated("RTP header")
            );
        }
        let mut p = build_rtp(1, 1, 1, 4);
        p[0] = 0x40; // version 1
        assert_eq!(RtpView::new_checked(&p).unwrap_err(), Malformed::Version);
        p[0] = 0x00;
        assert_eq!(RtpView::new_checked(&p).unwrap_err(), Malformed::Version);
        // Every byte value as the first byte and every short length: no panic.
        for b0 in 0..=255u8 {
            for len in 0..24 {
                let mut g = vec![0xffu8; len];
                if let Some(x) = g.first_mut() {
                    *x = b0;
                }
                let _ = RtpView::new_checked(&g);
                let _ = RtcpView::new_checked(&g);
                let _ = looks_like_rtcp(&g);
            }
        }
    }

    #[test]
    fn checks_csrc_extension_and_padding_lengths() {
        let mut p = build_rtp(1, 1, 1, 0);
        p[0] |= 0x02; // two CSRCs announced, none present
        assert_eq!(
            RtpView::new_checked(&p).unwrap_err(),
            Malformed::Truncated("CSRC list")
        );
        let mut p = build_rtp(1, 1, 1, 4);
        p[0] |= 0x10; // extension header present: profile + length 0xd5d5 words
        assert_eq!(
            RtpView::new_checked(&p).unwrap_err(),
            Malformed::Truncated("extension")
        );
        let mut p = build_rtp(1, 1, 1, 4);
        p[0] |= 0x20;
        *p.last_mut().unwrap() = 5; // five padding bytes in a four-byte payload
        assert_eq!(RtpView::new_checked(&p).unwrap_err(), Malformed::Padding);
        *p.last_mut().unwrap() = 4;
        assert!(RtpView::new_checked(&p).is_ok());
    }

    #[test]
    fn rtcp_checks_type_and_length() {
        let rr = build_rtcp_rr(7);
        let v = RtcpView::new_checked(&rr).unwrap();
        assert_eq!(v.packet_type(), 201);
        assert_eq!(v.sender_ssrc(), 7);
        assert!(looks_like_rtcp(&rr));
        assert!(is_misdirected_rtcp(&rr));
        // Length field says 3 words + 1 but only 8 bytes are there.
        let mut long = rr.clone();
        long[3] = 3;
        assert_eq!(
            RtcpView::new_checked(&long).unwrap_err(),
            Malformed::Truncated("RTCP length")
        );
        let mut other = rr.clone();
        other[1] = 199;
        assert_eq!(
            RtcpView::new_checked(&other).unwrap_err(),
            Malformed::PacketType
        );
        // An RTP packet is not RTCP.
        let mut rtp = build_rtp(1, 1, 1, 20);
        assert!(!looks_like_rtcp(&rtp));
        // Marker bit + payload type 77: RTCP-like with rtcp-mux, plain RTP without.
        rtp[1] = 0x80 | 77;
        assert!(looks_like_rtcp(&rtp));
        assert!(!is_misdirected_rtcp(&rtp));
        rtp[1] = 0;
        assert!(RtcpView::new_checked(&rtp).is_err());
    }
}
