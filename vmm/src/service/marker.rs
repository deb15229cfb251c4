//! Watches the guest's serial output for the ready marker on its way to
//! the configured sink, and signals an eventfd at the end of the first line
//! that contains it. Waiting for the line's end keeps the VMM's "ready" log
//! line from landing in the middle of the guest's line when both go to the
//! same journal stream.

use std::io::Write;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialOut;

pub struct MarkerWatch {
    inner: SerialOut,
    marker: Vec<u8>,
    /// The last `marker.len()` bytes seen: the marker may arrive one byte
    /// per write (the UART writes byte by byte).
    tail: Vec<u8>,
    /// The marker appeared; the signal goes out at the end of its line.
    matched: bool,
    seen: bool,
    evt: EventFd,
}

impl std::fmt::Debug for MarkerWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkerWatch")
            .field("marker", &String::from_utf8_lossy(&self.marker))
            .finish_non_exhaustive()
    }
}

impl MarkerWatch {
    pub fn new(inner: SerialOut, marker: &str, evt: EventFd) -> Self {
        Self {
            inner,
            marker: marker.as_bytes().to_vec(),
            tail: Vec::with_capacity(marker.len() * 2),
            matched: false,
            seen: marker.is_empty(),
            evt,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.seen {
                return;
            }
            if !self.matched {
                self.tail.push(b);
                if self.tail.len() > self.marker.len() {
                    self.tail.remove(0);
                }
                self.matched = self.tail == self.marker;
            }
            if self.matched && (b == b'\n' || self.marker.ends_with(b"\n")) {
                self.seen = true;
                if let Err(e) = self.evt.write(1) {
                    log::error!("cannot signal that the guest is ready: {e}");
                }
            }
        }
    }
}

impl Write for MarkerWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Scan only what the sink took, so a retried partial write is not
        // scanned twice; a failing sink still lets the marker through.
        match self.inner.write(buf) {
            Ok(n) => {
                self.scan(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                self.scan(buf);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_on_a_marker_split_across_writes() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut w = MarkerWatch::new(
            Box::new(std::io::sink()),
            "PROBE READY",
            evt.try_clone().unwrap(),
        );
        for b in b"PROBE CMDLINE x\nPROBE REA" {
            w.write_all(&[*b]).unwrap();
        }
        assert!(evt.read().is_err(), "no marker yet");
        w.write_all(b"DY").unwrap();
        assert!(evt.read().is_err(), "not before the end of the line");
        w.write_all(b" now\nPROBE READY\n").unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        assert!(evt.read().is_err(), "signalled once only");
    }

    #[test]
    fn passes_output_through() {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut w = MarkerWatch::new(Box::new(sink.clone()), "UP", evt);
        w.write_all(b"hello UP\n").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello UP\n");
    }
}
