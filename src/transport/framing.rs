//! Cutting SIP messages out of a byte stream (RFC 3261 §18.3: on a stream the header section
//! ends at the empty line and Content-Length gives the body length), plus the RFC 5626 §4.4.1
//! CRLF keepalive: a double CRLF between messages is a ping, answered by a single CRLF.
//!
//! The buffer is bounded by `max_message_size`: a peer cannot make us hold more.

/// One unit cut from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message: header section and exactly Content-Length body bytes.
    Message(Vec<u8>),
    /// A CRLFCRLF keepalive ping; the answer is a single CRLF (pong).
    Ping,
}

/// Why the stream cannot be framed any more; the connection is closed after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The message announced (or so far received) exceeds the limit. The head is kept so that
    /// a 513 can be sent before closing.
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// Content-Length is missing its digits or is not a number: the stream cannot be resynced.
    #[error("unreadable Content-Length on a stream")]
    BadContentLength,
}

/// Accumulates stream bytes and yields frames.
#[derive(Debug)]
pub struct StreamFramer {
    buf: Vec<u8>,
    max: usize,
}

impl StreamFramer {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet framed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The buffered head of a message that was refused as too large (to build the 513).
    pub fn take_head(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        // Leading line breaks: keepalives (RFC 5626) or stray CRLF after a message.
        let lead = self
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if lead > 0 {
            if let Some(p) = find(&self.buf[..lead], b"\r\n\r\n") {
                self.buf.drain(..p + 4);
                return Ok(Some(Frame::Ping));
            }
            if lead == self.buf.len() {
                // Maybe the first half of a ping; keep at most 3 bytes.
                if lead >= 4 {
                    self.buf.drain(..lead - 3);
                }
                return Ok(None);
            }
            self.buf.drain(..lead);
        }
        let Some((head_len, cl)) = header_section(&self.buf)? else {
            if self.buf.len() > self.max {
                return Err(FrameError::TooLarge {
                    size: self.buf.len(),
                    max: self.max,
                });
            }
            return Ok(None);
        };
        let total = head_len.saturating_add(cl);
        if total > self.max {
            self.buf.truncate(head_len);
            return Err(FrameError::TooLarge {
                size: total,
                max: self.max,
            });
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        Ok(Some(Frame::Message(std::mem::replace(&mut self.buf, rest))))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// If the header section is complete: its length including the empty line, and the
/// Content-Length (0 when absent).
fn header_section(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let Some(nlnl) = buf.windows(2).position(|w| w == b"\n\n" || w == b"\n\r") else {
        return Ok(None);
    };
    // Either "\n\n" (bare LF) or "\n\r\n" (CRLF CRLF).
    let head_len = if buf[nlnl + 1] == b'\n' {
        nlnl + 2
    } else if buf.get(nlnl + 2) == Some(&b'\n') {
        nlnl + 3
    } else if nlnl + 2 >= buf.len() {
        return Ok(None);
    } else {
        // "\n\r" followed by something else: keep looking past it.
        return header_section(&buf[nlnl + 1..]).map(|o| o.map(|(h, c)| (h + nlnl + 1, c)));
    };
    let mut cl = None;
    for line in buf[..head_len].split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let value = line[colon + 1..].trim_ascii();
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(FrameError::BadContentLength)?;
            cl = Some(n);
        }
    }
    Ok(Some((head_len, cl.unwrap_or(0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"MESSAGE sip:a@b SIP/2.0\r\nl: 5\r\nVia: x\r\n\r\nhello";

    #[test]
    fn frames_byte_by_byte() {
        let mut f = StreamFramer::new(65535);
        let mut stream = Vec::new();
        stream.extend_from_slice(MSG);
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(MSG);
        let mut frames = Vec::new();
        for b in &stream {
            f.extend(std::slice::from_ref(b));
            while let Some(fr) = f.next_frame().unwrap() {
                frames.push(fr);
            }
        }
        assert_eq!(
            frames,
            vec![
                Frame::Message(MSG.to_vec()),
                Frame::Ping,
                Frame::Message(MSG.to_vec())
            ]
        );
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn bounded() {
        let mut f = StreamFramer::new(40);
        f.extend(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 100\r\n\r\n");
        assert!(matches!(
            f.next_frame(),
            Err(FrameError::TooLarge { size: 147, max: 40 })
        ));
        let mut f = StreamFramer::new(10);
        f.extend(b"INVITE sip:a@b SIP/2.0\r\nVia: never ending");
        assert!(matches!(f.next_frame(), Err(FrameError::TooLarge { .. })));
        let mut f = StreamFramer::new(100);
        f.extend(b"X sip:a SIP/2.0\r\nContent-Length: ab\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::BadContentLength));
    }
}
