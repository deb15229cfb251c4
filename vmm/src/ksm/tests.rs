//! Tests of the KSM handle against a fake sysfs directory (copied from this
//! machine's Linux 6.18 values), plus ignored tests against the real host.

use std::fs;
use std::path::Path;

use super::test_util::TempDir;
use super::*;

const REAL_6_18: &[(&str, &str)] = &[
    ("advisor_max_cpu", "70"),
    ("advisor_max_pages_to_scan", "30000"),
    ("advisor_min_pages_to_scan", "500"),
    ("advisor_mode", "[none] scan-time"),
    ("advisor_target_scan_time", "200"),
    ("full_scans", "0"),
    ("general_profit", "0"),
    ("ksm_zero_pages", "0"),
    ("max_page_sharing", "256"),
    ("merge_across_nodes", "1"),
    ("pages_scanned", "0"),
    ("pages_shared", "0"),
    ("pages_sharing", "0"),
    ("pages_skipped", "0"),
    ("pages_to_scan", "100"),
    ("pages_unshared", "0"),
    ("pages_volatile", "0"),
    ("run", "0"),
    ("sleep_millisecs", "20"),
    ("smart_scan", "1"),
    ("stable_node_chains", "0"),
    ("stable_node_chains_prune_millisecs", "2000"),
    ("stable_node_dups", "0"),
    ("use_zero_pages", "0"),
];

fn fake_sysfs(files: &[(&str, &str)]) -> (TempDir, Ksm) {
    let dir = TempDir::new("sysfs");
    for (name, value) in files {
        fs::write(dir.path().join(name), format!("{value}\n")).unwrap();
    }
    let ksm = Ksm::with_roots(dir.path(), dir.path().join("no-proc"));
    (dir, ksm)
}

fn get(dir: &TempDir, name: &str) -> String {
    fs::read_to_string(dir.path().join(name))
        .unwrap()
        .trim()
        .to_owned()
}

fn set(dir: &TempDir, name: &str, value: &str) {
    fs::write(dir.path().join(name), value).unwrap();
}

#[test]
fn status_reads_every_value() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    set(&dir, "general_profit", "-4096");
    set(&dir, "pages_sharing", "31750");
    let s = ksm.status().unwrap();
    assert_eq!(s.counters.pages_sharing, Some(31750));
    assert_eq!(s.counters.general_profit, Some(-4096));
    assert_eq!(s.counters.stable_node_dups, Some(0));
    assert_eq!(s.settings.run, Some(RunMode::Stop));
    assert_eq!(s.settings.advisor_mode, Some(AdvisorMode::None));
    assert_eq!(s.settings.merge_across_nodes, Some(true));
    assert_eq!(s.settings.smart_scan, Some(true));
    assert_eq!(s.settings.stable_node_chains_prune_millisecs, Some(2000));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["settings"]["advisor_mode"], "none");
    assert_eq!(json["settings"]["run"], "stop");
}

#[test]
fn missing_files_are_unavailable_not_zero() {
    // A 5.15-like kernel: no advisor, no profit, no zero pages.
    let old: Vec<_> = REAL_6_18
        .iter()
        .copied()
        .filter(|(n, _)| {
            !n.starts_with("advisor")
                && !matches!(*n, "general_profit" | "ksm_zero_pages" | "smart_scan")
        })
        .collect();
    let (_dir, ksm) = fake_sysfs(&old);
    let s = ksm.status().unwrap();
    assert_eq!(s.counters.general_profit, None);
    assert_eq!(s.counters.ksm_zero_pages, None);
    assert_eq!(s.settings.advisor_mode, None);
    assert_eq!(s.settings.smart_scan, None);
    assert_eq!(s.counters.pages_shared, Some(0));
}

#[test]
fn advisor_scan_time_is_parsed() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    set(&dir, "advisor_mode", "none [scan-time]\n");
    assert_eq!(
        ksm.settings().unwrap().advisor_mode,
        Some(AdvisorMode::ScanTime)
    );
    set(&dir, "advisor_mode", "garbage\n");
    assert!(matches!(ksm.settings(), Err(KsmError::Parse { .. })));
}

#[test]
fn no_ksm_in_kernel() {
    let ksm = Ksm::with_roots("/nonexistent/ksm", "/proc");
    assert!(!ksm.is_available());
    let err = ksm.status().unwrap_err();
    assert!(matches!(err, KsmError::NotBuiltIn { .. }), "{err}");
    assert!(err.to_string().contains("CONFIG_KSM"));
    assert!(matches!(ksm.enable(), Err(KsmError::NotBuiltIn { .. })));
}

#[test]
fn run_modes() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    ksm.enable().unwrap();
    assert_eq!(get(&dir, "run"), "1");
    ksm.disable().unwrap();
    assert_eq!(get(&dir, "run"), "0");
    ksm.unmerge_all().unwrap();
    assert_eq!(get(&dir, "run"), "2");
    assert_eq!(ksm.settings().unwrap().run, Some(RunMode::Unmerge));
}

#[test]
fn tune_writes_requested_knobs_only() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    ksm.tune(&KsmTuning {
        pages_to_scan: Some(20000),
        use_zero_pages: Some(true),
        merge_across_nodes: Some(false),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&dir, "pages_to_scan"), "20000");
    assert_eq!(get(&dir, "use_zero_pages"), "1");
    assert_eq!(get(&dir, "merge_across_nodes"), "0");
    assert_eq!(get(&dir, "sleep_millisecs"), "20");
    assert_eq!(get(&dir, "run"), "0");

    ksm.tune(&KsmTuning {
        advisor_mode: Some(AdvisorMode::ScanTime),
        advisor_target_scan_time: Some(30),
        enabled: Some(true),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&dir, "advisor_mode"), "scan-time");
    assert_eq!(get(&dir, "advisor_target_scan_time"), "30");
    assert_eq!(get(&dir, "run"), "1");
}

#[test]
fn tune_validates_before_writing() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    for (t, knob) in [
        (
            KsmTuning {
                pages_to_scan: Some(0),
                ..Default::default()
            },
            "pages_to_scan",
        ),
        (
            KsmTuning {
                pages_to_scan: Some(100_001),
                ..Default::default()
            },
            "pages_to_scan",
        ),
        (
            KsmTuning {
                sleep_millisecs: Some(0),
                ..Default::default()
            },
            "sleep_millisecs",
        ),
        (
            KsmTuning {
                max_page_sharing: Some(1),
                ..Default::default()
            },
            "max_page_sharing",
        ),
        (
            KsmTuning {
                advisor_target_scan_time: Some(0),
                ..Default::default()
            },
            "advisor_target_scan_time",
        ),
        (
            KsmTuning {
                pages_to_scan: Some(10),
                advisor_mode: Some(AdvisorMode::ScanTime),
                ..Default::default()
            },
            "pages_to_scan",
        ),
    ] {
        let err = ksm.tune(&t).unwrap_err();
        assert_eq!(err.knob(), Some(knob), "{err}");
    }
    assert_eq!(get(&dir, "pages_to_scan"), "100");
}

#[test]
fn tune_pages_to_scan_while_advisor_runs_says_why() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    set(&dir, "advisor_mode", "none [scan-time]\n");
    let err = ksm
        .tune(&KsmTuning {
            pages_to_scan: Some(500),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("advisor"), "{err}");
}

#[test]
fn tune_missing_knob_is_named() {
    let no_numa: Vec<_> = REAL_6_18
        .iter()
        .copied()
        .filter(|(n, _)| *n != "merge_across_nodes")
        .collect();
    let (dir, ksm) = fake_sysfs(&no_numa);
    let err = ksm
        .tune(&KsmTuning {
            merge_across_nodes: Some(false),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            KsmError::KnobMissing {
                knob: "merge_across_nodes",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        !dir.path().join("merge_across_nodes").exists(),
        "must not create knobs"
    );
}

#[test]
fn apply_file_names_file_and_key() {
    let no_numa: Vec<_> = REAL_6_18
        .iter()
        .copied()
        .filter(|(n, _)| *n != "merge_across_nodes")
        .collect();
    let (dir, ksm) = fake_sysfs(&no_numa);
    let file = dir.path().join("ksm.toml");
    fs::write(
        &file,
        "pages_to_scan = 5000\nsleep_millisecs = 50\nenabled = true\n",
    )
    .unwrap();
    let t = ksm.apply_file(&file).unwrap();
    assert_eq!(t.pages_to_scan, Some(5000));
    assert_eq!(get(&dir, "pages_to_scan"), "5000");
    assert_eq!(get(&dir, "sleep_millisecs"), "50");
    assert_eq!(get(&dir, "run"), "1");

    fs::write(&file, "merge_across_nodes = false\n").unwrap();
    let msg = ksm.apply_file(&file).unwrap_err().to_string();
    assert!(
        msg.contains("ksm.toml") && msg.contains("merge_across_nodes"),
        "{msg}"
    );
}

#[test]
fn snapshot_and_restore() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    let saved = ksm.settings().unwrap();
    ksm.tune(&KsmTuning {
        pages_to_scan: Some(20000),
        sleep_millisecs: Some(5),
        use_zero_pages: Some(true),
        max_page_sharing: Some(10),
        enabled: Some(true),
        ..Default::default()
    })
    .unwrap();
    set(&dir, "advisor_mode", "none [scan-time]\n");
    set(&dir, "smart_scan", "0\n");
    ksm.restore(&saved).unwrap();
    // A plain file keeps the word written; sysfs would show the choice list.
    assert_eq!(get(&dir, "advisor_mode"), "none");
    set(&dir, "advisor_mode", "[none] scan-time\n");
    assert_eq!(ksm.settings().unwrap(), saved);
    // Only the knobs that differed were written (a plain file shows no newline).
    assert_eq!(
        fs::read_to_string(dir.path().join("stable_node_chains_prune_millisecs")).unwrap(),
        "2000\n"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("pages_to_scan")).unwrap(),
        "100"
    );
}

#[test]
fn restore_reports_every_failure() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    let saved = ksm.settings().unwrap();
    set(&dir, "sleep_millisecs", "99\n");
    set(&dir, "max_page_sharing", "3\n");
    fs::remove_file(dir.path().join("smart_scan")).unwrap();
    let mut want = saved.clone();
    want.smart_scan = Some(false);
    let Err(KsmError::Restore { failures }) = ksm.restore(&want) else {
        panic!("expected a restore error");
    };
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, "smart_scan");
    // The other knobs were still restored.
    assert_eq!(get(&dir, "sleep_millisecs"), "20");
    assert_eq!(get(&dir, "max_page_sharing"), "256");
}

#[test]
fn guard_restores_on_panic() {
    let (dir, ksm) = fake_sysfs(REAL_6_18);
    let k = ksm.clone();
    let result = std::panic::catch_unwind(move || {
        let _guard = k.settings_guard().unwrap();
        k.enable().unwrap();
        k.tune(&KsmTuning {
            pages_to_scan: Some(9999),
            ..Default::default()
        })
        .unwrap();
        panic!("test failure while KSM is tuned");
    });
    assert!(result.is_err());
    assert_eq!(get(&dir, "run"), "0");
    assert_eq!(get(&dir, "pages_to_scan"), "100");

    let guard = ksm.settings_guard().unwrap();
    ksm.enable().unwrap();
    guard.restore().unwrap();
    assert_eq!(get(&dir, "run"), "0");
}

#[test]
fn host_lock_excludes_a_second_holder() {
    let dir = TempDir::new("lock");
    let path = dir.path().join("lock");
    let held = HostLock::acquire_at(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    let t = std::thread::spawn(move || {
        let _second = HostLock::acquire_at(&p).unwrap();
        tx.send(()).unwrap();
    });
    assert!(rx
        .recv_timeout(std::time::Duration::from_millis(100))
        .is_err());
    drop(held);
    rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    t.join().unwrap();
}

/// Changes the host's real KSM knobs and restores them. Ignored by default:
/// KSM is host-global (run with `--ignored` as root).
#[test]
#[ignore = "changes host-global KSM settings; needs root"]
fn real_host_tune_and_restore() {
    let ksm = Ksm::new();
    if !Path::new(Ksm::SYSFS_ROOT).exists() {
        return;
    }
    let _lock = HostLock::acquire().unwrap();
    let before = ksm.settings().unwrap();
    {
        let _guard = ksm.settings_guard().unwrap();
        ksm.tune(&KsmTuning {
            pages_to_scan: Some(1234),
            sleep_millisecs: Some(33),
            use_zero_pages: Some(!before.use_zero_pages.unwrap_or(false)),
            ..Default::default()
        })
        .unwrap();
        let now = ksm.settings().unwrap();
        assert_eq!(now.pages_to_scan, Some(1234));
        assert_eq!(now.sleep_millisecs, Some(33));
        ksm.tune(&KsmTuning {
            advisor_mode: Some(AdvisorMode::ScanTime),
            advisor_target_scan_time: Some(100),
            ..Default::default()
        })
        .unwrap();
        let err = ksm.tune(&KsmTuning {
            pages_to_scan: Some(10),
            ..Default::default()
        });
        assert!(err.is_err());
        // The kernel's own rejection, mapped with the knob named.
        let err = sysfs::write(ksm.sysfs_root(), "pages_to_scan", "10").unwrap_err();
        assert!(
            matches!(
                err,
                KsmError::Rejected {
                    knob: "pages_to_scan",
                    ..
                }
            ),
            "{err}"
        );
        let err = sysfs::write(ksm.sysfs_root(), "max_page_sharing", "1").unwrap_err();
        assert!(matches!(err, KsmError::Rejected { .. }), "{err}");
    }
    assert_eq!(ksm.settings().unwrap(), before);
}
