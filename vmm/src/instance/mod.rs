//! Where a running instance lives on the host. Its API socket: `$KSMVM_RUNTIME_DIR`, else /run/ksmvm for
//! root and `$XDG_RUNTIME_DIR/ksmvm` for other users (members of the kvm
//! group cannot write /run); one `NAME.sock` per VM, which is how
//! `ksmvm list` finds them.

use std::path::{Path, PathBuf};

pub const RUNTIME_DIR_ENV: &str = "KSMVM_RUNTIME_DIR";
pub const DEFAULT_RUNTIME_DIR: &str = "/run/ksmvm";
const SOCKET_SUFFIX: &str = ".sock";

pub fn runtime_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|d| !d.is_empty());
    if let Some(d) = var(RUNTIME_DIR_ENV) {
        return PathBuf::from(d);
    }
    if !nix::unistd::geteuid().is_root() {
        if let Some(d) = var("XDG_RUNTIME_DIR") {
            return PathBuf::from(d).join("ksmvm");
        }
    }
    PathBuf::from(DEFAULT_RUNTIME_DIR)
}

/// The default socket of VM `name` (the name must be validated first: it
/// becomes a file name).
pub fn socket_path(name: &str) -> PathBuf {
    socket_path_in(&runtime_dir(), name)
}

pub fn socket_path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{SOCKET_SUFFIX}"))
}

/// `(name, socket)` of every `*.sock` in `dir`, sorted by name; a missing
/// directory means no VMs.
pub fn list_sockets(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|n| n.strip_suffix(SOCKET_SUFFIX))
        else {
            continue;
        };
        if !name.is_empty() {
            out.push((name.to_owned(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_sockets_by_name() {
        let dir = std::env::temp_dir().join(format!("ksmvm-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["b.sock", "a.sock", "notes.txt", ".sock"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let names: Vec<String> = list_sockets(&dir)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(socket_path_in(&dir, "a"), dir.join("a.sock"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(list_sockets(&dir).unwrap().is_empty());
    }
}
