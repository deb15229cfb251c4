//! Where things are: the repository, the ksmvm binary under test, cargo's
//! scratch directory and the probe guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Overrides the ksmvm binary the kit starts (see [`ksmvm`]).
pub const KSMVM_BIN_ENV: &str = "KSMVM_BIN";
/// Overrides the probe guest (see [`probe`]).
pub const KSMVM_PROBE_ENV: &str = "KSMVM_PROBE";

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory of cargo's build outputs of this test binary's profile
/// (`target/debug` for `target/debug/deps/api-HASH`), if it runs from one.
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.to_path_buf())
}

/// The ksmvm binary under test: `$KSMVM_BIN`, else the `ksmvm` next to the
/// running test binary's `deps/` directory, which is where cargo builds the
/// package's binary before it runs the package's integration tests (what
/// `env!("CARGO_BIN_EXE_ksmvm")` names there; a library cannot use that).
///
/// # Panics
/// When neither names an executable file.
pub fn ksmvm() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os(KSMVM_BIN_ENV) {
            return PathBuf::from(p);
        }
        let bin = profile_dir()
            .map(|d| d.join("ksmvm"))
            .filter(|p| p.is_file());
        bin.unwrap_or_else(|| {
            panic!(
                "no ksmvm binary next to {:?}: run the tests with cargo, or set ${KSMVM_BIN_ENV}",
                std::env::current_exe().ok()
            )
        })
    })
}

/// A scratch directory that outlives the test process, for build products
/// worth keeping between runs (cargo's `target/tmp`, what
/// `CARGO_TARGET_TMPDIR` names for integration tests; else the system's
/// temporary directory).
pub fn scratch_dir() -> PathBuf {
    let dir = profile_dir()
        .and_then(|d| d.parent().map(|t| t.join("tmp")))
        .unwrap_or_else(std::env::temp_dir)
        .join("ksmvm-testkit");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// The probe guest: `$KSMVM_PROBE`, else built from guest-image/probe once
/// per test process (cargo serialises concurrent builds of the same target
/// directory itself).
///
/// # Panics
/// When cargo cannot build it.
pub fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if let Some(p) = std::env::var_os(KSMVM_PROBE_ENV) {
                return PathBuf::from(p);
            }
            let dir = repo_root().join("guest-image/probe");
            let status = Command::new("cargo")
                .args(["build", "--release", "--quiet"])
                .current_dir(&dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET")
                .status()
                .expect("cannot run cargo to build the probe guest");
            assert!(status.success(), "building the probe guest failed");
            dir.join("target/release/probe")
        })
        .clone()
}
