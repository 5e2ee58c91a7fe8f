//! Where the workspace's binaries are: beside the running executable (`target/<profile>/`,
//! as ripgrep's tests find theirs) unless [`set_bin_dir`] names another directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Once, OnceLock};

static DIR: OnceLock<PathBuf> = OnceLock::new();
/// Whether [`set_bin_dir`] chose the directory (its binaries are then used as they are),
/// as opposed to [`bin_dir`] having found it beside the executable.
static CHOSEN: OnceLock<()> = OnceLock::new();

/// Uses the binaries in `dir` (e.g. the benchmark's `--bin-dir`). Call it before the first
/// [`bin`] or [`bin_dir`]; later calls change nothing.
pub fn set_bin_dir(dir: PathBuf) {
    if DIR.set(dir).is_ok() {
        let _ = CHOSEN.set(());
    }
}

/// The directory of the binaries: [`set_bin_dir`]'s, else `target/<profile>/` of the running
/// executable (a test executable runs from `target/<profile>/deps/`).
pub fn bin_dir() -> &'static Path {
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe.parent().expect("exe dir");
        if dir.ends_with("deps") { dir.parent().expect("target/<profile>") } else { dir }.to_path_buf()
    })
}

/// Path of workspace binary `name`. Under cargo (`cargo test`, `cargo run`: `CARGO` is set)
/// or in a test executable, the binaries beside the executable are first built, once per
/// process, so a test never runs stale ones; a run straight from `target/release` (the
/// benchmark) uses what is there.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    // Asking for the directory first (bin_dir) must not skip the build.
    let own_dir = CHOSEN.get().is_none();
    let dir = bin_dir();
    let test_exe = std::env::current_exe().is_ok_and(|e| e.parent().is_some_and(|d| d.ends_with("deps")));
    if own_dir && (std::env::var_os("CARGO").is_some() || test_exe) {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "--bins", "-p", "worker", "-p", "producer", "-p", "mock-provider"]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "building the binaries failed");
        });
    }
    dir.join(name)
}
