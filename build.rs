//! Bakes the git revision into `--version` (see build/revision.rs).

#[path = "build/revision.rs"]
mod revision;

fn main() {
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let rev = revision::git_revision(&dir);
    let version = revision::version_string(env!("CARGO_PKG_VERSION"), rev.as_deref());
    println!("cargo:rustc-env=PORTOLAN_VERSION={version}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/revision.rs");
    if rev.is_some() {
        for f in revision::head_files(&dir) {
            println!("cargo:rerun-if-changed={f}");
        }
    }
}
