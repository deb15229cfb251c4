//! A minimal i8042 keyboard controller: enough for Linux's `reboot=k` (the
//! CPU reset command) and for the VMM to send Ctrl-Alt-Del, which asks a
//! guest to shut down cleanly.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Port offsets from 0x60.
const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_RESET_CPU: u8 = 0xfe;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const BUF_SIZE: usize = 16;

/// Scancode set 2: Ctrl, Alt, Del pressed then released.
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x14, 0xf0, 0x11,
];

#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    kbd_irq: EventFd,
    status: u8,
    control: u8,
    outp: u8,
    cmd: u8,
    buf: VecDeque<u8>,
}

impl I8042 {
    pub fn new(reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        Self {
            reset_evt,
            kbd_irq,
            status: SB_KBD_ENABLED,
            control: CTR_KBD_INT,
            outp: 0,
            cmd: 0,
            buf: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8) {
        if self.buf.len() < BUF_SIZE {
            self.buf.push_back(byte);
        }
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn raise_irq(&self) {
        if self.control & CTR_KBD_INT != 0 {
            if let Err(e) = self.kbd_irq.write(1) {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Queues the Ctrl-Alt-Del key sequence: Linux maps it to ctrl_alt_del(),
    /// which makes init shut the system down.
    pub fn send_ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.raise_irq();
    }

    /// Bytes the guest has not read yet.
    pub fn unread(&self) -> usize {
        self.buf.len()
    }

    /// Raises IRQ 1 again while bytes wait: a guest that missed the edge
    /// (its handler reads one byte per interrupt) would otherwise never
    /// see the rest. Harmless to one that did not: it finds them.
    pub fn nudge(&self) -> bool {
        if self.buf.is_empty() {
            return false;
        }
        self.raise_irq();
        true
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFS_STATUS => self.status,
            OFS_DATA => {
                let b = self.buf.pop_front().unwrap_or(0);
                if self.buf.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                } else {
                    self.raise_irq();
                }
                b
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let v = data[0];
        match (offset, v) {
            (OFS_STATUS, CMD_RESET_CPU) => {
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("i8042: cannot signal reset: {e}");
                }
            }
            (OFS_STATUS, CMD_READ_CTR) => {
                self.push(self.control);
            }
            (OFS_STATUS, CMD_READ_OUTP) => {
                self.push(self.outp);
            }
            (OFS_STATUS, CMD_SELF_TEST) => self.push(0x55),
            (OFS_STATUS, CMD_KBD_TEST) => self.push(0x00),
            (OFS_STATUS, CMD_KBD_DISABLE) => self.status &= !SB_KBD_ENABLED,
            (OFS_STATUS, CMD_KBD_ENABLE) => self.status |= SB_KBD_ENABLED,
            (OFS_STATUS, c) => {
                // Commands with a data byte remember themselves until it comes.
                self.cmd = c;
                self.status |= SB_I8042_CMD_DATA;
            }
            (OFS_DATA, _) if self.status & SB_I8042_CMD_DATA != 0 => {
                match self.cmd {
                    CMD_WRITE_CTR => self.control = v,
                    CMD_WRITE_OUTP => self.outp = v,
                    _ => {}
                }
                self.status &= !SB_I8042_CMD_DATA;
            }
            (OFS_DATA, 0xff) => {
                // Keyboard reset.
                self.push(KBD_ACK);
                self.push(KBD_RESET_OK);
                self.raise_irq();
            }
            (OFS_DATA, _) => {
                // Any other keyboard command is acknowledged.
                self.push(KBD_ACK);
                self.raise_irq();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (
            I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap()),
            reset,
            irq,
        )
    }

    #[test]
    fn reset_command_signals_the_vmm() {
        let (mut d, reset, _) = dev();
        d.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_is_readable_with_irq() {
        let (mut d, _, irq) = dev();
        d.send_ctrl_alt_del();
        assert!(irq.read().unwrap() >= 1);
        let mut got = vec![];
        let mut b = [0u8];
        loop {
            d.read(OFS_STATUS, &mut b);
            if b[0] & SB_OUT_DATA_AVAIL == 0 {
                break;
            }
            d.read(OFS_DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn a_nudge_raises_the_irq_only_while_bytes_wait() {
        let (mut d, _reset, irq) = dev();
        assert!(!d.nudge());
        d.send_ctrl_alt_del();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(d.unread(), CTRL_ALT_DEL.len());
        assert!(d.nudge());
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        for _ in 0..CTRL_ALT_DEL.len() {
            d.read(OFS_DATA, &mut b);
        }
        assert_eq!(d.unread(), 0);
        assert!(!d.nudge());
    }

    #[test]
    fn controller_config_round_trips() {
        let (mut d, _, _) = dev();
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[0x47]);
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        let mut b = [0u8];
        d.read(OFS_DATA, &mut b);
        assert_eq!(b[0], 0x47);
        d.write(OFS_STATUS, &[CMD_SELF_TEST]);
        d.read(OFS_DATA, &mut b);
        assert_eq!(b[0], 0x55);
    }
}
