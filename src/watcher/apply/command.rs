//! Running the operator's commands (`check_cmd`, `reload_cmd`): `sh -c` in a process
//! group of its own, bounded by a timeout that kills the whole group, optionally at a
//! lower CPU priority, with the output kept for the report.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::dest::Dest;

/// Niceness of a check run off the latency path: it yields the CPU to HAProxy and to the
/// next change.
pub(crate) const BACKGROUND_NICE: i32 = 10;

/// Output of a shell command.
#[derive(Debug)]
pub(crate) struct CommandResult {
    pub(crate) success: bool,
    pub(crate) status: String,
    /// stdout then stderr, trimmed.
    pub(crate) output: String,
    /// Killed at the timeout: it may have done part of its work.
    pub(crate) timed_out: bool,
}

impl CommandResult {
    /// The command could not be run at all (its input could not be written).
    pub(crate) fn not_run(output: String) -> CommandResult {
        CommandResult {
            success: false,
            status: "not run".into(),
            output,
            timed_out: false,
        }
    }
}

/// Quotes a path for `sh -c`.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// `check_cmd` on `staged` (its `{src}`), its CPU priority lowered by `nice` (0: unchanged).
pub(crate) async fn run_check(
    cmd: &str,
    staged: &Path,
    timeout: Duration,
    nice: i32,
) -> CommandResult {
    let mut result = run_shell(&cmd.replace("{src}", &shell_quote(staged)), timeout, nice).await;
    if !result.success && result.output.is_empty() {
        // The log, the `reject` hook and `render --dry-run` show this output: an empty
        // one (`haproxy -c -q`) would say only "exit status: 1".
        result.output = "the check printed nothing, so why it refused the file is unknown: \
             drop -q from check_cmd (`haproxy -c -f {src}`) to see HAProxy's reasons"
            .to_string();
    }
    result
}

/// Runs `sh -c cmd` in its own process group with a timeout; on timeout the whole group
/// is killed, so a hung command (or anything it started) never wedges the watcher.
/// `nice` lowers its CPU priority (0: unchanged).
pub(crate) async fn run_shell(cmd: &str, timeout: Duration, nice: i32) -> CommandResult {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if nice != 0 {
        // SAFETY: setpriority is async-signal-safe, and the closure touches nothing else
        // between fork and exec. A failure only leaves the priority as it was.
        unsafe {
            command.pre_exec(move || {
                nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nice);
                Ok(())
            });
        }
    }
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CommandResult {
                success: false,
                status: "not started".into(),
                output: format!("cannot run `sh -c {cmd}`: {e}"),
                timed_out: false,
            }
        }
    };
    let pgid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            CommandResult {
                success: out.status.success(),
                status: out.status.to_string(),
                output: text.trim().to_string(),
                timed_out: false,
            }
        }
        Ok(Err(e)) => CommandResult {
            success: false,
            status: "wait failed".into(),
            output: format!("waiting for `{cmd}`: {e}"),
            timed_out: false,
        },
        Err(_) => {
            if let Some(id) = pgid {
                // Negative pid: the whole process group this command runs in.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(-(id as i32)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            CommandResult {
                success: false,
                status: format!("timed out after {timeout:?}"),
                output: format!(
                    "`{cmd}` did not finish within {timeout:?} and was killed (raise watcher.command_timeout_ms if it is just slow)"
                ),
                timed_out: true,
            }
        }
    }
}

/// Runs `check_cmd` on a private copy of `bytes` beside `dest`, then removes the copy.
pub(super) async fn check_copy(
    cmd: &str,
    dest: &Dest,
    bytes: &[u8],
    timeout: Duration,
    nice: i32,
) -> CommandResult {
    let staged = match dest.stage_copy(bytes).await {
        Ok(p) => p,
        Err(e) => {
            return CommandResult::not_run(format!(
                "cannot stage a copy of {} to check: {e}",
                dest.show()
            ))
        }
    };
    let result = run_check(cmd, &staged, timeout, nice).await;
    let _ = tokio::fs::remove_file(&staged).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hung_command_is_killed_with_its_children_at_the_timeout() {
        let start = std::time::Instant::now();
        let r = run_shell("sleep 30 & sleep 30", Duration::from_millis(300), 0).await;
        assert!(r.timed_out && !r.success, "{r:?}");
        assert!(r.output.contains("did not finish"), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_check_sees_its_file_quoted_and_its_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("it's here");
        std::fs::write(&f, "x").unwrap();
        let r = run_check("test -s {src} && echo fine", &f, Duration::from_secs(5), 0).await;
        assert!(r.success, "{r:?}");
        assert_eq!(r.output, "fine");
        let r = run_check("echo nope >&2; false", &f, Duration::from_secs(5), 0).await;
        assert!(!r.success && r.output == "nope", "{r:?}");
        // A silent failure (`haproxy -c -q`) says how to see the reasons.
        let r = run_check("false", &f, Duration::from_secs(5), 0).await;
        assert!(
            !r.success && r.output.contains("drop -q from check_cmd"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_niced_command_runs_at_the_given_priority() {
        let r = run_shell("cut -d' ' -f19 /proc/self/stat", Duration::from_secs(5), 10).await;
        assert_eq!(r.output, "10", "{r:?}");
    }
}
