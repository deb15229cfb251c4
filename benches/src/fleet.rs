//! The guests of one run. Dropping the fleet stops them all: a polite
//! `poweroff` first, SIGKILL for any still running after a grace period.

use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::ProgressBar;

use crate::cancel;
use crate::guest::{Guest, GuestSpec, Launcher};

/// How long guests get to power off before they are killed.
const GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct Fleet {
    guests: Vec<Guest>,
}

impl Fleet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.guests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.guests.is_empty()
    }

    pub fn guests(&self) -> &[Guest] {
        &self.guests
    }

    pub fn guests_mut(&mut self) -> &mut [Guest] {
        &mut self.guests
    }

    /// Starts one guest (not waiting for it) and adopts it.
    pub fn spawn(&mut self, launcher: &Launcher, spec: &GuestSpec) -> Result<&mut Guest> {
        cancel::check()?;
        let g = Guest::spawn(launcher, spec)?;
        self.guests.push(g);
        let last = self.guests.len() - 1;
        Ok(&mut self.guests[last])
    }

    /// Starts guests `specs`, `stagger` apart, then waits until each is READY.
    pub fn start_all(
        &mut self,
        launcher: &Launcher,
        specs: &[GuestSpec],
        stagger: Duration,
        ready_timeout: Duration,
        bar: &ProgressBar,
    ) -> Result<()> {
        let first = self.guests.len();
        for (i, spec) in specs.iter().enumerate() {
            if i > 0 {
                cancel::sleep(stagger)?;
            }
            self.spawn(launcher, spec)?;
        }
        for g in &mut self.guests[first..] {
            g.wait_ready(ready_timeout)?;
            bar.inc(1);
        }
        Ok(())
    }

    /// Fails if any guest has exited (crashed) while it should be idling.
    pub fn check_alive(&mut self) -> Result<()> {
        for g in &mut self.guests {
            if g.has_exited() {
                anyhow::bail!(
                    "{} (pid {}) exited unexpectedly{}",
                    g.name,
                    g.pid(),
                    g.context()
                );
            }
        }
        Ok(())
    }

    /// Stops the newest guest.
    pub fn stop_last(&mut self) {
        if let Some(mut g) = self.guests.pop() {
            stop_guests(std::slice::from_mut(&mut g), GRACE);
        }
    }

    /// Powers every guest off (SIGKILL after the grace period); returns how
    /// many had to be killed.
    pub fn stop_all(&mut self) -> usize {
        let killed = stop_guests(&mut self.guests, GRACE);
        self.guests.clear();
        killed
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop_guests(guests: &mut [Guest], grace: Duration) -> usize {
    for g in guests.iter_mut() {
        g.request_poweroff();
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !guests.iter_mut().all(|g| g.has_exited()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut killed = 0;
    for g in guests.iter_mut() {
        if !g.has_exited() {
            g.kill();
            killed += 1;
        }
    }
    killed
}
