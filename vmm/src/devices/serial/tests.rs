//! The UART with its host input, and the output bounds (rate limit,
//! marked lines, rotation).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::output::{MarkedLines, RateLimited, RotatingFile, DROP_REPORT_INTERVAL};
use super::*;
use crate::config::{SerialLimits, SerialSink};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn output_reaches_sink_and_input_survives_a_full_fifo() {
    let sink = Sink::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut dev = SerialDevice::new(
        irq.try_clone().unwrap(),
        Box::new(sink.clone()),
        Arc::default(),
    );
    for b in b"hi\n" {
        dev.write(0, &[*b]);
    }
    assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");

    let input: Vec<u8> = (0..200u8).collect();
    dev.write(1, &[1]); // IER: received-data interrupt
    dev.queue_input(&input);
    assert!(irq.read().unwrap() >= 1);
    let mut got = Vec::new();
    let mut lsr = [0u8];
    loop {
        dev.read(5, &mut lsr);
        if lsr[0] & 1 == 0 {
            break;
        }
        let mut b = [0u8];
        dev.read(0, &mut b);
        got.push(b[0]);
    }
    assert_eq!(got, input);
}

/// Every write the sink got, separately.
#[derive(Clone, Default)]
struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
impl Write for Writes {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().push(b.to_vec());
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Writes {
    fn all(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
}

fn limits(rate: u64, burst: u64) -> SerialLimits {
    SerialLimits {
        rate_bytes_s: rate,
        burst_bytes: burst,
        file_max_bytes: 0,
    }
}

#[test]
fn rate_limit_drops_counts_and_reports_at_most_every_interval() {
    let sink = Sink::default();
    let stats = Arc::new(SerialStats::default());
    let t0 = Instant::now();
    let mut out = RateLimited::new_at(
        Box::new(sink.clone()),
        limits(1024, 2048),
        stats.clone(),
        t0,
    );
    // The UART writes a byte at a time; the guest never sees a short write.
    for _ in 0..4096 {
        assert_eq!(out.write_at(b"x", t0).unwrap(), 1);
    }
    assert_eq!(sink.0.lock().unwrap().len(), 2048);
    assert_eq!(stats.written_bytes(), 2048);
    assert_eq!(stats.dropped_bytes(), 2048);
    // Dropping was reported when it started; the count waits for the
    // interval to pass.
    assert_eq!(out.count(0, t0), None);
    let later = t0 + DROP_REPORT_INTERVAL;
    let msg = out.count(0, later).unwrap();
    assert_eq!(
        msg,
        "serial: dropped 2048 bytes of guest output over its limit (1 KiB/s, burst 2 KiB) \
         in the last 10.0 s; 2048 in all"
    );
    assert_eq!(out.count(0, later), None, "nothing new to report");
    // After a pause the bucket is full again.
    assert_eq!(out.write_at(&[b'y'; 100], later).unwrap(), 100);
    assert_eq!(stats.dropped_bytes(), 2048);
    assert_eq!(stats.written_bytes(), 2148);
}

#[test]
fn rate_zero_is_no_limit() {
    let sink = Sink::default();
    let stats = Arc::new(SerialStats::default());
    let mut out = RateLimited::new(Box::new(sink.clone()), limits(0, 0), stats.clone());
    out.write_all(&[b'z'; 1 << 20]).unwrap();
    assert_eq!(stats.written_bytes(), 1 << 20);
    assert_eq!(stats.dropped_bytes(), 0);
}

#[test]
fn guest_lines_are_marked_one_write_each_and_cannot_forge_priorities() {
    let w = Writes::default();
    let mut m = MarkedLines::new(w.clone());
    m.write_all(b"PROBE BOOT version=1\r\n<3>forged error\nksmvm: error: forged\0<4>after a NUL\n")
        .unwrap();
    m.write_all(b"no end yet").unwrap();
    m.flush().unwrap();
    let lines: Vec<String> = w
        .all()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(
        lines,
        [
            "guest: PROBE BOOT version=1\n",
            "guest: <3>forged error\n",
            "guest: ksmvm: error: forged\n",
            "guest: <4>after a NUL\n",
        ],
        "a line not yet ended is held back, also by a flush"
    );
    drop(m);
    assert_eq!(w.all().last().unwrap(), b"guest: no end yet\n");
}

#[test]
fn a_long_guest_line_is_cut_into_marked_writes_of_at_most_pipe_buf() {
    let w = Writes::default();
    let mut m = MarkedLines::new(w.clone());
    let mut line = vec![b'a'; 10_000];
    line.push(b'\n');
    m.write_all(&line).unwrap();
    m.write_all(b"\n").unwrap();
    let writes = w.all();
    let sizes: Vec<usize> = writes.iter().map(Vec::len).collect();
    assert_eq!(sizes, [4096, 4096, 7 + (10_000 - 2 * MAX_LINE) + 1, 8]);
    for l in &writes {
        assert!(l.starts_with(GUEST_LINE_PREFIX) && l.ends_with(b"\n"));
    }
    assert_eq!(writes[3], b"guest: \n", "an empty guest line stays a line");
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ksmvm-serial-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_file_sink_rotates_at_its_cap() {
    let dir = tmp("rotate");
    let path = dir.join("serial.log");
    let old = rotated_path(&path);
    assert_eq!(old, dir.join("serial.log.1"));
    let stats = Arc::new(SerialStats::default());
    let mut f = RotatingFile::open(&path, 100, stats.clone()).unwrap();
    let data: Vec<u8> = (0..250u32)
        .map(|i| b'a' + u8::try_from(i % 26).unwrap())
        .collect();
    f.write_all(&data).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), &data[200..]);
    assert_eq!(std::fs::read(&old).unwrap(), &data[100..200]);
    assert_eq!(stats.rotations(), 2);
    drop(f);
    // Reopened, the file goes on where it was and rotates when full.
    let mut f = RotatingFile::open(&path, 100, stats.clone()).unwrap();
    f.write_all(&[b'!'; 60]).unwrap();
    assert_eq!(std::fs::read(&old).unwrap().len(), 100);
    assert_eq!(std::fs::read(&old).unwrap()[..50], data[200..]);
    assert_eq!(std::fs::read(&path).unwrap(), [b'!'; 10]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_that_cannot_be_rotated_is_truncated_not_grown() {
    let dir = tmp("norotate");
    let path = dir.join("serial.log");
    // PATH.1 is a directory with something in it: rename(2) fails.
    std::fs::create_dir_all(rotated_path(&path).join("x")).unwrap();
    let stats = Arc::new(SerialStats::default());
    let mut f = RotatingFile::open(&path, 100, stats.clone()).unwrap();
    f.write_all(&[b'1'; 100]).unwrap();
    f.write_all(&[b'2'; 30]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), [b'2'; 30]);
    assert_eq!(stats.rotations(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_cap_means_no_rotation() {
    let dir = tmp("nocap");
    let path = dir.join("serial.log");
    let mut f = RotatingFile::open(&path, 0, Arc::default()).unwrap();
    f.write_all(&[b'x'; 5000]).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 5000);
    assert!(!rotated_path(&path).exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn open_file_sink_with_bounds_and_stdout_marking_rule() {
    let dir = tmp("open");
    let path = dir.join("g.log");
    let l = SerialLimits {
        rate_bytes_s: 1024,
        burst_bytes: 1024,
        file_max_bytes: 512,
    };
    let (mut out, stats) = open_output(&SerialSink::File(path.clone()), l).unwrap();
    for _ in 0..2000 {
        out.write_all(b"q").unwrap();
    }
    drop(out);
    assert!(stats.dropped_bytes() >= 2000 - 1024 - 100, "{stats:?}");
    assert_eq!(stats.written_bytes() + stats.dropped_bytes(), 2000);
    assert!(std::fs::metadata(&path).unwrap().len() <= 512);
    assert_eq!(stats.rotations(), (stats.written_bytes() - 1) / 512);
    let (mut none, _) = open_output(&SerialSink::None, l).unwrap();
    none.write_all(b"gone").unwrap();

    // Raw on a terminal, marked on anything else.
    let pty = nix::pty::openpty(None, None).unwrap();
    assert!(!marks_stdout(&pty.slave));
    let (r, w) = nix::unistd::pipe().unwrap();
    assert!(marks_stdout(&w) && marks_stdout(&r));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_device_shares_its_output_counters() {
    let stats = Arc::new(SerialStats::default());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let out = RateLimited::new(Box::new(Sink::default()), limits(1, 1), stats.clone());
    let mut dev = SerialDevice::new(irq, Box::new(out), stats);
    let seen = dev.stats();
    for b in b"abc" {
        dev.write(0, &[*b]);
    }
    assert_eq!((seen.written_bytes(), seen.dropped_bytes()), (1, 2));
}

#[test]
fn dropping_is_reported_when_it_starts_then_counted_per_interval() {
    let stats = Arc::new(SerialStats::default());
    let t0 = Instant::now();
    let mut out = RateLimited::new_at(Box::new(Sink::default()), limits(1024, 1024), stats, t0);
    let start = out.count(5, t0).unwrap();
    assert_eq!(
        start,
        "serial: guest output is over its limit (1 KiB/s, burst 1 KiB); the excess is dropped \
         (counted here every 10 s at most)"
    );
    let s = Duration::from_secs(1);
    assert_eq!(out.count(7, t0 + s), None);
    assert!(out
        .count(1, t0 + 10 * s)
        .unwrap()
        .starts_with("serial: dropped 13 bytes of guest output"));
    // The guest goes quiet, then floods again: a new start, counted anew.
    assert_eq!(out.count(0, t0 + 15 * s), None);
    assert!(out
        .count(2, t0 + 30 * s)
        .unwrap()
        .contains("is over its limit"));
    assert!(out
        .count(0, t0 + 40 * s)
        .unwrap()
        .starts_with("serial: dropped 2 bytes"));
}
