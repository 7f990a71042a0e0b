//! The git revision a build comes from, shared by `build.rs` (which bakes it into
//! `--version`) and the tests. Not in a git checkout (a release tarball, a vendored
//! copy), without git installed, or inside someone else's repository: None, and the
//! version is the package version alone.

use std::path::Path;
use std::process::Command;

/// The 12-hex-digit revision of HEAD of the checkout whose top is `dir`, or None.
pub fn git_revision(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // A tarball unpacked inside another repository must not take that one's revision.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    (rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit())).then_some(rev)
}

/// What `--version` prints after the program name.
pub fn version_string(package_version: &str, revision: Option<&str>) -> String {
    match revision {
        Some(rev) => format!("{package_version} (git {rev})"),
        None => package_version.to_string(),
    }
}

/// Files whose change means HEAD may have moved: HEAD itself, the branch it names
/// and packed-refs (paths from git, so a worktree's `.git` file works too).
pub fn head_files(dir: &Path) -> Vec<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let mut files = Vec::new();
    for p in ["HEAD", "packed-refs"] {
        files.extend(git(&["rev-parse", "--git-path", p]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.extend(git(&["rev-parse", "--git-path", &branch]));
    }
    files
        .into_iter()
        .map(|f| dir.join(f).display().to_string())
        .collect()
}
