//! Cutting SIP messages out of a byte stream (RFC 3261 §18.3: on a stream the header section
//! ends at the empty line and Content-Length gives the body length), plus the RFC 5626 §4.4.1
//! CRLF keepalive: a double CRLF between messages is a ping, answered by a single CRLF.
//!
//! The buffer is bounded by `max_message_size`: a peer cannot make us hold more, and the search
//! for the end of a header section never looks past that many bytes. The search is incremental
//! (it resumes where the previous read stopped) and iterative, so neither a slow sender nor a
//! crafted header section costs more than one pass over at most `max_message_size` bytes.

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
    /// Where the search for the end of the current header section resumes: every `\n` before
    /// this offset of `buf` has been looked at and does not end the header section.
    scanned: usize,
    /// The current message's header section length and Content-Length, once it is complete.
    head: Option<(usize, usize)>,
}

/// Result of searching for the end of a header section.
#[derive(Debug, PartialEq, Eq)]
enum HeaderEnd {
    /// The header section is complete; its length including the empty line.
    Complete(usize),
    /// Not complete within what was searched; resume the search at this offset.
    Partial(usize),
}

impl StreamFramer {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            scanned: 0,
            head: None,
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
        self.scanned = 0;
        self.head = None;
        std::mem::take(&mut self.buf)
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let (head_len, cl) = match self.head {
            Some(head) => head,
            None => {
                if self.scanned == 0 {
                    if let Some(ping) = self.leading_line_breaks() {
                        return Ok(ping);
                    }
                }
                match header_end(&self.buf, self.scanned, self.max) {
                    HeaderEnd::Complete(head_len) => {
                        let cl = content_length(&self.buf[..head_len])?;
                        self.head = Some((head_len, cl));
                        (head_len, cl)
                    }
                    HeaderEnd::Partial(resume) => {
                        self.scanned = resume;
                        if self.buf.len() >= self.max {
                            // No header section ends within `max` bytes: any end found later
                            // would make the message larger than the limit.
                            let size = self.buf.len();
                            self.buf.truncate(self.max);
                            return Err(FrameError::TooLarge {
                                size,
                                max: self.max,
                            });
                        }
                        return Ok(None);
                    }
                }
            }
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
        self.scanned = 0;
        self.head = None;
        Ok(Some(Frame::Message(std::mem::replace(&mut self.buf, rest))))
    }

    /// Leading line breaks before a message: keepalives (RFC 5626) or stray CRLF after a
    /// message. `Some(frame)` when the call is answered by them (a ping, or more bytes
    /// needed); `None` when a message starts at the front of the buffer now.
    fn leading_line_breaks(&mut self) -> Option<Option<Frame>> {
        let lead = self
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if lead == 0 {
            return None;
        }
        if let Some(p) = find(&self.buf[..lead], b"\r\n\r\n") {
            self.buf.drain(..p + 4);
            return Some(Some(Frame::Ping));
        }
        if lead == self.buf.len() {
            // Maybe the first half of a ping; keep at most 3 bytes.
            if lead >= 4 {
                self.buf.drain(..lead - 3);
            }
            return Some(None);
        }
        self.buf.drain(..lead);
        None
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Searches `buf[from..]`, never past `max` bytes, for the empty line that ends a header
/// section: `\n\n` (bare LF) or `\n\r\n` (CRLF CRLF). A `\n\r` followed by anything else
/// does not end it. `from` must be a value returned in an earlier `Partial` for a prefix of
/// the same buffer (or 0).
fn header_end(buf: &[u8], from: usize, max: usize) -> HeaderEnd {
    let window = &buf[..buf.len().min(max)];
    let mut i = from;
    while let Some(off) = window
        .get(i..)
        .and_then(|w| w.iter().position(|&b| b == b'\n'))
    {
        let nl = i + off;
        match (window.get(nl + 1), window.get(nl + 2)) {
            (Some(b'\n'), _) => return HeaderEnd::Complete(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return HeaderEnd::Complete(nl + 3),
            // The end may be the next bytes: look at this `\n` again when they are in.
            (None, _) | (Some(b'\r'), None) => return HeaderEnd::Partial(nl),
            _ => i = nl + 1,
        }
    }
    HeaderEnd::Partial(window.len())
}

/// The Content-Length (or compact `l`) of a complete header section, 0 when absent; the
/// last one counts when there are several.
fn content_length(head: &[u8]) -> Result<usize, FrameError> {
    let mut cl = None;
    for line in head.split(|&b| b == b'\n') {
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
    Ok(cl.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"MESSAGE sip:a@b SIP/2.0\r\nl: 5\r\nVia: x\r\n\r\nhello";

    /// Feeds `chunks` one after the other and collects every frame.
    fn frame_chunks<'a>(
        f: &mut StreamFramer,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        for chunk in chunks {
            f.extend(chunk);
            while let Some(fr) = f.next_frame().unwrap() {
                frames.push(fr);
            }
        }
        frames
    }

    #[test]
    fn frames_byte_by_byte() {
        let mut f = StreamFramer::new(65535);
        let mut stream = Vec::new();
        stream.extend_from_slice(MSG);
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(MSG);
        let frames = frame_chunks(&mut f, stream.chunks(1));
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
    fn bare_lf_crlf_and_long_content_length() {
        let lf: &[u8] = b"OPTIONS sip:a SIP/2.0\nContent-Length: 3\n\nabc";
        let crlf: &[u8] = b"SIP/2.0 200 OK\r\nCONTENT-LENGTH : 2\r\n\r\nok";
        let no_body: &[u8] = b"ACK sip:a SIP/2.0\r\nVia: x\r\n\r\n";
        let mut stream = Vec::new();
        for m in [lf, crlf, no_body] {
            stream.extend_from_slice(m);
        }
        // All at once, then byte by byte: the same frames.
        for chunk in [stream.len(), 1] {
            let mut f = StreamFramer::new(65535);
            let frames = frame_chunks(&mut f, stream.chunks(chunk));
            assert_eq!(
                frames,
                vec![
                    Frame::Message(lf.to_vec()),
                    Frame::Message(crlf.to_vec()),
                    Frame::Message(no_body.to_vec()),
                ],
                "chunk size {chunk}"
            );
            assert_eq!(f.pending(), 0);
        }
    }

    #[test]
    fn header_split_across_reads_at_every_offset() {
        let mut stream = MSG.to_vec();
        stream.extend_from_slice(b"\r\n\r\n\r\n");
        stream.extend_from_slice(MSG);
        for cut in 0..=stream.len() {
            let mut f = StreamFramer::new(65535);
            let frames = frame_chunks(&mut f, [&stream[..cut], &stream[cut..]]);
            assert_eq!(
                frames,
                vec![
                    Frame::Message(MSG.to_vec()),
                    Frame::Ping,
                    Frame::Message(MSG.to_vec())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn lf_cr_followed_by_other_does_not_end_the_header() {
        // "\n\r" + a character is not an empty line: the header goes on to the real one.
        let msg: &[u8] = b"INFO sip:a SIP/2.0\n\rX: y\r\nl: 1\r\n\r\nZ";
        for chunk in [msg.len(), 1, 2, 3] {
            let mut f = StreamFramer::new(1000);
            let frames = frame_chunks(&mut f, msg.chunks(chunk));
            assert_eq!(frames, vec![Frame::Message(msg.to_vec())], "chunk {chunk}");
        }
    }

    #[test]
    fn crash_input_is_too_large_without_recursion() {
        // The remote crash of issue #10: ~81 KB of "\n\r" + one character on one connection
        // made the old recursive search overflow the stack. Here it is only too large.
        let attack = b"\n\rX".repeat(81 * 1024 / 3);
        let mut f = StreamFramer::new(65535);
        f.extend(&attack);
        assert_eq!(
            f.next_frame(),
            Err(FrameError::TooLarge {
                size: attack.len() - 2,
                max: 65535
            })
        );
        // The head kept for the 513 is bounded by the limit.
        assert_eq!(f.take_head().len(), 65535);

        // With a limit above the input, the whole input is searched: on a 64 KiB stack, which
        // one recursion per "\n\rX" would overflow many times over.
        let big = b"\n\rX".repeat(1 << 20);
        let outcome = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut f = StreamFramer::new(8 << 20);
                f.extend(&big);
                f.extend(b"\r\n\r\n");
                f.next_frame()
            })
            .unwrap()
            .join()
            .unwrap();
        match outcome {
            Ok(Some(Frame::Message(m))) => assert_eq!(m.len(), 3 * (1 << 20) - 2 + 4),
            other => panic!("expected one message, got {other:?}"),
        }
    }

    #[test]
    fn slow_sender_is_searched_once() {
        // One byte per read of a header section that never ends: each call looks only at the
        // new bytes (the resume point trails the buffer end by at most the 2 bytes that may
        // start an empty line), and the limit ends it.
        let mut f = StreamFramer::new(4096);
        let line = b"Via: SIP/2.0/TCP x\r\n\r".repeat(400);
        let mut result = Ok(None);
        for b in &line {
            f.extend(std::slice::from_ref(b));
            result = f.next_frame();
            if result.is_err() {
                break;
            }
            assert!(
                f.scanned + 2 >= f.pending(),
                "{} {}",
                f.scanned,
                f.pending()
            );
        }
        assert_eq!(
            result,
            Err(FrameError::TooLarge {
                size: 4096,
                max: 4096
            })
        );
        // Once the header section is complete, a slow body does not search it again.
        let mut f = StreamFramer::new(4096);
        f.extend(b"MESSAGE sip:a SIP/2.0\r\nl: 3\r\n\r\n");
        assert_eq!(f.next_frame(), Ok(None));
        assert_eq!(f.head, Some((31, 3)));
        f.extend(b"ab");
        assert_eq!(f.next_frame(), Ok(None));
        f.extend(b"c");
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Message(m))) if m.ends_with(b"abc")));
        assert_eq!((f.scanned, f.head), (0, None));
    }

    #[test]
    fn header_end_at_the_limit() {
        let msg: &[u8] = b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n\r\n";
        let mut f = StreamFramer::new(msg.len());
        f.extend(msg);
        assert_eq!(f.next_frame(), Ok(Some(Frame::Message(msg.to_vec()))));
        // One byte less: the empty line is not within the limit.
        let mut f = StreamFramer::new(msg.len() - 1);
        f.extend(msg);
        assert!(matches!(f.next_frame(), Err(FrameError::TooLarge { .. })));
        // Byte by byte, the limit is hit as soon as it is reached.
        let mut f = StreamFramer::new(msg.len() - 1);
        let mut last = Ok(None);
        for b in msg {
            f.extend(std::slice::from_ref(b));
            last = f.next_frame();
            if last.is_err() {
                break;
            }
        }
        assert_eq!(
            last,
            Err(FrameError::TooLarge {
                size: msg.len() - 1,
                max: msg.len() - 1
            })
        );
    }

    #[test]
    fn bounded() {
        // The announced size is over the limit.
        let mut f = StreamFramer::new(60);
        f.extend(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 100\r\n\r\n");
        assert_eq!(
            f.next_frame(),
            Err(FrameError::TooLarge { size: 147, max: 60 })
        );
        // The header section alone is over the limit.
        let mut f = StreamFramer::new(40);
        f.extend(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 100\r\n\r\n");
        assert_eq!(
            f.next_frame(),
            Err(FrameError::TooLarge { size: 47, max: 40 })
        );
        let mut f = StreamFramer::new(10);
        f.extend(b"INVITE sip:a@b SIP/2.0\r\nVia: never ending");
        assert!(matches!(f.next_frame(), Err(FrameError::TooLarge { .. })));
        let mut f = StreamFramer::new(100);
        f.extend(b"X sip:a SIP/2.0\r\nContent-Length: ab\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::BadContentLength));
    }
}
