//! REGISTER processing after authentication (RFC 3261 §10.3 steps 6-8), as a pure decision:
//! the request, the current bindings of the address-of-record and `now` in; the bindings to
//! write and remove, or the rejection, out.

use std::borrow::Cow;
use std::sync::Arc;

use super::location::Binding;
use crate::config::RegistrarConfig;
use crate::sip::{ContactValue, HeaderName, Message};
use crate::transport::Source;

/// A REGISTER refused by the rules of §10.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: Cow<'static, str>,
    /// Extra response headers (Min-Expires with 423).
    pub headers: Vec<(&'static str, String)>,
}

fn reject(status: u16, reason: &'static str) -> Rejection {
    Rejection {
        status,
        reason: reason.into(),
        headers: Vec::new(),
    }
}

/// What the registrar will do. A binding is shared (`Arc`) between `upsert`, `after` and the
/// location service's memory: a refresh copies no binding (issue #15: the copies were about
/// a dozen allocations per REGISTER).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Bindings to insert or refresh in the store.
    pub upsert: Vec<Arc<Binding>>,
    /// Contact URIs to delete from the store.
    pub remove: Vec<String>,
    /// The bindings of the AOR once the change is applied (for the 200 and the memory map).
    pub after: Vec<Arc<Binding>>,
}

impl Decision {
    /// A query (no Contact) or a no-op changes nothing.
    pub fn is_change(&self) -> bool {
        !self.upsert.is_empty() || !self.remove.is_empty()
    }
}

/// Who registers and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub aor: &'a str,
    pub source: Source,
    pub instance: &'a str,
    pub now: u64,
}

/// Applies §10.3 steps 6-8 to `current` (the bindings of the AOR; the expired ones are
/// dropped). Takes them by value: they become the decision's `after`, without a copy.
pub fn decide(
    cfg: &RegistrarConfig,
    req: &Message,
    origin: Origin<'_>,
    current: Vec<Arc<Binding>>,
) -> Result<Decision, Rejection> {
    let now = origin.now;
    let live = |b: &Arc<Binding>| b.expires > now;
    let contacts = req
        .contacts()
        .map_err(|_| reject(400, "Malformed Contact header"))?;
    // invariant: sanity has validated Call-ID and CSeq of every request that gets here.
    let call_id = req
        .call_id()
        .map_err(|_| reject(400, "Malformed Call-ID header"))?;
    let cseq = req
        .cseq()
        .map_err(|_| reject(400, "Malformed CSeq header"))?
        .seq;
    let header_expires = match req.header(HeaderName::Expires) {
        None => None,
        Some(h) => Some(
            std::str::from_utf8(req.bytes_at(h.value.clone()))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| reject(400, "Malformed Expires header"))?,
        ),
    };

    // Step 6: no Contact is a query.
    if contacts.is_empty() {
        let mut after = current;
        after.retain(live);
        return Ok(Decision {
            upsert: Vec::new(),
            remove: Vec::new(),
            after,
        });
    }

    // `Contact: *` removes every binding, only alone and with Expires: 0 (§10.2.2).
    if contacts.contains(&ContactValue::Star) {
        if contacts.len() != 1 || header_expires != Some(0) {
            return Err(reject(
                400,
                "Invalid Contact: * (needs Expires: 0 and no other Contact)",
            ));
        }
        for b in current.iter().filter(|b| live(b)) {
            if b.call_id == call_id && cseq < b.cseq {
                return Err(reject(400, "Invalid CSeq number"));
            }
        }
        return Ok(Decision {
            upsert: Vec::new(),
            remove: current.iter().map(|b| b.contact.clone()).collect(),
            after: Vec::new(),
        });
    }

    let user_agent = req
        .header_str(HeaderName::UserAgent)
        .unwrap_or_default()
        .to_owned();
    let path = req
        .headers_named(HeaderName::Path)
        .filter_map(|h| req.str_at(h.value.clone()))
        .collect::<Vec<_>>()
        .join(", ");

    // Kamailio `fix_nated_register`: a REGISTER that came through NAT (nathelper's tests:
    // a private Contact, or a Via sent-by other than the source) has its contacts reached at
    // the address it came from; otherwise at the Contact URI itself (a public phone, or a
    // registration made on a phone's behalf by a PBX or a provisioning tool).
    let nated = crate::nat::detect::detect(req, origin.source.remote).is_nated();

    // Sized up front: a binding is about 270 bytes, and a Vec's first growth (four of them)
    // would take over a kilobyte, past glibc's fast paths (issue #15).
    let mut after = current;
    after.retain(live);
    after.reserve_exact(contacts.len());
    let mut upsert = Vec::with_capacity(contacts.len());
    let mut remove = Vec::new();
    for c in &contacts {
        let ContactValue::Addr(addr) = c else {
            continue;
        };
        let expires = match addr.param("expires") {
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| reject(400, "Malformed expires parameter"))?,
            None => header_expires.unwrap_or(u64::from(cfg.default_expires)),
        };
        let q = match addr.param("q") {
            Some(v) => parse_q(v).ok_or_else(|| reject(400, "Malformed q parameter"))?,
            None => 1000,
        };
        // Step 7: the same Call-ID with a lower CSeq is an out-of-order request. An equal CSeq
        // is a retransmission and is applied again (Kamailio does the same).
        if let Some(old) = after.iter().find(|b| b.contact == addr.uri) {
            if old.call_id == call_id && cseq < old.cseq {
                return Err(reject(400, "Invalid CSeq number"));
            }
        }
        if expires == 0 {
            if let Some(pos) = after.iter().position(|b| b.contact == addr.uri) {
                after.remove(pos);
                remove.push(addr.uri.to_owned());
            }
            continue;
        }
        if expires < u64::from(cfg.min_expires) {
            return Err(Rejection {
                status: 423,
                reason: "Interval Too Brief".into(),
                headers: vec![("Min-Expires", cfg.min_expires.to_string())],
            });
        }
        let expires = expires.min(u64::from(cfg.max_expires));
        let instance_urn = addr
            .param("+sip.instance")
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        // RFC 5626 §6: a new contact from the same instance replaces its old one (a phone that
        // rebooted and got a new port), instead of piling up towards max_contacts.
        if !instance_urn.is_empty() {
            let mut i = 0;
            while i < after.len() {
                if after[i].instance_urn == instance_urn && after[i].contact != addr.uri {
                    remove.push(after.remove(i).contact.clone());
                } else {
                    i += 1;
                }
            }
        }
        let binding = Arc::new(Binding {
            aor: origin.aor.to_owned(),
            contact: addr.uri.to_owned(),
            received: origin.source.remote,
            nated,
            transport: origin.source.proto,
            local_socket: origin.source.local,
            instance: origin.instance.to_owned(),
            expires: now + expires,
            q,
            call_id: call_id.to_owned(),
            cseq,
            user_agent: user_agent.clone(),
            path: path.clone(),
            instance_urn,
            updated: now,
        });
        match after.iter_mut().find(|b| b.contact == binding.contact) {
            Some(old) => *old = Arc::clone(&binding),
            None => after.push(Arc::clone(&binding)),
        }
        upsert.retain(|b: &Arc<Binding>| b.contact != binding.contact);
        upsert.push(binding);
    }
    if after.len() > cfg.max_contacts {
        return Err(reject(403, "Too many registered contacts"));
    }
    // A contact both removed (by instance replacement) and re-added is an upsert only.
    remove.retain(|c| !upsert.iter().any(|b| &b.contact == c));
    Ok(Decision {
        upsert,
        remove,
        after,
    })
}

/// `q` = 0 / 1 with up to three decimals (RFC 3261 §20.10 qvalue), in per-mille.
fn parse_q(v: &str) -> Option<u16> {
    let v = v.trim();
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u16 = match int {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    let mut f = 0u16;
    for (i, b) in frac.bytes().enumerate() {
        f += u16::from(b - b'0') * [100, 10, 1][i];
    }
    let q = int * 1000 + f;
    (q <= 1000).then_some(q)
}

/// The Contact header values of a 200 OK: every binding with its remaining seconds.
pub fn contact_headers(bindings: &[Arc<Binding>], now: u64) -> Vec<(&'static str, String)> {
    bindings
        .iter()
        .map(|b| {
            let mut v = format!("<{}>;expires={}", b.contact, b.remaining(now));
            if b.q != 1000 {
                v.push_str(&format!(";q={}", format_q(b.q)));
            }
            if !b.instance_urn.is_empty() {
                v.push_str(&format!(";+sip.instance=\"{}\"", b.instance_urn));
            }
            ("Contact", v)
        })
        .collect()
}

fn format_q(q: u16) -> String {
    let s = format!("{}.{:03}", q / 1000, q % 1000);
    let s = s.trim_end_matches('0');
    s.trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Framing;
    use crate::transport::Proto;

    fn cfg() -> RegistrarConfig {
        RegistrarConfig {
            default_expires: 60,
            min_expires: 30,
            max_expires: 3600,
            max_contacts: 3,
        }
    }

    fn origin(now: u64) -> Origin<'static> {
        Origin {
            aor: "alice@example.com",
            source: Source {
                proto: Proto::Udp,
                remote: "203.0.113.9:40000".parse().unwrap(),
                local: "198.51.100.1:5060".parse().unwrap(),
            },
            instance: "edge-1",
            now,
        }
    }

    fn reg(cseq: u32, headers: &str) -> Message {
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK{cseq}\r\n\
From: <sip:alice@example.com>;tag=f\r\nTo: <sip:alice@example.com>\r\nCall-ID: reg-1\r\n\
CSeq: {cseq} REGISTER\r\n{headers}Content-Length: 0\r\n\r\n"
        );
        Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
    }

    fn apply(
        current: &[Arc<Binding>],
        cseq: u32,
        headers: &str,
        now: u64,
    ) -> Result<Decision, Rejection> {
        decide(&cfg(), &reg(cseq, headers), origin(now), current.to_vec())
    }

    #[test]
    fn nated_register_is_reached_at_its_source_a_public_one_at_its_contact() {
        // NATed: the Via says 10.0.0.2, the packet came from 203.0.113.9 (and the Contact is
        // private too).
        let d = apply(&[], 1, "Contact: <sip:a@10.0.0.2>\r\n", 1000).unwrap();
        assert!(d.after[0].nated);
        // A private Contact alone is enough (Via sent-by = source).
        let public_via = |contact: &str| {
            let text = format!(
                "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.9:40000;branch=z9hG4bK1\r\n\
From: <sip:alice@example.com>;tag=f\r\nTo: <sip:alice@example.com>\r\nCall-ID: reg-2\r\n\
CSeq: 1 REGISTER\r\nContact: <{contact}>\r\nContent-Length: 0\r\n\r\n"
            );
            let m = Message::parse(text.as_bytes(), Framing::Datagram).unwrap();
            decide(&cfg(), &m, origin(1000), Vec::new()).unwrap().after[0].nated
        };
        assert!(public_via("sip:a@192.168.1.5:5060"));
        // Public Contact, Via = source: a third party registering a public contact (here on
        // another host than the sender) is not NATed, so the Contact is used.
        assert!(!public_via("sip:a@198.51.100.77:5070"));
    }

    #[test]
    fn expiry_sources_and_clamping() {
        let d = apply(&[], 1, "Contact: <sip:a@10.0.0.2>\r\n", 1000).unwrap();
        assert_eq!(d.after[0].expires, 1060, "default_expires");
        assert_eq!(d.after[0].received, "203.0.113.9:40000".parse().unwrap());
        assert_eq!(d.after[0].instance, "edge-1");
        let d = apply(
            &[],
            1,
            "Contact: <sip:a@10.0.0.2>\r\nExpires: 120\r\n",
            1000,
        )
        .unwrap();
        assert_eq!(d.after[0].expires, 1120, "Expires header");
        let d = apply(
            &[],
            1,
            "Contact: <sip:a@10.0.0.2>;expires=300\r\nExpires: 120\r\n",
            1000,
        )
        .unwrap();
        assert_eq!(d.after[0].expires, 1300, "the parameter beats the header");
        let d = apply(&[], 1, "Contact: <sip:a@10.0.0.2>;expires=99999\r\n", 1000).unwrap();
        assert_eq!(d.after[0].expires, 1000 + 3600, "clamped to max_expires");
        let r = apply(&[], 1, "Contact: <sip:a@10.0.0.2>;expires=10\r\n", 1000).unwrap_err();
        assert_eq!(r.status, 423);
        assert_eq!(r.headers, vec![("Min-Expires", "30".to_owned())]);
    }

    #[test]
    fn star_query_and_removal() {
        let d = apply(&[], 1, "Contact: <sip:a@h1>, <sip:a@h2>;q=0.5\r\n", 1000).unwrap();
        let current = d.after.clone();
        assert_eq!(current.len(), 2);
        assert_eq!(current[1].q, 500);
        // A query returns the live bindings and changes nothing.
        let q = apply(&current, 2, "", 1010).unwrap();
        assert!(!q.is_change());
        assert_eq!(q.after.len(), 2);
        // `*` needs Expires: 0 and must stand alone.
        assert_eq!(
            apply(&current, 3, "Contact: *\r\n", 1010)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            apply(
                &current,
                3,
                "Contact: *, <sip:a@h3>\r\nExpires: 0\r\n",
                1010
            )
            .unwrap_err()
            .status,
            400
        );
        let d = apply(&current, 3, "Contact: *\r\nExpires: 0\r\n", 1010).unwrap();
        assert!(d.after.is_empty());
        assert_eq!(d.remove.len(), 2);
        // Removing one contact by expires=0.
        let d = apply(&current, 4, "Contact: <sip:a@h1>;expires=0\r\n", 1010).unwrap();
        assert_eq!(d.remove, vec!["sip:a@h1".to_owned()]);
        assert_eq!(d.after.len(), 1);
    }

    #[test]
    fn cseq_ordering() {
        let d = apply(&[], 5, "Contact: <sip:a@h1>\r\n", 1000).unwrap();
        // Lower CSeq with the same Call-ID: refused. Equal (a retransmission): applied again.
        assert_eq!(
            apply(&d.after, 4, "Contact: <sip:a@h1>\r\n", 1001)
                .unwrap_err()
                .status,
            400
        );
        assert!(apply(&d.after, 5, "Contact: <sip:a@h1>\r\n", 1001).is_ok());
        assert!(apply(&d.after, 6, "Contact: <sip:a@h1>\r\n", 1001).is_ok());
    }

    #[test]
    fn max_contacts_and_instance_replacement() {
        let d = apply(
            &[],
            1,
            "Contact: <sip:a@h1>, <sip:a@h2>, <sip:a@h3>\r\n",
            1000,
        )
        .unwrap();
        assert_eq!(
            apply(&d.after, 2, "Contact: <sip:a@h4>\r\n", 1000)
                .unwrap_err()
                .status,
            403
        );
        // The same +sip.instance from a new port replaces the old binding (kamailio#278).
        let inst = ";+sip.instance=\"<urn:uuid:1>\"";
        let d = apply(&[], 1, &format!("Contact: <sip:a@h1:5060>{inst}\r\n"), 1000).unwrap();
        let d = apply(
            &d.after,
            2,
            &format!("Contact: <sip:a@h1:6000>{inst}\r\n"),
            1000,
        )
        .unwrap();
        assert_eq!(d.after.len(), 1);
        assert_eq!(d.after[0].contact, "sip:a@h1:6000");
        assert_eq!(d.remove, vec!["sip:a@h1:5060".to_owned()]);
        assert_eq!(d.after[0].instance_urn, "<urn:uuid:1>");
    }

    #[test]
    fn q_values_and_headers() {
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.0"), Some(1000));
        assert_eq!(parse_q("0.001"), Some(1));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.0001"), None);
        assert_eq!(parse_q("abc"), None);
        let d = apply(&[], 1, "Contact: <sip:a@h1>;q=0.25;expires=100\r\n", 1000).unwrap();
        assert_eq!(
            contact_headers(&d.after, 1040),
            vec![("Contact", "<sip:a@h1>;expires=60;q=0.25".to_owned())]
        );
    }
}
