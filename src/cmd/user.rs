//! `sipedge user add|set|del|passwd|list|import`: subscribers, stored as HA1 hashes (MD5 and
//! SHA-256) for the realm they will authenticate in (the plaintext password is never stored),
//! and their caller ID (the number a route with `identity` asserts).

use std::io::{BufRead, IsTerminal as _};
use std::path::Path;

use anyhow::{Context as _, anyhow};
use sipedge::auth::digest;
use sipedge::clock::{Clock, SystemClock};
use sipedge::config::{Config, DigestAlgorithm};
use sipedge::store::{Store, StoreError, Subscriber};

use super::{CmdError, load_config, runtime};

/// `USER[@DOMAIN]` → (user, domain); the domain defaults to the first of `server.domains`.
fn split_user(cfg: &Config, spec: &str) -> Result<(String, String), CmdError> {
    let (user, domain) = match spec.split_once('@') {
        Some((u, d)) => (u.to_owned(), d.to_ascii_lowercase()),
        None => (spec.to_owned(), cfg.server.domains[0].clone()),
    };
    let bad = |what: &str| CmdError::Usage(anyhow!("{spec:?}: {what}"));
    if user.is_empty() || user.contains([':', ' ', '\t', '"', '<', '>']) {
        return Err(bad("not a valid user name"));
    }
    if domain.is_empty() || domain.contains([' ', '@', ':']) {
        return Err(bad("not a valid domain"));
    }
    if !cfg.is_local_domain(&domain) {
        return Err(bad(
            "the domain is not in server.domains, so nobody could register with it",
        ));
    }
    Ok((user, domain))
}

/// The password from `--password`, else from the terminal without echo (asked twice), else
/// one line of standard input (a pipe or a file: scripts and tests).
fn password(given: Option<String>) -> Result<String, CmdError> {
    let pw = match given {
        Some(p) => p,
        None if std::io::stdin().is_terminal() => {
            let read = |prompt: &str| {
                rpassword::prompt_password(prompt)
                    .context("reading the password from the terminal")
                    .map_err(CmdError::Runtime)
            };
            let pw = read("password: ")?;
            if !pw.is_empty() && read("password again: ")? != pw {
                return Err(CmdError::Usage(anyhow!("the passwords differ")));
            }
            pw
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from standard input")
                .map_err(CmdError::Runtime)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if pw.is_empty() {
        return Err(CmdError::Usage(anyhow!("empty password")));
    }
    Ok(pw)
}

/// A caller ID as given on the command line or in an import file: the user part of the
/// asserted `sip:` URI, so digits and the few characters numbers and names use
/// (`+`, `-`, `.`, `_`, `*`, `~`), at most 64. Empty means none.
fn caller_id(given: &str) -> Result<Option<String>, CmdError> {
    if given.is_empty() {
        return Ok(None);
    }
    let ok = given.len() <= 64
        && given
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._*~".contains(&b));
    if !ok {
        return Err(CmdError::Usage(anyhow!(
            "caller ID {given:?}: use at most 64 letters, digits and + - . _ * ~"
        )));
    }
    Ok(Some(given.to_owned()))
}

/// HA1 hashes for the realm this subscriber will be challenged in.
fn hashes(cfg: &Config, user: &str, domain: &str, pw: &str) -> (String, String) {
    let realm = cfg.auth.realm.as_deref().unwrap_or(domain);
    (
        digest::ha1(DigestAlgorithm::Md5, user, realm, pw),
        digest::ha1(DigestAlgorithm::Sha256, user, realm, pw),
    )
}

/// Opens and migrates the store (also for `cdr export`).
pub(crate) async fn open(cfg: &Config) -> Result<Store, CmdError> {
    let store = Store::connect(&cfg.database_url)
        .await
        .context("opening the database")
        .map_err(CmdError::Runtime)?;
    store
        .migrate()
        .await
        .context("migrating the database")
        .map_err(CmdError::Runtime)?;
    Ok(store)
}

pub(crate) fn add(
    path: &Path,
    spec: &str,
    pw: Option<String>,
    caller: Option<String>,
) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    let caller_id = caller_id(caller.as_deref().unwrap_or_default())?;
    let pw = password(pw)?;
    let (ha1_md5, ha1_sha256) = hashes(&cfg, &user, &domain, &pw);
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        let s = Subscriber {
            username: user.clone(),
            domain: domain.clone(),
            ha1_md5,
            ha1_sha256,
            created: SystemClock.unix(),
            caller_id,
        };
        match store.add_subscriber(&s).await {
            Ok(()) => {
                println!("added {user}@{domain}");
                Ok(())
            }
            Err(e @ StoreError::Exists(_)) => Err(CmdError::Usage(e.into())),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

pub(crate) fn passwd(path: &Path, spec: &str, pw: Option<String>) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    let pw = password(pw)?;
    let (md5, sha256) = hashes(&cfg, &user, &domain, &pw);
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match store
            .set_subscriber_hashes(&user, &domain, &md5, &sha256)
            .await
        {
            Ok(true) => {
                println!("password changed for {user}@{domain}");
                Ok(())
            }
            Ok(false) => Err(CmdError::Usage(anyhow!("no subscriber {user}@{domain}"))),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

/// `user set USER --caller-id NUM`: changes what a subscriber's calls assert ("" clears it:
/// the username is asserted then).
pub(crate) fn set(path: &Path, spec: &str, caller: &str) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    let id = caller_id(caller)?;
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match store.set_caller_id(&user, &domain, id.as_deref()).await {
            Ok(true) => {
                match id {
                    Some(id) => println!("caller ID of {user}@{domain} set to {id}"),
                    None => println!("caller ID of {user}@{domain} cleared"),
                }
                Ok(())
            }
            Ok(false) => Err(CmdError::Usage(anyhow!("no subscriber {user}@{domain}"))),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

pub(crate) fn del(path: &Path, spec: &str) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match store.delete_subscriber(&user, &domain).await {
            Ok(true) => {
                println!("deleted {user}@{domain} and their registrations");
                Ok(())
            }
            Ok(false) => Err(CmdError::Usage(anyhow!("no subscriber {user}@{domain}"))),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

pub(crate) fn list(path: &Path) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        let subs = store
            .list_subscribers()
            .await
            .map_err(|e| CmdError::Runtime(e.into()))?;
        for s in subs {
            match s.caller_id {
                Some(id) => println!("{}@{} caller-id={id}", s.username, s.domain),
                None => println!("{}@{}", s.username, s.domain),
            }
        }
        Ok(())
    })
}

/// `user import FILE`: one subscriber per line, `USER[@DOMAIN];PASSWORD` (the SIPp injection
/// format; `SEQUENTIAL`/`RANDOM` header lines, blank lines and `#` comments are skipped) or
/// `USER[@DOMAIN] PASSWORD`, optionally followed by a `caller_id=NUM` field (`;` or white
/// space before it; other further fields are ignored, as SIPp files have their own).
/// Existing subscribers get the new password, and the caller ID when one is given. One
/// transaction.
pub(crate) fn import(path: &Path, file: &Path) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading standard input")
            .map_err(CmdError::Runtime)?;
        s
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))
            .map_err(CmdError::Usage)?
    };
    let now = SystemClock.unix();
    let mut subs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line == "SEQUENTIAL" || line == "RANDOM" {
            continue;
        }
        let (spec, pw) = line
            .split_once(';')
            .or_else(|| line.split_once(char::is_whitespace))
            .ok_or_else(|| {
                CmdError::Usage(anyhow!(
                    "{}:{}: expected USER;PASSWORD",
                    file.display(),
                    i + 1
                ))
            })?;
        let mut fields = pw.split(';');
        let mut pw = fields.next().unwrap_or_default().trim();
        let mut caller = fields.find_map(|f| f.trim().strip_prefix("caller_id="));
        if caller.is_none()
            && let Some((p, c)) = pw.rsplit_once(char::is_whitespace)
            && let Some(c) = c.strip_prefix("caller_id=")
        {
            pw = p.trim();
            caller = Some(c);
        }
        let caller = caller.map(caller_id).transpose()?.flatten();
        if pw.is_empty() {
            return Err(CmdError::Usage(anyhow!(
                "{}:{}: empty password",
                file.display(),
                i + 1
            )));
        }
        let (user, domain) = split_user(&cfg, spec.trim())?;
        let (ha1_md5, ha1_sha256) = hashes(&cfg, &user, &domain, pw);
        subs.push(Subscriber {
            username: user,
            domain,
            ha1_md5,
            ha1_sha256,
            created: now,
            caller_id: caller,
        });
    }
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        let n = store
            .upsert_subscribers(&subs)
            .await
            .map_err(|e| CmdError::Runtime(e.into()))?;
        println!("imported {n} subscriber(s)");
        Ok(())
    })
}
