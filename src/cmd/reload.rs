//! `sipedge reload`: makes the running server reload its configuration by sending it SIGHUP,
//! exactly as `kill -HUP` does. The authority to reload is the operating system's: whoever
//! may signal the server process (its user, or root) may reload it, and nobody else.

use std::path::Path;

use anyhow::anyhow;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{CmdError, load_config};

/// Validates the configuration file, then signals the server: the one whose id is in
/// `server.pid_file`, or `pid`.
pub(crate) fn run(path: &Path, pid: Option<i32>) -> Result<(), CmdError> {
    // The server would refuse an invalid file too (and say so in its log); saying it here
    // is quicker, and nothing is sent.
    let cfg = load_config(path)?;
    let pid = match pid {
        Some(p) if p > 0 => p,
        Some(p) => return Err(CmdError::Usage(anyhow!("--pid {p} is not a process id"))),
        None => {
            let Some(file) = &cfg.server.pid_file else {
                return Err(CmdError::Usage(anyhow!(
                    "server.pid_file is not set in {}: set it (serve writes its process id \
                     there) or give --pid PID",
                    path.display()
                )));
            };
            read_pid(file)?
        }
    };
    check_is_sipedge(pid)?;
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| {
        CmdError::Runtime(match e {
            Errno::ESRCH => anyhow!("no process {pid}: the server is not running"),
            Errno::EPERM => anyhow!(
                "not permitted to signal process {pid}: run this as the server's user or root"
            ),
            e => anyhow!("signalling process {pid}: {e}"),
        })
    })?;
    println!(
        "sent SIGHUP to sipedge (pid {pid}); its log says \"configuration reloaded\" or why not"
    );
    Ok(())
}

/// The process id in the pid file `serve` wrote.
fn read_pid(file: &Path) -> Result<i32, CmdError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        CmdError::Runtime(anyhow!(
            "reading the pid file {}: {e} (is the server running?)",
            file.display()
        ))
    })?;
    parse_pid(&text).ok_or_else(|| {
        CmdError::Runtime(anyhow!(
            "the pid file {} does not hold a process id",
            file.display()
        ))
    })
}

fn parse_pid(text: &str) -> Option<i32> {
    text.trim().parse::<i32>().ok().filter(|p| *p > 0)
}

/// Refuses to signal a process that is not sipedge: a pid file left by a crash may name a
/// number the system gave to another program since, and SIGHUP ends most programs. Reads
/// the executable's name from `/proc` (Linux); where there is none, there is nothing to check.
fn check_is_sipedge(pid: i32) -> Result<(), CmdError> {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) if !comm.trim().starts_with("sipedge") => Err(CmdError::Runtime(anyhow!(
            "process {pid} is {:?}, not sipedge: the pid file is stale",
            comm.trim()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_pid;

    #[test]
    fn pid_file_contents() {
        assert_eq!(parse_pid("4242\n"), Some(4242));
        assert_eq!(parse_pid(" 17 "), Some(17));
        for bad in ["", "0", "-5", "abc", "12 13"] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }
}
