//! What /proc says about a VMM from outside: its KSM counters, the smaps
//! block of its guest RAM, and the CPU time of its threads.

use std::io;

use ksmvm::stats::ApproxF64;

/// A field of /proc/PID/ksm_stat, read from outside the VMM (signed:
/// ksm_process_profit may be negative).
///
/// # Panics
/// When the file or the field is missing.
pub fn proc_ksm_stat(pid: u32, key: &str) -> i64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ksm_stat: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/ksm_stat: {text}"))
}

/// A page count of /proc/PID/ksm_stat (ksm_merging_pages, ksm_rmap_items).
///
/// # Panics
/// As [`proc_ksm_stat`], and when the count is negative.
pub fn proc_ksm_count(pid: u32, key: &str) -> u64 {
    let v = proc_ksm_stat(pid, key);
    u64::try_from(v).unwrap_or_else(|_| panic!("{key} of {pid} is negative: {v}"))
}

/// The smaps block (header line first) of the guest RAM mapping of `pid`:
/// the only `mem_mib`-sized private read-write mapping of a VMM whose RAM
/// lies below the 32-bit MMIO gap.
///
/// # Panics
/// When smaps cannot be read or has not exactly one such mapping.
pub fn guest_ram_smaps(pid: u32, mem_mib: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let size = mem_mib << 20;
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut in_ram = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let range = words.next().unwrap_or("").split_once('-');
        let perms = words.next().unwrap_or("");
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_ram = b - a == size && perms == "rw-p";
                if in_ram {
                    blocks.push(Vec::new());
                }
            }
        }
        if in_ram {
            if let Some(b) = blocks.last_mut() {
                b.push(line.to_owned());
            }
        }
    }
    assert_eq!(
        blocks.len(),
        1,
        "expected one {mem_mib} MiB guest RAM mapping in /proc/{pid}/smaps"
    );
    blocks.remove(0)
}

/// The VmFlags of the guest RAM mapping (see [`guest_ram_smaps`]).
///
/// # Panics
/// As [`guest_ram_smaps`], and without a VmFlags line.
pub fn guest_ram_vmflags(pid: u32, mem_mib: u64) -> Vec<String> {
    guest_ram_smaps(pid, mem_mib)
        .iter()
        .find_map(|l| l.strip_prefix("VmFlags:"))
        .expect("VmFlags line")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A `Name:   N kB` field of the guest RAM mapping, in bytes; None if absent.
pub fn guest_ram_field(pid: u32, mem_mib: u64, name: &str) -> Option<u64> {
    guest_ram_smaps(pid, mem_mib).iter().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(':')?;
        v.trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    })
}

/// The id of the thread of `pid` named `comm` (/proc/PID/task/*/comm).
pub fn thread_by_name(pid: u32, comm: &str) -> io::Result<u32> {
    let dir = format!("/proc/{pid}/task");
    let annotate = |e: io::Error| io::Error::new(e.kind(), format!("{dir}: {e}"));
    for e in std::fs::read_dir(&dir).map_err(annotate)? {
        let e = e.map_err(annotate)?;
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if name.trim_end() == comm {
            return e.file_name().to_string_lossy().parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad tid in {dir}"))
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no thread named {comm} in {dir}"),
    ))
}

/// CPU time of one thread so far.
#[derive(Clone, Copy, Debug)]
pub struct ThreadCpu {
    /// utime + stime, seconds (clock-tick resolution).
    pub ticks_s: f64,
    /// Time on CPU from schedstat, seconds (ns resolution), if available.
    pub sched_s: Option<f64>,
}

impl ThreadCpu {
    /// Thread `tid` of process `pid`, from /proc/PID/task/TID/stat and
    /// schedstat.
    pub fn read(pid: u32, tid: u32) -> io::Result<ThreadCpu> {
        let path = format!("/proc/{pid}/task/{tid}/stat");
        let bad =
            |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {what}"));
        let stat = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
        // Fields after the parenthesised comm (which may hold spaces).
        let rest = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..))
            .ok_or_else(|| bad("no comm"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state): utime is field 14, stime field 15.
        let tick = |i: usize, what: &str| -> io::Result<u64> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(what))
        };
        let (utime, stime) = (tick(11, "utime")?, tick(12, "stime")?);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.approx_f64();
        let sched_s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .map(|ns| ns.approx_f64() / 1e9);
        Ok(ThreadCpu {
            ticks_s: (utime + stime).approx_f64() / hz,
            sched_s,
        })
    }

    /// The CPU time from `self` to `later`: (ticks, schedstat if both have it).
    pub fn until(self, later: ThreadCpu) -> (f64, Option<f64>) {
        (
            later.ticks_s - self.ticks_s,
            self.sched_s.zip(later.sched_s).map(|(a, b)| b - a),
        )
    }
}

/// The fields of /proc/PID[/task/TID]/stat after the parenthesised comm
/// (which may hold spaces): `fields[0]` is field 3 (state).
fn stat_fields(path: &str) -> io::Result<Vec<String>> {
    let stat = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no comm")))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a /proc stat file, in seconds (clock ticks).
fn stat_cpu_s(path: &str) -> io::Result<f64> {
    let f = stat_fields(path)?;
    let tick = |i: usize| -> io::Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: field {i}")))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.approx_f64();
    Ok((tick(11)? + tick(12)?).approx_f64() / hz)
}

/// CPU time (utime + stime, seconds) of the whole process `pid`, threads
/// that already exited included.
pub fn process_cpu_s(pid: u32) -> io::Result<f64> {
    stat_cpu_s(&format!("/proc/{pid}/stat"))
}

/// The threads of `pid`: (tid, comm).
pub fn threads(pid: u32) -> io::Result<Vec<(u32, String)>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("{dir}: {e}")))? {
        let e = e?;
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread that ended meanwhile has no comm any more.
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            out.push((tid, comm.trim_end().to_owned()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A snapshot of a process's CPU time, split into the threads a caller
/// counts and the ones it leaves out (a VMM's vCPU threads: the guest's
/// own CPU), for the host-side cost of what a guest makes the VMM do.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub at: std::time::Instant,
    /// The whole process, exited threads included.
    pub process_s: f64,
    /// The threads left out, summed.
    pub excluded_s: f64,
}

impl CpuSample {
    /// Samples `pid`, leaving out the threads whose comm `exclude` accepts.
    pub fn take(pid: u32, exclude: impl Fn(&str) -> bool) -> io::Result<CpuSample> {
        let at = std::time::Instant::now();
        let mut excluded_s = 0.0;
        for (tid, comm) in threads(pid)? {
            if exclude(&comm) {
                excluded_s += stat_cpu_s(&format!("/proc/{pid}/task/{tid}/stat")).unwrap_or(0.0);
            }
        }
        Ok(CpuSample {
            at,
            process_s: process_cpu_s(pid)?,
            excluded_s,
        })
    }

    /// Samples a ksmvm VMM without its vCPU threads (`vcpuN`).
    pub fn vmm(pid: u32) -> io::Result<CpuSample> {
        CpuSample::take(pid, |comm| comm.starts_with("vcpu"))
    }

    /// The counted threads' CPU time since `earlier` as a share of one
    /// core (1.0: one core busy all the time). Excluded threads must live
    /// through both samples (vCPUs do).
    pub fn share_since(&self, earlier: &CpuSample) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        let cpu = (self.process_s - self.excluded_s) - (earlier.process_s - earlier.excluded_s);
        if wall > 0.0 {
            cpu / wall
        } else {
            0.0
        }
    }
}

/// Open file descriptors of `pid` (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Threads of `pid` (entries of /proc/PID/task).
pub fn thread_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// Resident set size of `pid` in bytes (VmRSS of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no VmRSS")))
}

/// The processes whose parent is `pid` (/proc/*/stat), with their comm.
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let path = format!("/proc/{child}/stat");
        let Ok(f) = stat_fields(&path) else { continue };
        // Field 4 (ppid) is fields[1].
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            out.push((child, comm.trim_end().to_owned()));
        }
    }
    out.sort_unstable();
    out
}
