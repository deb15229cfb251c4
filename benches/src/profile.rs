//! Named memory profiles for the probe guest (benches/profiles.toml).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ksmvm::stats::ApproxF64;
use probe_pattern::pack::{PackHeader, HEADER_LEN};
use serde::{Deserialize, Serialize};

use crate::host::{MIB, PAGE_SIZE};

/// The profiles shipped with the harness.
pub const BUILT_IN: &str = include_str!("../profiles.toml");

/// RAM the probe needs for itself (image, page tables, boot data), MiB.
pub const PROBE_RESERVED_MIB: u64 = 8;
/// RAM below the probe's workload pool (its image and DMA arena), MiB.
const PROBE_POOL_START_MIB: u64 = 2;
/// Pages per MiB.
const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;

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
    /// A captured memory image (`KSMVMRAM` pack, `memprofile --pack`) that
    /// every guest replays: passed as `--initrd` with `probe.image=initrd`.
    /// Its pages come on top of the three regions. A relative path is taken
    /// from the profiles file's folder (the current one for the built-in
    /// profiles).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// The image's header, read when the profiles are loaded.
    #[serde(skip)]
    pub pack: Option<PackHeader>,
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
        Self::parse_in(BUILT_IN, Path::new("")).context("built-in benches/profiles.toml")
    }

    /// The built-in profiles, or those of `path`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Self::built_in(),
            Some(p) => {
                let text =
                    fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                let dir = p.parent().unwrap_or(Path::new(""));
                Self::parse_in(&text, dir).with_context(|| format!("in {}", p.display()))
            }
        }
    }

    /// Profiles from `text`; image paths are relative to the current folder.
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_in(text, Path::new(""))
    }

    /// Profiles from `text`; relative image paths are taken from `dir`,
    /// and every image's header is read and checked.
    pub fn parse_in(text: &str, dir: &Path) -> Result<Self> {
        let file: ProfileFile = toml::from_str(text)?;
        let mut by_name = BTreeMap::new();
        for (name, mut p) in file.profiles {
            p.name = name.clone();
            if let Some(image) = p.image.take() {
                let image = dir.join(image);
                p.pack = Some(
                    read_pack_header(&image)
                        .with_context(|| format!("profile {name}: image {}", image.display()))?,
                );
                p.image = Some(image);
            }
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
        let explicit = self.shared_mib + self.unique_mib + self.zero_mib;
        let image_mib = self.image_file_pages().div_ceil(PAGES_PER_MIB);
        if self.mem_mib < explicit + image_mib + PROBE_RESERVED_MIB {
            let what = if self.pack.is_some() {
                format!("shared + unique + zero + image = {explicit} + {image_mib} MiB")
            } else {
                format!("shared + unique + zero = {explicit} MiB")
            };
            bail!(
                "profile {n}: {what} does not fit in mem_mib = {} \
                 (the probe needs {PROBE_RESERVED_MIB} MiB for itself)",
                self.mem_mib
            );
        }
        if explicit == 0 && self.pack.is_none() {
            bail!("profile {n}: fills no memory");
        }
        Ok(())
    }

    /// Pages of the image file (header, table and stored pages), 0 without
    /// an image: the initrd the VMM loads into every guest.
    pub fn image_file_pages(&self) -> u64 {
        self.pack
            .and_then(|h| h.file_len())
            .map_or(0, |b| b.div_ceil(PAGE_SIZE))
    }

    /// Resident pages identical in every guest: the shared region, and the
    /// image's shared pages with its header and table.
    pub fn shared_pages(&self) -> u64 {
        let image = self
            .pack
            .map_or(0, |h| self.image_file_pages() - h.unique());
        self.shared_mib * PAGES_PER_MIB + image
    }

    /// Resident pages different in every guest: the unique region and the
    /// image's own pages.
    pub fn unique_pages(&self) -> u64 {
        self.unique_mib * PAGES_PER_MIB + self.pack.map_or(0, |h| h.unique())
    }

    /// Touched zero pages: the zero region and the image's zero pages, as
    /// many of those as the probe's pool holds (it stops at a full pool).
    pub fn zero_pages(&self) -> u64 {
        let region = self.zero_mib * PAGES_PER_MIB;
        let image = self.pack.map_or(0, |h| {
            let pool = self.mem_mib.saturating_sub(PROBE_POOL_START_MIB) * PAGES_PER_MIB;
            let used = (self.shared_mib + self.unique_mib + self.zero_mib) * PAGES_PER_MIB
                + self.image_file_pages();
            h.zero_pages.min(pool.saturating_sub(used))
        });
        region + image
    }

    /// Resident pages of one guest's workload: S + U + Z.
    pub fn touched_pages(&self) -> u64 {
        self.shared_pages() + self.unique_pages() + self.zero_pages()
    }

    /// "S shared, U unique, Z zero MiB" (the image included), for messages.
    pub fn split_text(&self) -> String {
        format!(
            "{} shared, {} unique, {} zero MiB{}",
            mib_text(self.shared_pages()),
            mib_text(self.unique_pages()),
            mib_text(self.zero_pages()),
            self.image
                .as_ref()
                .map_or(String::new(), |p| format!(", image {}", p.display()))
        )
    }

    /// The probe command line for the guest with `seed`.
    pub fn cmdline(&self, seed: u64) -> String {
        let image = if self.image.is_some() {
            " probe.image=initrd"
        } else {
            ""
        };
        format!(
            "console=ttyS0 probe.shared={} probe.unique={} probe.zero={} probe.profile={} probe.seed={seed}{image}",
            self.shared_mib, self.unique_mib, self.zero_mib, self.probe_profile
        )
    }

    /// Host memory one guest takes before any merging, bytes (its touched
    /// RAM plus the probe's own pages and the VMM process).
    pub fn footprint_bytes(&self) -> u64 {
        self.touched_pages() * PAGE_SIZE + PROBE_RESERVED_MIB * MIB
    }

    /// Host memory for `n` guests without KSM: n (S + U + Z), bytes.
    pub fn ideal_without_ksm(&self, n: u64) -> u64 {
        n * self.touched_pages() * PAGE_SIZE
    }

    /// Host memory for `n` guests with perfect merging: S + n U, bytes
    /// (the zero pages collapse into one page).
    pub fn ideal_with_ksm(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        (self.shared_pages() + n * self.unique_pages() + u64::from(self.zero_pages() > 0))
            * PAGE_SIZE
    }

    /// Pages KSM saves for `n` guests with perfect merging (the growth of
    /// the host's pages_sharing).
    pub fn ideal_pages_sharing(&self, n: u64) -> u64 {
        let shared = n.saturating_sub(1) * self.shared_pages();
        let zero = (n * self.zero_pages()).saturating_sub(u64::from(self.zero_pages() > 0));
        shared + zero
    }
}

/// Pages as MiB: whole MiB without decimals, else one decimal.
pub fn mib_text(pages: u64) -> String {
    if pages.is_multiple_of(PAGES_PER_MIB) {
        (pages / PAGES_PER_MIB).to_string()
    } else {
        format!("{:.1}", pages.approx_f64() / PAGES_PER_MIB.approx_f64())
    }
}

/// Reads and checks the header of the `KSMVMRAM` pack at `path`.
pub fn read_pack_header(path: &Path) -> Result<PackHeader> {
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut head = Vec::with_capacity(HEADER_LEN);
    file.take(HEADER_LEN as u64).read_to_end(&mut head)?;
    PackHeader::parse(&head, len).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_are_valid() {
        let p = Profiles::built_in().unwrap();
        for name in ["mastodon-idle", "base-idle", "demo", "small", "tiny"] {
            let prof = p.get(name).unwrap();
            assert_eq!(prof.name, name);
        }
        assert_eq!(p.get("mastodon-idle").unwrap().mem_mib, 1024);
        let base = p.get("base-idle").unwrap();
        assert_eq!(
            (base.mem_mib, base.shared_mib, base.unique_mib),
            (1024, 122, 47)
        );
        assert!(p.iter().all(|prof| prof.image.is_none()));
    }

    #[test]
    fn image_profiles_read_the_pack() {
        use probe_pattern::pack::SyntheticPack;
        let dir = std::env::temp_dir().join(format!("ksmvm-bench-pack-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // 700 shared + 300 own pages of a 64 MiB source.
        let pack = SyntheticPack {
            shared: 700,
            unique: 300,
            zero: 16384 - 1000,
            key: 1,
        };
        let mut bytes = Vec::new();
        pack.write(|b| bytes.extend_from_slice(b));
        fs::write(dir.join("img.ksmvmram"), &bytes).unwrap();
        let text = "[profiles.img]\ndescription = \"x\"\nprobe_profile = 1\nsource = \"s\"\n\
                    mem_mib = 64\nshared_mib = 0\nunique_mib = 0\nzero_mib = 0\n\
                    image = \"img.ksmvmram\"\n";
        let file = dir.join("profiles.toml");
        fs::write(&file, text).unwrap();
        let profiles = Profiles::load(Some(&file)).unwrap();
        let p = profiles.get("img").unwrap();
        assert_eq!(p.image.as_deref(), Some(dir.join("img.ksmvmram").as_path()));
        assert!(p.cmdline(2).ends_with(" probe.seed=2 probe.image=initrd"));
        // File: header, two table pages, 1000 pages; the header and table
        // are the same in every guest.
        assert_eq!(p.image_file_pages(), 1003);
        assert_eq!(p.shared_pages(), 703);
        assert_eq!(p.unique_pages(), 300);
        // The pool (62 MiB) minus the initrd holds fewer zero pages than the
        // source had.
        assert_eq!(p.zero_pages(), 62 * 256 - 1003);
        assert_eq!(p.ideal_with_ksm(3), (703 + 3 * 300 + 1) * PAGE_SIZE);
        assert_eq!(
            p.ideal_without_ksm(2),
            2 * (703 + 300 + 62 * 256 - 1003) * PAGE_SIZE
        );
        assert!(p.split_text().contains("image "), "{}", p.split_text());

        // A file that is not a pack is refused when the profiles load.
        fs::write(dir.join("img.ksmvmram"), vec![0u8; 8192]).unwrap();
        let e = format!("{:#}", Profiles::load(Some(&file)).unwrap_err());
        assert!(e.contains("profile img") && e.contains("bad magic"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
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
