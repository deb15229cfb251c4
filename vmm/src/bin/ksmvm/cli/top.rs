//! `ksmvm top`: a live table of every VM's memory and what KSM saves, with
//! the host's KSM totals. `--once` prints one plain-text frame instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table, Wrap};

use ksmvm::ksm::Ksm;
use ksmvm::telemetry::{page_size, HostSample};

use super::fleet::{self, VmEntry};
use super::format::{bytes, opt_bytes, opt_signed, signed_bytes, table};
use super::CliError;

pub const COLUMNS: [&str; 9] = [
    "NAME",
    "PID",
    "STATE",
    "MEMORY",
    "RESIDENT",
    "MERGED",
    "PROFIT",
    "OVERHEAD",
    "EFFECTIVE",
];

/// One screenful, already formatted; shared by the live and the text view.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Host KSM summary line.
    pub host: String,
    pub rows: Vec<Vec<String>>,
    pub total: Vec<String>,
}

#[derive(Default)]
struct Sum(Option<i128>);

impl Sum {
    fn add(&mut self, v: Option<i128>) {
        if let Some(v) = v {
            self.0 = Some(self.0.unwrap_or(0) + v);
        }
    }
    fn show(&self) -> String {
        self.0.map_or_else(|| "-".into(), signed_bytes)
    }
}

pub fn build_frame(entries: &[VmEntry], host: &HostSample, ksmd_percent: Option<f64>) -> Frame {
    let ps = page_size();
    let mut rows = Vec::new();
    let mut sums: [Sum; 6] = Default::default();
    for e in entries {
        let Some((info, stats)) = e.live() else {
            continue; // stale sockets are list's business
        };
        let mem = info.mem_mib << 20;
        let resident = stats.map(|s| s.guest_ram.rss);
        let merged = stats.and_then(|s| fleet::merged_bytes(s, ps));
        let profit = stats.and_then(|s| s.ksm_saved_bytes);
        let overhead = stats.map(|s| s.vmm_overhead_bytes);
        let effective = stats.and_then(|s| s.effective_bytes);
        let vals = [
            Some(mem.into()),
            resident.map(i128::from),
            merged.map(i128::from),
            profit.map(i128::from),
            overhead.map(i128::from),
            effective.map(i128::from),
        ];
        for (s, v) in sums.iter_mut().zip(vals) {
            s.add(v);
        }
        rows.push(vec![
            info.name.clone(),
            info.pid.to_string(),
            info.state.to_string(),
            bytes(mem),
            opt_bytes(resident),
            opt_bytes(merged),
            opt_signed(profit),
            opt_bytes(overhead),
            opt_bytes(effective),
        ]);
    }
    let mut total = vec![
        format!("TOTAL ({})", rows.len()),
        String::new(),
        String::new(),
    ];
    total.extend(sums.iter().map(Sum::show));
    Frame {
        host: host_line(host, ksmd_percent),
        rows,
        total,
    }
}

fn host_line(h: &HostSample, ksmd_percent: Option<f64>) -> String {
    let Some(c) = &h.counters else {
        return "host KSM: unavailable (no /sys/kernel/mm/ksm)".into();
    };
    let num = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
    let run = match h.run {
        Some(ksmvm::ksm::RunMode::Run) => "running",
        Some(ksmvm::ksm::RunMode::Stop) => "stopped",
        Some(ksmvm::ksm::RunMode::Unmerge) => "stopped+unmerged",
        None => "-",
    };
    format!(
        "host KSM {run}: saved {} (pages_sharing {}, pages_shared {}), general_profit {}, ksmd {} CPU, full_scans {}",
        opt_bytes(h.saved_bytes()),
        num(c.pages_sharing),
        num(c.pages_shared),
        opt_signed(c.general_profit),
        ksmd_percent.map_or_else(|| "-".into(), |p| format!("{p:.1}%")),
        num(c.full_scans),
    )
}

pub fn render_text(f: &Frame) -> String {
    let mut rows = f.rows.clone();
    rows.push(f.total.clone());
    format!("{}\n{}", f.host, table(&COLUMNS, &rows))
}

/// Samples everything once; ksmd's CPU is measured over `window`.
fn sample(dir: &Path, window: Duration) -> Result<Frame, CliError> {
    let ksm = Ksm::new();
    let proc_root = Path::new("/proc");
    let t0 = Instant::now();
    let before = HostSample::read(&ksm, proc_root);
    let entries = discover(dir)?;
    if let Some(rest) = window.checked_sub(t0.elapsed()) {
        std::thread::sleep(rest);
    }
    let after = HostSample::read(&ksm, proc_root);
    let pct = after.ksmd_percent_since(&before, t0.elapsed().as_secs_f64());
    Ok(build_frame(&entries, &after, pct))
}

fn discover(dir: &Path) -> Result<Vec<VmEntry>, CliError> {
    fleet::discover(dir, true).map_err(|source| CliError::RuntimeDir {
        path: dir.to_path_buf(),
        source,
    })
}

pub fn run(
    dir: &Path,
    once: bool,
    interval: Duration,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let interval = interval.max(Duration::from_millis(100));
    if once {
        let frame = sample(dir, interval.min(Duration::from_secs(1)))?;
        out.write_all(render_text(&frame).as_bytes())?;
        return Ok(());
    }
    live(dir.to_path_buf(), interval)
}

/// Set by SIGTERM/SIGINT: leave the loop so the terminal is restored (the
/// default action would kill the process with the terminal left raw).
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_hangup(_: libc::c_int) {
    // The terminal is gone, so there is nothing to restore; and crossterm
    // 0.28 would spin reading the dead tty instead of returning. _exit is
    // async-signal-safe.
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(128 + libc::SIGHUP) };
}

fn catch_stop_signals() -> Result<(), CliError> {
    let handlers = [
        (
            Signal::SIGTERM,
            on_stop_signal as extern "C" fn(libc::c_int),
        ),
        (Signal::SIGINT, on_stop_signal),
        (Signal::SIGHUP, on_hangup),
    ];
    for (sig, handler) in handlers {
        let action = SigAction::new(
            SigHandler::Handler(handler),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: both handlers are async-signal-safe (an atomic store,
        // _exit); this CLI process installs no other handler for them.
        unsafe { sigaction(sig, &action) }.map_err(|e| CliError::Io(e.into()))?;
    }
    Ok(())
}

/// Restores the terminal when dropped, on errors and panics too.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Err(e) = ratatui::try_restore() {
            eprintln!("ksmvm: cannot restore the terminal: {e}");
        }
    }
}

fn live(dir: PathBuf, interval: Duration) -> Result<(), CliError> {
    let ksm = Ksm::new();
    let proc_root = Path::new("/proc");
    catch_stop_signals()?;
    // try_init also installs a panic hook that restores the terminal.
    let mut terminal = ratatui::try_init()?;
    let _guard = TerminalGuard;
    let mut prev = (Instant::now(), HostSample::read(&ksm, proc_root));
    loop {
        let entries = discover(&dir)?;
        let now = Instant::now();
        let host = HostSample::read(&ksm, proc_root);
        let pct = host.ksmd_percent_since(&prev.1, (now - prev.0).as_secs_f64());
        let frame = build_frame(&entries, &host, pct);
        prev = (now, host);
        terminal.draw(|f| draw(f, &frame, &dir, interval))?;
        let deadline = Instant::now() + interval;
        loop {
            if STOP.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Short polls, so a SIGTERM is noticed soon.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if left.is_zero() {
                break;
            }
            if !event::poll(left)? {
                continue;
            }
            if let Event::Key(k) = event::read()? {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press
                    && (ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc))
                {
                    return Ok(());
                }
            }
        }
    }
}

fn draw(f: &mut ratatui::Frame, frame: &Frame, dir: &Path, interval: Duration) {
    let [head, body] =
        Layout::vertical([Constraint::Length(4), Constraint::Min(3)]).areas(f.area());
    let title = format!(
        " ksmvm top: {} VM(s) in {}, every {} ms, q to quit ",
        frame.rows.len(),
        dir.display(),
        interval.as_millis()
    );
    f.render_widget(
        Paragraph::new(frame.host.as_str())
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(title)),
        head,
    );
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut rows: Vec<Row> = frame.rows.iter().map(|r| Row::new(r.clone())).collect();
    rows.push(Row::new(frame.total.clone()).style(bold));
    let name_width = frame
        .rows
        .iter()
        .chain([&frame.total])
        .map(|r| r[0].chars().count())
        .max()
        .unwrap_or(0)
        .max(COLUMNS[0].len());
    let name_width = u16::try_from(name_width).unwrap_or(u16::MAX);
    let widths = [
        Constraint::Length(name_width),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(10),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(Row::new(COLUMNS).style(bold))
            .block(Block::bordered()),
        body,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::fleet::VmStatus;
    use ksmvm::api::{OnOff, VmInfo, VmState};
    use ksmvm::stats::{GuestRamStats, VmStats};

    #[test]
    fn frame_sums_live_vms_and_skips_dead_ones() {
        let live = |name: &str, rss: u64| VmEntry {
            name: name.into(),
            socket: PathBuf::from("/x"),
            status: VmStatus::Live {
                info: VmInfo {
                    name: name.into(),
                    state: VmState::Running,
                    pid: 9,
                    vcpus: 1,
                    mem_mib: 64,
                    kernel: "/k".into(),
                    uptime_s: 1.0,
                    ksm: OnOff::On,
                },
                stats: Ok(Box::new(VmStats {
                    guest_ram: GuestRamStats {
                        rss,
                        ksm: Some(rss / 2),
                        ..Default::default()
                    },
                    ksm_saved_bytes: Some(-4096),
                    ..Default::default()
                })),
            },
        };
        let dead = VmEntry {
            name: "d".into(),
            socket: PathBuf::from("/y"),
            status: VmStatus::Dead { error: "x".into() },
        };
        let f = build_frame(
            &[live("a", 1 << 20), dead, live("b", 3 << 20)],
            &HostSample::default(),
            None,
        );
        assert_eq!(f.rows.len(), 2);
        assert_eq!(f.rows[0][4], "1.0M");
        assert_eq!(f.total[0], "TOTAL (2)");
        assert_eq!(f.total[3], "128.0M");
        assert_eq!(f.total[4], "4.0M");
        assert_eq!(f.total[5], "2.0M");
        assert_eq!(f.total[6], "-8.0K");
        assert_eq!(f.total[8], "-");
        let text = render_text(&f);
        assert!(text.starts_with("host KSM: unavailable"));
        assert!(text.contains("\nNAME "));
    }
}
