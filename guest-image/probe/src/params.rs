//! The `probe.*` command line parameters.

/// What to do after `PROBE READY`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Wait for commands on the serial input.
    Idle,
    /// Power off at once.
    PowerOff,
}

/// A deliberate failure to trigger after the boot lines.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An instruction the CPL0 emulator refuses (`lock cmpxchg16b`).
    Emulation,
    /// A triple fault at CPL0.
    Triple,
}

/// The parsed parameters.
pub struct Params {
    pub shared_mib: u64,
    pub unique_mib: u64,
    pub zero_mib: u64,
    pub profile: u64,
    pub seed: u64,
    pub then: Then,
    pub fault: Option<Fault>,
    /// `probe.image=initrd`: replay the `KSMVMRAM` pack loaded as the initrd.
    pub image: bool,
}

/// A parameter with a value it does not accept.
pub struct BadValue<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Parses a decimal or `0x`-prefixed hexadecimal u64.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = char::from(c).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses space-separated `key=value` words; words without `probe.` keys
/// (e.g. `console=ttyS0`) are ignored, as are unknown `probe.` keys.
pub fn parse(cmdline: &[u8]) -> Result<Params, BadValue<'_>> {
    let mut p = Params {
        shared_mib: 0,
        unique_mib: 0,
        zero_mib: 0,
        profile: 0,
        seed: 0,
        then: Then::Idle,
        fault: None,
        image: false,
    };
    for word in cmdline.split(|c| c.is_ascii_whitespace()) {
        let Some(eq) = word.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        let bad = BadValue { key, value };
        let number = || parse_u64(value);
        match key {
            b"probe.shared" => p.shared_mib = number().ok_or(bad)?,
            b"probe.unique" => p.unique_mib = number().ok_or(bad)?,
            b"probe.zero" => p.zero_mib = number().ok_or(bad)?,
            b"probe.profile" => p.profile = number().ok_or(bad)?,
            b"probe.seed" => p.seed = number().ok_or(bad)?,
            b"probe.then" => {
                p.then = match value {
                    b"idle" => Then::Idle,
                    b"poweroff" => Then::PowerOff,
                    _ => return Err(bad),
                }
            }
            b"probe.image" => {
                p.image = match value {
                    b"initrd" => true,
                    b"none" => false,
                    _ => return Err(bad),
                }
            }
            b"probe.fault" => {
                p.fault = match value {
                    b"emulation" => Some(Fault::Emulation),
                    b"triple" => Some(Fault::Triple),
                    _ => return Err(bad),
                }
            }
            _ => {}
        }
    }
    Ok(p)
}
