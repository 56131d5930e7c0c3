//! The response context of a stateful proxy (RFC 3261 §16.7): which responses from the
//! branches go upstream, when, and which final response wins.
//!
//! Pure: branch events in, decisions out.

use crate::sip::{HeaderName, Message};

/// A final response a branch produced: received from downstream, or made up by us (408 on
/// timeout, 503 on transport error, 487 for a branch cancelled before it answered).
#[derive(Debug, Clone)]
pub enum Final {
    Received(Message),
    Local(u16),
}

impl Final {
    pub fn status(&self) -> u16 {
        match self {
            Self::Received(m) => m.status().unwrap_or(500),
            Self::Local(s) => *s,
        }
    }
}

#[derive(Debug, Clone)]
enum Branch {
    Pending { provisional: bool },
    Done(Final),
}

/// What to do after a branch event.
#[derive(Debug, Default)]
pub struct Decision {
    /// Send this response upstream now (a provisional or a 2xx).
    pub forward: Option<Message>,
    /// Cancel the other pending branches (a 2xx or 6xx arrived).
    pub cancel_others: bool,
}

/// A challenge header of another branch's 401/407, to add to the chosen challenge
/// (RFC 3261 §16.7 step 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// [`HeaderName::WwwAuthenticate`] or [`HeaderName::ProxyAuthenticate`].
    pub name: HeaderName,
    /// The value as received, unmodified.
    pub value: String,
}

/// The final response chosen when every branch is done (RFC 3261 §16.7 step 6), with the
/// challenges it collects from the other branches (step 7).
#[derive(Debug, Clone)]
pub struct Conclusion {
    pub best: Final,
    /// Empty unless `best` is a received 401/407 and other branches challenged too.
    pub challenges: Vec<Challenge>,
}

/// Per-request state over all its branches.
#[derive(Debug)]
pub struct ResponseContext {
    branches: Vec<Branch>,
    /// A 2xx was forwarded: no other final goes upstream (but later 2xx do, RFC 3261 §16.7
    /// step 5).
    answered: bool,
    /// The best final was sent upstream.
    concluded: bool,
}

impl ResponseContext {
    pub fn new(branches: usize) -> Self {
        Self {
            branches: vec![Branch::Pending { provisional: false }; branches],
            answered: false,
            concluded: false,
        }
    }

    /// A response from branch `idx` (passed up by its client transaction).
    pub fn on_response(&mut self, idx: usize, resp: Message) -> Decision {
        let status = resp.status().unwrap_or(500);
        let Some(branch) = self.branches.get_mut(idx) else {
            return Decision::default();
        };
        match status {
            // 100 is hop-by-hop (RFC 3261 §16.7 step 5).
            100 => Decision::default(),
            101..=199 => {
                if let Branch::Pending { provisional } = branch {
                    *provisional = true;
                }
                let forward = (!self.answered && !self.concluded).then_some(resp);
                Decision {
                    forward,
                    cancel_others: false,
                }
            }
            200..=299 => {
                // Every 2xx goes upstream at once, even after another one (forked answers); it
                // is never chosen later, so only its status is kept.
                *branch = Branch::Done(Final::Local(status));
                let first = !self.answered;
                self.answered = true;
                Decision {
                    forward: Some(resp),
                    cancel_others: first,
                }
            }
            _ => {
                if matches!(branch, Branch::Pending { .. }) {
                    *branch = Branch::Done(Final::Received(resp));
                }
                Decision {
                    forward: None,
                    cancel_others: (600..700).contains(&status),
                }
            }
        }
    }

    /// A branch ended without a received final (timeout 408, transport error 503, or cancelled
    /// before any response 487).
    pub fn on_local_final(&mut self, idx: usize, status: u16) {
        if let Some(b @ Branch::Pending { .. }) = self.branches.get_mut(idx) {
            *b = Branch::Done(Final::Local(status));
        }
    }

    /// Once the final went upstream (concluded, or a 2xx forwarded), the finals are never
    /// compared again: only their statuses are kept, not the received messages.
    pub fn compact(&mut self) {
        if !(self.concluded || self.answered) {
            return;
        }
        for b in &mut self.branches {
            if let Branch::Done(Final::Received(m)) = b {
                *b = Branch::Done(Final::Local(m.status().unwrap_or(500)));
            }
        }
    }

    /// Branches still waiting, with whether each got a provisional (CANCEL can only follow a
    /// provisional, RFC 3261 §9.1).
    pub fn pending(&self) -> impl Iterator<Item = (usize, bool)> + '_ {
        self.branches
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                Branch::Pending { provisional } => Some((i, *provisional)),
                Branch::Done(_) => None,
            })
    }

    /// When every branch is final and no 2xx went upstream: the response to send, once
    /// (RFC 3261 §16.7 step 6: a 6xx wins, else the lowest class; 503 becomes 500). A chosen
    /// 401/407 collects the `WWW-Authenticate` and `Proxy-Authenticate` values of every other
    /// branch's 401/407 (step 7), so a forked caller can answer all the challenges at once.
    pub fn conclude(&mut self) -> Option<Conclusion> {
        if self.concluded || self.answered || self.pending().next().is_some() {
            return None;
        }
        self.concluded = true;
        let finals = self
            .branches
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                Branch::Done(f) => Some((i, f)),
                Branch::Pending { .. } => None,
            });
        let Some((best_idx, best)) = finals.min_by_key(|(_, f)| {
            let s = f.status();
            let class_rank = if s >= 600 { 0 } else { s / 100 };
            (class_rank, s)
        }) else {
            return Some(Conclusion {
                best: Final::Local(408),
                challenges: Vec::new(),
            });
        };
        let challenges = match best {
            Final::Received(m) if is_challenge(m.status()) => self.challenges(best_idx, m),
            _ => Vec::new(),
        };
        let best = match best.status() {
            503 => Final::Local(500),
            _ => best.clone(),
        };
        Some(Conclusion { best, challenges })
    }

    /// The challenges of the 401/407 finals of every branch but `best_idx`, in branch order,
    /// without those `best` already carries (identical values from two branches of the same
    /// server would only make the caller answer twice).
    fn challenges(&self, best_idx: usize, best: &Message) -> Vec<Challenge> {
        let mut out: Vec<Challenge> = Vec::new();
        let already = |out: &[Challenge], c: &Challenge| {
            out.contains(c) || challenges_of(best).any(|b| b == *c)
        };
        for (i, b) in self.branches.iter().enumerate() {
            let Branch::Done(Final::Received(m)) = b else {
                continue;
            };
            if i == best_idx || !is_challenge(m.status()) {
                continue;
            }
            for c in challenges_of(m) {
                if !already(&out, &c) {
                    out.push(c);
                }
            }
        }
        out
    }

    pub fn is_answered(&self) -> bool {
        self.answered
    }
}

fn is_challenge(status: Option<u16>) -> bool {
    matches!(status, Some(401 | 407))
}

/// The challenge headers of a response, in order.
fn challenges_of(m: &Message) -> impl Iterator<Item = Challenge> + '_ {
    m.headers()
        .iter()
        .filter(|h| {
            matches!(
                h.name,
                HeaderName::WwwAuthenticate | HeaderName::ProxyAuthenticate
            )
        })
        .filter_map(|h| {
            Some(Challenge {
                name: h.name,
                value: m.str_at(h.value.clone())?.to_owned(),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;

    fn resp(status: u16) -> Message {
        let text = format!(
            "SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\n\
To: <sip:c@d>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    #[test]
    fn provisional_forwarded_100_not() {
        let mut rc = ResponseContext::new(2);
        assert!(rc.on_response(0, resp(100)).forward.is_none());
        assert!(rc.on_response(0, resp(180)).forward.is_some());
        assert_eq!(
            rc.pending().collect::<Vec<_>>(),
            vec![(0, true), (1, false)]
        );
    }

    #[test]
    fn best_response_selection() {
        // Lowest class wins; 6xx beats everything; 503 becomes 500; only timeouts → 408.
        let mut rc = ResponseContext::new(3);
        rc.on_response(0, resp(486));
        rc.on_response(1, resp(302));
        assert!(rc.conclude().is_none(), "branch 2 still pending");
        rc.on_local_final(2, 408);
        assert_eq!(rc.conclude().unwrap().best.status(), 302);
        assert!(rc.conclude().is_none(), "concluded once");

        let mut rc = ResponseContext::new(2);
        rc.on_response(0, resp(302));
        let d = rc.on_response(1, resp(603));
        assert!(d.cancel_others);
        assert_eq!(rc.conclude().unwrap().best.status(), 603);

        let mut rc = ResponseContext::new(1);
        rc.on_response(0, resp(503));
        assert_eq!(rc.conclude().unwrap().best.status(), 500);

        let mut rc = ResponseContext::new(2);
        rc.on_local_final(0, 408);
        rc.on_local_final(1, 408);
        assert_eq!(rc.conclude().unwrap().best.status(), 408);
    }

    #[test]
    fn every_2xx_forwarded_nothing_after() {
        let mut rc = ResponseContext::new(2);
        let d = rc.on_response(0, resp(200));
        assert!(d.forward.is_some() && d.cancel_others);
        let d = rc.on_response(1, resp(200));
        assert!(
            d.forward.is_some() && !d.cancel_others,
            "a second 2xx also goes up"
        );
        assert!(rc.on_response(1, resp(180)).forward.is_none());
        assert!(rc.conclude().is_none(), "answered: no other final");
    }

    /// A 401/407 from `realm`'s server, with `extra` more challenge lines.
    fn challenge(status: u16, realm: &str, extra: &str) -> Message {
        let name = if status == 401 {
            "WWW-Authenticate"
        } else {
            "Proxy-Authenticate"
        };
        let text = format!(
            "SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\n\
To: <sip:c@d>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
{name}: Digest realm=\"{realm}\", nonce=\"n-{realm}\"\r\n{extra}\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    #[test]
    fn forked_challenges_are_merged_into_the_chosen_one() {
        // RFC 3261 §16.7 step 7: the 401 wins (lowest code) and carries the 407's
        // Proxy-Authenticate and the other 401's WWW-Authenticate, unmodified, once each.
        let mut rc = ResponseContext::new(4);
        rc.on_response(0, challenge(407, "b", ""));
        rc.on_response(1, challenge(401, "a", ""));
        rc.on_response(
            2,
            challenge(
                401,
                "c",
                "WWW-Authenticate: Digest realm=\"a\", nonce=\"n-a\"\r\n",
            ),
        );
        rc.on_response(3, resp(486));
        let c = rc.conclude().unwrap();
        assert_eq!(c.best.status(), 401);
        let Final::Received(best) = &c.best else {
            panic!("the received 401 is chosen: {c:?}")
        };
        assert_eq!(
            best.header_str(HeaderName::WwwAuthenticate),
            Some("Digest realm=\"a\", nonce=\"n-a\""),
            "the chosen response is branch 1's"
        );
        assert_eq!(
            c.challenges,
            vec![
                Challenge {
                    name: HeaderName::ProxyAuthenticate,
                    value: "Digest realm=\"b\", nonce=\"n-b\"".into()
                },
                Challenge {
                    name: HeaderName::WwwAuthenticate,
                    value: "Digest realm=\"c\", nonce=\"n-c\"".into()
                },
            ],
            "branch 2's copy of branch 1's challenge is not repeated"
        );
    }

    #[test]
    fn challenges_only_when_a_challenge_is_chosen() {
        // A 3xx beats the 407: nothing is collected.
        let mut rc = ResponseContext::new(2);
        rc.on_response(0, challenge(407, "b", ""));
        rc.on_response(1, resp(302));
        let c = rc.conclude().unwrap();
        assert_eq!(c.best.status(), 302);
        assert!(c.challenges.is_empty());

        // A single challenge goes up as is.
        let mut rc = ResponseContext::new(2);
        rc.on_response(0, challenge(407, "b", ""));
        rc.on_local_final(1, 408);
        let c = rc.conclude().unwrap();
        assert_eq!(c.best.status(), 407);
        assert!(c.challenges.is_empty());
    }
}
