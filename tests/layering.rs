//! The layering check: every `crate::…` path in `src/` (outside comments and test code) points
//! to a module at its own layer or below, and the pure cores touch no socket, task or clock.
//!
//! Layers, top first; a module may use any module listed after it:
//!
//! ```text
//! main, cmd, fuzzing → app → control → driver → proxy → trunk → media → acc → registrar → nat → auth
//!   → store → dns → config → security → transaction → transport → sip → heap
//!   (clock, log, metrics: utilities for all)
//! ```
//!
//! Test code (a `#[cfg(test)] mod` body, files named `tests.rs` or `*_tests.rs`) is exempt: a
//! test may build its input with a layer above it (a `Config` from TOML).

use std::path::{Path, PathBuf};

use regex::Regex;

const ORDER: [&str; 18] = [
    "app",
    "control",
    "driver",
    "proxy",
    "trunk",
    "media",
    "acc",
    "registrar",
    "nat",
    "auth",
    "store",
    "dns",
    "config",
    "security",
    "transaction",
    "transport",
    "sip",
    "heap",
];
/// Used by every layer; they use nothing of the crate themselves.
const UTILITIES: [&str; 3] = ["clock", "log", "metrics"];
/// Entry points and the fuzz harness: they may use anything.
const TOP: [&str; 4] = ["main", "cmd", "fuzzing", "lib"];
/// Files (or directories, with a trailing `/`) that are pure state machines and parsers.
const PURE: [&str; 14] = [
    "acc.rs",
    "sip/",
    "transaction/",
    "proxy/txn.rs",
    "proxy/forward.rs",
    "proxy/response.rs",
    "proxy/sanity.rs",
    "proxy/pipeline.rs",
    "media/call.rs",
    "media/sdp.rs",
    "nat/detect.rs",
    "auth/digest.rs",
    "dns/select.rs",
    "trunk/register.rs",
];
/// Macros exported at the crate root, and the module that defines them.
const MACROS: [(&str, &str); 1] = [("security_event", "log")];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The 0-based line where a `#[cfg(test)] mod … {` starts, if any.
fn test_module_start(lines: &[&str]) -> Option<usize> {
    let module = Regex::new(r"^\s*(pub(\([a-z]+\))?\s+)?mod\s+\w+\s*\{").expect("valid regex");
    lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && module.is_match(w[1]))
}

/// Every violation in the tree rooted at `src`.
fn violations(src: &Path) -> Vec<String> {
    let uses = Regex::new(r"crate::([a-z_]+)").expect("valid regex");
    let impure = Regex::new(
        r"tokio::(net|task|spawn|sync|time::sleep|select|fs|io)|Instant::now\(|SystemTime::now\(|std::net::(Udp|Tcp)|std::thread",
    )
    .expect("valid regex");
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut errors = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        let me = rel.split('/').next().unwrap_or("").trim_end_matches(".rs");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source is UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        let end = test_module_start(&lines).unwrap_or(lines.len());
        let pure = PURE.iter().any(|p| rel.starts_with(p));
        for (i, line) in lines[..end].iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let at = format!("src/{rel}:{}", i + 1);
            for cap in uses.captures_iter(code) {
                let mut target = &cap[1];
                if let Some((_, m)) = MACROS.iter().find(|(name, _)| *name == target) {
                    target = m;
                }
                if target == me || TOP.contains(&me) || UTILITIES.contains(&target) {
                    continue;
                }
                if UTILITIES.contains(&me) {
                    errors.push(format!("{at}: utility `{me}` uses `crate::{target}`"));
                    continue;
                }
                match (rank(me), rank(target)) {
                    (Some(mine), Some(theirs)) if theirs < mine => errors.push(format!(
                        "{at}: `{me}` uses `crate::{target}`, a layer above it"
                    )),
                    (Some(_), Some(_)) => {}
                    _ => errors.push(format!(
                        "{at}: `{me}` → `{target}`: a module missing from the layer list \
                         (tests/layering.rs ORDER)"
                    )),
                }
            }
            if pure && impure.is_match(code) {
                errors.push(format!(
                    "{at}: a pure core uses I/O, a task or the clock: {}",
                    code.trim()
                ));
            }
        }
    }
    errors
}

#[test]
fn every_import_points_down_and_the_cores_are_pure() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let errors = violations(&src);
    assert!(
        errors.is_empty(),
        "layering violations:\n{}",
        errors.join("\n")
    );
}

/// The check itself catches what it is for: an upward import, a clock read in a pure core,
/// and an unknown module; test code is exempt.
#[test]
fn the_check_catches_an_upward_import_and_a_clock_in_a_pure_core() {
    let dir = std::env::temp_dir().join(format!("sipedge-layering-{}", std::process::id()));
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("temp dir");
        std::fs::write(path, text).expect("temp file");
    };
    write(
        "transport/udp.rs",
        "use crate::proxy::Proxy; // a comment: crate::app\n",
    );
    write(
        "sip/mod.rs",
        "fn f() { let _ = std::time::Instant::now(); }\n",
    );
    write(
        "proxy/mod.rs",
        "use crate::transport::Transmit;\nuse crate::widgets::W;\n",
    );
    write(
        "store/mod.rs",
        "use crate::sip::Message;\n#[cfg(test)]\nmod tests {\n    use crate::app::App;\n}\n",
    );
    let errors = violations(&dir);
    std::fs::remove_dir_all(&dir).expect("temp dir removed");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].contains("src/proxy/mod.rs:2") && errors[0].contains("widgets"));
    assert!(errors[1].contains("src/sip/mod.rs:1") && errors[1].contains("clock"));
    assert!(errors[2].contains("src/transport/udp.rs:1") && errors[2].contains("layer above"));
}
