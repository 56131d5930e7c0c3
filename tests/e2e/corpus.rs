//! The message corpus of `tests/data/sip/` (modelled on the RFC 4475 categories): every
//! message gets its expected verdict from the sanity check, the parsed fields match the
//! manifest, and parse → no edits → bytes is the identity.

use std::path::PathBuf;

use serde::Deserialize;
use sipedge::proxy::sanity::{self, Verdict};
use sipedge::sip::{ContactValue, Framing, Rewrite, SipUri};

#[derive(Debug, Deserialize)]
struct Manifest {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    about: String,
    #[serde(default)]
    rfc4475: Option<String>,
    verdict: toml::Value,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    max_size: Option<usize>,
    method: Option<String>,
    status: Option<u16>,
    call_id: Option<String>,
    cseq: Option<u32>,
    from_tag: Option<String>,
    to_tag: Option<String>,
    via_count: Option<usize>,
    top_branch: Option<String>,
    contacts: Option<usize>,
    contact_star: Option<bool>,
    max_forwards: Option<u8>,
    body_len: Option<usize>,
    ruri_user: Option<String>,
    ruri_host: Option<String>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sip")
}

#[test]
fn every_message_gets_its_verdict() {
    let text = std::fs::read_to_string(dir().join("corpus.toml")).unwrap();
    let manifest: Manifest = toml::from_str(&text).unwrap();
    assert!(manifest.case.len() >= 40, "the corpus shrank");
    let mut failures = Vec::new();
    for case in &manifest.case {
        let bytes = std::fs::read(dir().join(&case.file)).unwrap();
        if let Err(e) = check_case(case, &bytes) {
            failures.push(format!("{} ({}): {e}", case.file, case.about));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn check_case(case: &Case, bytes: &[u8]) -> Result<(), String> {
    let max = case.max_size.unwrap_or(65535);
    let _ = &case.rfc4475;
    let verdict = sanity::check(bytes, Framing::Datagram, max);
    let expected = match &case.verdict {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        other => return Err(format!("bad verdict {other:?} in manifest")),
    };
    let (got, msg) = match verdict {
        Verdict::Request(m) | Verdict::Response(m) => ("ok".to_owned(), Some(m)),
        Verdict::Drop(r) => (format!("drop ({r:?})"), None),
        Verdict::Reject {
            msg,
            status,
            reason,
        } => {
            if let Some(want) = &case.reason {
                if !reason.to_lowercase().contains(&want.to_lowercase()) {
                    return Err(format!("reason {reason:?} does not mention {want:?}"));
                }
            }
            (status.to_string(), Some(msg))
        }
    };
    if !got.starts_with(&expected) {
        return Err(format!("verdict {got}, expected {expected}"));
    }
    let Some(m) = msg else { return Ok(()) };
    if expected != "ok" && m.defect().is_some() {
        return Ok(());
    }
    // Forwarded-style identity: parse → no edits → the same bytes (after leading CRLFs and
    // bytes beyond Content-Length, which RFC 3261 §18.3 discards).
    let out = Rewrite::new(&m).finish();
    if out != m.as_bytes() || !bytes.windows(out.len().max(1)).any(|w| w == out.as_slice()) {
        return Err("rewrite without edits changed the message".into());
    }
    let eq = |what: &str, got: String, want: String| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: got {got:?}, want {want:?}"))
        }
    };
    if let Some(w) = &case.method {
        eq("method", m.method().unwrap_or("").into(), w.clone())?;
    }
    if let Some(w) = case.status {
        eq(
            "status",
            format!("{:?}", m.status()),
            format!("{:?}", Some(w)),
        )?;
    }
    if let Some(w) = &case.call_id {
        eq(
            "call_id",
            m.call_id().map_err(|e| e.to_string())?.into(),
            w.clone(),
        )?;
    }
    if let Some(w) = case.cseq {
        eq(
            "cseq",
            m.cseq().map_err(|e| e.to_string())?.seq.to_string(),
            w.to_string(),
        )?;
    }
    if let Some(w) = &case.from_tag {
        let f = m.from().map_err(|e| e.to_string())?;
        eq("from_tag", f.tag().unwrap_or("").into(), w.clone())?;
    }
    if let Some(w) = &case.to_tag {
        let t = m.to().map_err(|e| e.to_string())?;
        eq("to_tag", t.tag().unwrap_or("").into(), w.clone())?;
    }
    if let Some(w) = case.via_count {
        eq(
            "via_count",
            m.vias().map_err(|e| e.to_string())?.len().to_string(),
            w.to_string(),
        )?;
    }
    if let Some(w) = &case.top_branch {
        let v = m.top_via().map_err(|e| e.to_string())?;
        eq("top_branch", v.branch().unwrap_or("").into(), w.clone())?;
    }
    if case.contacts.is_some() || case.contact_star.is_some() {
        let c = m.contacts().map_err(|e| e.to_string())?;
        if let Some(w) = case.contacts {
            eq("contacts", c.len().to_string(), w.to_string())?;
        }
        let star = c.contains(&ContactValue::Star);
        eq(
            "contact_star",
            star.to_string(),
            case.contact_star.unwrap_or(false).to_string(),
        )?;
    }
    if let Some(w) = case.max_forwards {
        let mf = m.max_forwards().map_err(|e| e.to_string())?;
        eq("max_forwards", format!("{mf:?}"), format!("{:?}", Some(w)))?;
    }
    if let Some(w) = case.body_len {
        eq("body_len", m.body().len().to_string(), w.to_string())?;
    }
    if case.ruri_user.is_some() || case.ruri_host.is_some() {
        let uri = SipUri::parse(m.request_uri().unwrap_or("")).map_err(|e| e.to_string())?;
        if let Some(w) = &case.ruri_user {
            eq("ruri_user", uri.user.unwrap_or("").into(), w.clone())?;
        }
        if let Some(w) = &case.ruri_host {
            let want = w.trim_start_matches('[').trim_end_matches(']');
            eq("ruri_host", uri.host.into(), want.into())?;
        }
    }
    Ok(())
}
