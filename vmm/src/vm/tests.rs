//! The VM handle's own logic, without KVM (`VmHandle::for_tests`).

use std::time::Duration;

use super::*;
use crate::config::OnOff;
use crate::devices::virtio::{Balloon, DeviceLookupError};

#[test]
fn info_follows_the_live_merge_setting() {
    let vm = VmHandle::for_tests("h1", 8, false);
    let i = vm.info();
    assert_eq!((i.name.as_str(), i.mem_mib, i.vcpus), ("h1", 8, 0));
    assert_eq!(i.ksm, OnOff::Off);
    assert_eq!(i.state, VmState::Running);
    vm.set_mergeable(true).unwrap();
    assert_eq!(vm.info().ksm, OnOff::On);
    assert_eq!(vm.mem_bytes(), 8 << 20);
}

#[test]
fn stats_carry_the_live_merge_setting() {
    let vm = VmHandle::for_tests("h5", 8, false);
    let age = Duration::from_secs(300);
    assert_eq!(vm.sample(age).unwrap().guest_ram_mergeable, Some(false));
    vm.set_mergeable(true).unwrap();
    assert_eq!(vm.sample(age).unwrap().guest_ram_mergeable, Some(true));
    let cheap = vm.try_sample(age).unwrap().unwrap();
    assert_eq!(cheap.guest_ram_mergeable, Some(true));
}

#[test]
fn a_stopping_vm_refuses_changes() {
    let vm = VmHandle::for_tests("h2", 8, true);
    vm.stop("test");
    assert!(vm.stopping());
    assert!(matches!(vm.pause(), Err(VmHandleError::Stopping)));
    assert!(matches!(vm.resume(), Err(VmHandleError::Stopping)));
    assert!(matches!(
        vm.set_mergeable(false),
        Err(VmHandleError::Stopping)
    ));
    assert!(vm.mergeable(), "the setting did not change");
}

#[test]
fn the_main_loop_never_waits_for_the_sampler() {
    let vm = VmHandle::for_tests("h3", 8, true);
    assert!(vm.try_sample(Duration::from_secs(300)).unwrap().is_ok());
    let guard = vm.sampler.as_ref().unwrap().lock().unwrap();
    assert!(vm.try_sample(Duration::from_secs(300)).is_none());
    drop(guard);
    assert!(vm.try_sample(Duration::from_secs(300)).is_some());
}

#[test]
fn a_missing_device_is_named() {
    let vm = VmHandle::for_tests("h4", 8, true);
    assert!(matches!(
        vm.with_device::<Balloon, _>("balloon0", |_| ()),
        Err(VmHandleError::Device(DeviceLookupError::NotFound(id))) if id == "balloon0"
    ));
    assert_eq!(vm.devices().count(), 0);
}
