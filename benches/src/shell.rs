//! Command lines as one would type them in sh: shared by `boot` (the
//! command it shows) and `compare` (the other VMM's command it builds).
//! A leaf module: it imports nothing of the crate.

use std::process::Command;

/// Single-quotes `s` for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `cmd` as one would type it in sh (its environment is not shown).
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
            {
                a.into_owned()
            } else {
                sh_quote(&a)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn shows_a_command_line() {
        let mut c = Command::new("ksmvm");
        c.args(["run", "--cmdline", "console=ttyS0 probe.seed=1"]);
        assert_eq!(
            command_line(&c),
            "ksmvm run --cmdline 'console=ttyS0 probe.seed=1'"
        );
    }
}
