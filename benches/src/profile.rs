//! Named memory profiles for the probe guest (benches/profiles.toml).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::host::{MIB, PAGE_SIZE};

/// The profiles shipped with the harness.
pub const BUILT_IN: &str = include_str!("../profiles.toml");

/// RAM the probe needs for itself (image, page tables, boot data), MiB.
pub const PROBE_RESERVED_MIB: u64 = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(skip_deserializing)]
    pub name: String,
    pub description: String,
    pub mem_mib: u64,
    pub shared_mib: u64,
    pub unique_mib: u64,
    pub zero_mib: u64,
    /// probe.profile: which shared content (guests with the same id merge).
    pub probe_profile: u64,
    #[serde(default)]
    pub write_churn_pages_per_s: Option<u64>,
    pub source: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Clone)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

impl Profiles {
    pub fn built_in() -> Result<Self> {
        Self::parse(BUILT_IN).context("built-in benches/profiles.toml")
    }

    /// The built-in profiles, or those of `path`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Self::built_in(),
            Some(p) => {
                let text =
                    fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                Self::parse(&text).with_context(|| format!("in {}", p.display()))
            }
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        let file: ProfileFile = toml::from_str(text)?;
        let mut by_name = BTreeMap::new();
        for (name, mut p) in file.profiles {
            p.name = name.clone();
            p.validate()?;
            by_name.insert(name, p);
        }
        Ok(Self { by_name })
    }

    pub fn get(&self, name: &str) -> Result<&Profile> {
        self.by_name.get(name).with_context(|| {
            format!(
                "no profile named {name:?}; known profiles: {}",
                self.names().join(", ")
            )
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.by_name.values()
    }
}

impl Profile {
    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("profile name {n:?}: use letters, digits and '-'");
        }
        if let Some(churn) = self.write_churn_pages_per_s.filter(|&c| c > 0) {
            bail!(
                "profile {n}: write_churn_pages_per_s = {churn}, but the probe guest has no \
                 write churn yet; remove it or set it to 0"
            );
        }
        let touched = self.touched_mib();
        if self.mem_mib < touched + PROBE_RESERVED_MIB {
            bail!(
                "profile {n}: shared + unique + zero = {touched} MiB does not fit in mem_mib = {} \
                 (the probe needs {PROBE_RESERVED_MIB} MiB for itself)",
                self.mem_mib
            );
        }
        if touched == 0 {
            bail!("profile {n}: fills no memory");
        }
        Ok(())
    }

    pub fn touched_mib(&self) -> u64 {
        self.shared_mib + self.unique_mib + self.zero_mib
    }

    /// The probe command line for the guest with `seed`.
    pub fn cmdline(&self, seed: u64) -> String {
        format!(
            "console=ttyS0 probe.shared={} probe.unique={} probe.zero={} probe.profile={} probe.seed={seed}",
            self.shared_mib, self.unique_mib, self.zero_mib, self.probe_profile
        )
    }

    /// Host memory one guest takes before any merging, bytes (its touched
    /// RAM plus the probe's own pages and the VMM process).
    pub fn footprint_bytes(&self) -> u64 {
        (self.touched_mib() + PROBE_RESERVED_MIB) * MIB
    }

    /// Host memory for `n` guests without KSM: n (S + U + Z), bytes.
    pub fn ideal_without_ksm(&self, n: u64) -> u64 {
        n * self.touched_mib() * MIB
    }

    /// Host memory for `n` guests with perfect merging: S + n U, bytes
    /// (the zero pages collapse into one page).
    pub fn ideal_with_ksm(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        (self.shared_mib + n * self.unique_mib) * MIB + u64::from(self.zero_mib > 0) * PAGE_SIZE
    }

    /// Pages KSM saves for `n` guests with perfect merging (the growth of
    /// the host's pages_sharing).
    pub fn ideal_pages_sharing(&self, n: u64) -> u64 {
        let pages = MIB / PAGE_SIZE;
        let shared = n.saturating_sub(1) * self.shared_mib * pages;
        let zero = (n * self.zero_mib * pages).saturating_sub(u64::from(self.zero_mib > 0));
        shared + zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_are_valid() {
        let p = Profiles::built_in().unwrap();
        for name in ["mastodon-idle", "demo", "small", "tiny"] {
            let prof = p.get(name).unwrap();
            assert_eq!(prof.name, name);
        }
        assert_eq!(p.get("mastodon-idle").unwrap().mem_mib, 1024);
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let msg = Profiles::built_in()
            .unwrap()
            .get("nope")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("nope") && msg.contains("mastodon-idle"),
            "{msg}"
        );
    }

    #[test]
    fn ideal_figures() {
        let p = Profiles::built_in().unwrap();
        let d = p.get("demo").unwrap();
        assert_eq!(d.cmdline(3), "console=ttyS0 probe.shared=160 probe.unique=32 probe.zero=16 probe.profile=1 probe.seed=3");
        assert_eq!(d.ideal_without_ksm(4), 4 * 208 * MIB);
        assert_eq!(d.ideal_with_ksm(4), (160 + 4 * 32) * MIB + PAGE_SIZE);
        assert_eq!(d.ideal_pages_sharing(1), 16 * 256 - 1);
        assert_eq!(d.ideal_pages_sharing(4), 3 * 160 * 256 + 4 * 16 * 256 - 1);
        assert_eq!(d.ideal_with_ksm(0), 0);
    }

    #[test]
    fn rejects_bad_profiles() {
        let base = "description = \"x\"\nprobe_profile = 1\nsource = \"s\"\n";
        let too_big = format!(
            "[profiles.a]\n{base}mem_mib = 64\nshared_mib = 60\nunique_mib = 0\nzero_mib = 0\n"
        );
        assert!(Profiles::parse(&too_big)
            .unwrap_err()
            .to_string()
            .contains("does not fit"));
        let churn = format!("[profiles.a]\n{base}mem_mib = 64\nshared_mib = 8\nunique_mib = 0\nzero_mib = 0\nwrite_churn_pages_per_s = 5\n");
        assert!(Profiles::parse(&churn)
            .unwrap_err()
            .to_string()
            .contains("churn"));
        let unknown = format!("[profiles.a]\n{base}mem_mib = 64\nshared_mib = 8\nunique_mib = 0\nzero_mib = 0\nbogus = 1\n");
        assert!(Profiles::parse(&unknown).is_err());
        let name = format!("[profiles.\"a b\"]\n{base}mem_mib = 64\nshared_mib = 8\nunique_mib = 0\nzero_mib = 0\n");
        assert!(Profiles::parse(&name).is_err());
    }
}
