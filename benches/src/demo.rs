//! `ksmvm-bench demo`: a few probe guests with the same memory profile,
//! KSM merges them, and a table shows what each VM costs.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ksmvm::stats::ApproxF64;
use ksmvm_testkit::RuntimeDir;

use crate::common::{bar, spinner, VmmArgs};
use crate::fleet::Fleet;
use crate::guest::GuestSpec;
use crate::host::{mib, preflight, MemInfo, Needs, MIB, PAGE_SIZE};
use crate::ksm_session::{fast_tuning, KsmSession, FAST_PAGES_TO_SCAN, FAST_SLEEP_MILLISECS};
use crate::monitor::Monitor;

use crate::table::{f1, opt1, Table};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,
    /// Memory profile of the guests (see benches/profiles.toml).
    #[arg(long, default_value = "demo")]
    pub profile: String,
    /// Number of guests.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=64))]
    pub guests: u64,
    /// Give up waiting for KSM to converge after this many seconds.
    #[arg(long, default_value_t = 45)]
    pub timeout_s: u64,
    /// Keep the guests running this many seconds after the table (to
    /// inspect them); Ctrl-C ends the wait.
    #[arg(long, default_value_t = 0)]
    pub hold_s: u64,
}

/// Memory left free for the rest of the host, bytes.
const HEADROOM: u64 = 1 << 30;

pub fn run(args: DemoArgs) -> Result<()> {
    let vmm = &args.vmm;
    preflight(
        Needs {
            kvm: true,
            ksm_control: true,
        },
        &vmm.ksmvm,
        &vmm.probe,
    )?;
    let profiles = vmm.profiles()?;
    let profile = profiles.get(&args.profile)?.clone();
    let n = args.guests;
    let need = n * profile.footprint_bytes() + HEADROOM;
    let avail = MemInfo::read()?.available;
    if need > avail {
        bail!(
            "{n} guests of profile {} need about {:.0} MiB, but MemAvailable is {:.0} MiB",
            profile.name,
            mib(need),
            mib(avail)
        );
    }
    println!(
        "ksmvm KSM density demo: {n} probe guests of {} MiB (profile {}: {}; shared is identical \
         in every guest)",
        profile.mem_mib,
        profile.name,
        profile.split_text()
    );

    // Dropped in reverse order: guests stop first, then KSM is restored,
    // then the lock is released.
    let mut session = KsmSession::begin(vmm.assume_host_lock)?;
    let runtime = RuntimeDir::create("bench-demo")?;
    let launcher = vmm.launcher(&runtime)?;
    let mut monitor = Monitor::new(session.ksm().clone())?;
    let mut fleet = Fleet::new();

    let specs: Vec<GuestSpec> = (1..=n)
        .map(|i| GuestSpec::probe(format!("demo-{i}"), &profile, i, true))
        .collect();
    let b = bar(n, "booting guests, waiting for PROBE READY");
    let t_boot = Instant::now();
    fleet.start_all(
        &launcher,
        &specs,
        Duration::ZERO,
        Duration::from_secs(60),
        &b,
    )?;
    b.finish_and_clear();
    println!(
        "all {n} guests READY in {:.2} s (pids {})",
        t_boot.elapsed().as_secs_f64(),
        fleet
            .guests()
            .iter()
            .map(|g| g.pid().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let before_used = monitor.sample(&fleet, false)?.host_used_mib;

    session.tune(&fast_tuning())?;
    println!(
        "KSM on: pages_to_scan={FAST_PAGES_TO_SCAN} sleep_millisecs={FAST_SLEEP_MILLISECS} \
         (saved settings are restored at exit)"
    );
    monitor.phase = "ksm-on".into();
    let s = spinner("waiting for KSM to converge");
    let converged = monitor.wait_converged(
        &mut fleet,
        Duration::from_millis(250),
        Duration::from_secs(args.timeout_s),
        false,
        &s,
    )?;
    s.finish_and_clear();
    let host = monitor.sample(&fleet, false)?;
    let vms = monitor.vm_stats(&fleet)?;

    // The merged pages are copy-on-write: every guest still reads its own content.
    for g in fleet.guests_mut() {
        g.send("verify")?;
    }
    let mut verified = true;
    for g in fleet.guests_mut() {
        let line = g.wait_for("PROBE VERIFY", Duration::from_secs(30))?;
        verified &= line.text.contains("result=ok");
    }

    let mut t = Table::new([
        "VM",
        "pid",
        "RAM",
        "resident",
        "merged",
        "merged %",
        "effective",
        "KSM profit",
        "VMM overhead",
    ]);
    for (name, pid, st) in &vms {
        t.row([
            name.clone(),
            pid.to_string(),
            format!("{}", st.guest_ram_bytes / MIB),
            f1(mib(st.guest_ram.rss)),
            opt1(st.guest_ram.ksm.map(mib)),
            opt1(st.merged_fraction.map(|f| 100.0 * f)),
            opt1(st.effective_bytes.map(mib)),
            opt1(st.ksm.ksm_process_profit.map(crate::host::mib_i)),
            f1(mib(st.vmm_overhead_bytes)),
        ]);
    }
    println!("\nPer VM (MiB; resident = guest RAM Rss, merged = its pages backed by KSM pages,");
    println!("effective = Pss + KSM metadata: what the VM really costs the host):");
    print!("{}", t.render());

    let ideal = profile.ideal_pages_sharing(n) * PAGE_SIZE;
    // Per VM, Rss - Pss is what sharing saves it; other processes on the
    // host do not move this sum, unlike the host-wide counters.
    let shared: u64 = vms
        .iter()
        .map(|v| v.2.guest_ram.rss.saturating_sub(v.2.guest_ram.pss))
        .sum();
    let metadata: Option<u64> = vms.iter().map(|v| v.2.ksm_metadata_bytes).sum();
    println!("\nHost:");
    println!(
        "  KSM saved        {:.1} MiB for these guests (sum of Rss - Pss); ideal {:.1} MiB ({:.0} % reached); \
         KSM metadata {} MiB",
        mib(shared),
        mib(ideal),
        100.0 * shared.approx_f64() / ideal.max(1).approx_f64(),
        opt1(metadata.map(mib))
    );
    println!(
        "  KSM counters     pages_sharing {:+}, pages_shared {:+} since the start ({:.1} MiB; host-wide)",
        host.pages_sharing, host.pages_shared, host.saved_mib
    );
    let resident: u64 = vms.iter().map(|v| v.2.guest_ram.rss).sum();
    let effective: Option<u64> = vms.iter().map(|v| v.2.effective_bytes).sum();
    let overhead: u64 = vms.iter().map(|v| v.2.vmm_overhead_bytes).sum();
    println!(
        "  guest RAM        {:.1} MiB resident, {} MiB effective (ideal: {:.0} without KSM, {:.0} with); \
         VMM overhead {:.1} MiB in all",
        mib(resident),
        opt1(effective.map(mib)),
        mib(profile.ideal_without_ksm(n)),
        mib(profile.ideal_with_ksm(n)),
        mib(overhead)
    );
    println!(
        "  host memory      {:+.1} MiB used since the start before merging, {:+.1} MiB after \
         (MemAvailable; other processes count too)",
        before_used, host.host_used_mib
    );
    match converged {
        Some(secs) => println!(
            "  convergence      {secs:.1} s after enabling KSM ({} full scans since the guests were READY)",
            host.full_scans
                - monitor
                    .host
                    .first()
                    .map_or(host.full_scans, |h| h.full_scans)
        ),
        None => println!(
            "  convergence      not reached within {} s (figures above are partial)",
            args.timeout_s
        ),
    }
    println!(
        "  guest content    {} after merging (PROBE VERIFY in every guest)",
        if verified { "intact" } else { "MISMATCH" }
    );

    if args.hold_s > 0 {
        println!(
            "\nholding the guests for {} s (Ctrl-C stops them)",
            args.hold_s
        );
        crate::cancel::sleep(Duration::from_secs(args.hold_s))?;
    }
    let killed = fleet.stop_all();
    println!(
        "\nguests stopped{}",
        if killed > 0 {
            format!(" ({killed} killed)")
        } else {
            String::new()
        }
    );
    session.restore()?;
    println!("host KSM settings restored");
    if !verified {
        bail!("a guest's memory did not verify after merging");
    }
    if converged.is_none() {
        return Err(anyhow::anyhow!(
            "KSM did not converge within {} s",
            args.timeout_s
        ))
        .context("try --timeout-s with a larger value on a busy host");
    }
    Ok(())
}
