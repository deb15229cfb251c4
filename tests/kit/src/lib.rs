//! The test kit of ksmvm: what the end-to-end tests (tests/*.rs), the
//! real-Linux lane and the benchmarks (benches/) share, once each, in the
//! spirit of Cloud Hypervisor's `test_infra`.
//!
//! * [`env`]: requirements ([`require`], [`have_kvm`], [`is_root`],
//!   [`have_ksm`]) with the CI rule: under `CI=true` a missing requirement
//!   fails the test; elsewhere it is skipped with a message.
//! * [`paths`]: the repository, the ksmvm binary under test, the probe guest
//!   (located or built once per process).
//! * [`dirs`]: [`TempDir`] and [`RuntimeDir`] (a private
//!   `KSMVM_RUNTIME_DIR`), removed on drop.
//! * [`vmm`]: the one launcher, [`Launch`] and [`Vmm`]: a ksmvm (or any VMM)
//!   child with its serial console on a pipe, stderr captured, optionally in
//!   a network namespace; killed on drop, also when a test panics.
//! * [`probe`]: PROBE-line fields ([`field`], [`hex_field`]), `ksmvm run`
//!   arguments for the probe, memory images.
//! * [`api`]: VMs driven through their control API ([`ApiVm`]), tiny
//!   assembled guests, raw HTTP.
//! * [`net`]: network namespaces with TAP devices, AF_PACKET frames.
//! * [`proc`]: /proc/PID/ksm_stat, smaps of guest RAM, per-thread CPU time.
//! * [`ksm`]: fast KSM settings for tests that wait for merging.
//! * [`blockdev`]: loop devices, mounts, device node aliases and processes
//!   holding QEMU-style image locks, undone on drop.

pub mod api;
pub mod blockdev;
pub mod dirs;
pub mod env;
pub mod ksm;
pub mod net;
pub mod paths;
pub mod probe;
pub mod proc;
pub mod vmm;

pub use dirs::{ksmvm_in, ksmvm_ok_in, RuntimeDir, TempDir};
pub use env::{hardware_virt, have_ksm, have_kvm, have_tap, in_ci, is_root, require};
pub use ksm::fast_ksm;
pub use net::{recv_frame, send_frame, NetNs};
pub use paths::{ksmvm, probe, repo_root};
pub use probe::{field, hex_field, kernel_e820_line, parse_field, probe_args, write_pack};
pub use proc::{proc_ksm_count, proc_ksm_stat};
pub use vmm::{run_to_end, Launch, SerialLine, Vmm, WaitError, GUEST_LINE_PREFIX};
