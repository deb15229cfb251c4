//! Assembles a VM from a validated configuration: KVM VM with in-kernel
//! irqchip and PIT, guest RAM (MADV_MERGEABLE before any vCPU runs), the
//! kernel, initrd, command line, zero page, MP table and ACPI tables, the
//! legacy and ACPI devices, and configured vCPUs.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, AcpiError};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::e820_map;
use crate::arch::x86_64::layout::{
    self, ACPI_PM_PORT, ACPI_PM_PORTS, IRQ_I8042, IRQ_SERIAL, MMIO_GAP_START, PVPANIC_PORT,
};
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::config::{SerialSink, ValidVmConfig, VmConfig};
use crate::devices::acpi::{AcpiPm, PvPanic};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::I8042;
use crate::devices::serial::{open_output, SerialDevice, SerialOut, SerialStats};
use crate::devices::virtio::{CreateError, ManagerError, VirtioDevices};
use crate::memory::{self, MemoryError};
use crate::outcome::{ExitStatus, HasExitStatus};
use crate::vcpu::{Vcpu, VcpuError, VmControl};
use crate::vm::Vm;

const SERIAL_PORT: u64 = 0x3f8;
const I8042_PORT: u64 = 0x60;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open it? root or the kvm group is needed)")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM: {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Device(#[from] CreateError),
    #[error(transparent)]
    Virtio(#[from] ManagerError),
}

impl HasExitStatus for BuildError {
    /// BadInput for input the user can fix, Failure for host failures.
    fn exit_status(&self) -> ExitStatus {
        use ExitStatus::{BadInput, Failure};
        match self {
            BuildError::KvmOpen(_)
            | BuildError::SerialFile { .. }
            | BuildError::Device(CreateError::Disk(_) | CreateError::Tap(_)) => BadInput,
            BuildError::Boot(e) => match e {
                BootError::ZeroPage(_)
                | BootError::CmdlineLoad(_)
                | BootError::InitrdRead { .. } => Failure,
                _ => BadInput,
            },
            BuildError::MpTable(MpTableError::TooManyCpus(_))
            | BuildError::Acpi(AcpiError::TooManyCpus(_)) => BadInput,
            _ => Failure,
        }
    }
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { op, source }
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

/// The guest's serial sink with its bounds (devices::serial::open_output).
fn serial_out(config: &VmConfig) -> Result<(SerialOut, Arc<SerialStats>), BuildError> {
    open_output(&config.serial, config.serial_limits).map_err(|source| BuildError::SerialFile {
        path: match &config.serial {
            SerialSink::File(p) => p.clone(),
            _ => "stdout".into(),
        },
        source,
    })
}

/// Builds a VM ready to run.
pub fn build(config: ValidVmConfig) -> Result<Vm, BuildError> {
    build_with(config, Ok)
}

/// Builds a VM whose serial output passes through `serial_tap` on its way
/// to the configured sink (the service layer watches it for a ready marker).
pub fn build_with(
    config: ValidVmConfig,
    serial_tap: impl FnOnce(SerialOut) -> std::io::Result<SerialOut>,
) -> Result<Vm, BuildError> {
    // Validated against this host's limits by `config::resolve`.
    let config = config.into_inner();
    let kvm = Kvm::new().map_err(BuildError::KvmOpen)?;
    if !kvm.check_extension(Cap::Irqchip) {
        return Err(BuildError::Kvm {
            op: "KVM_CAP_IRQCHIP check",
            source: kvm_ioctls::Error::new(libc::ENOTSUP),
        });
    }

    crate::milestone!("KVM opened");
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(crate::usize_of(layout::KVM_TSS_ADDRESS))
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let mem_bytes = config.mem_bytes();
    crate::milestone!("irqchip and PIT created");
    let mem = memory::create(mem_bytes)?;
    if config.ksm {
        // Before any vCPU runs, so every page the guest ever touches is a candidate.
        memory::set_mergeable(&mem, true)?;
    }
    memory::register(&vm, &mem)?;

    // virtio devices first: each one adds its virtio_mmio.device= parameter.
    let mut mmio_bus = Bus::new();
    crate::milestone!("guest memory mapped");
    let (virtio, device_params) = add_virtio_devices(&config, &vm, &mem, &mut mmio_bus)?;

    let low_mem_end = mem_bytes.min(MMIO_GAP_START);
    crate::milestone!("virtio devices created");
    let kernel = boot::load_kernel(&mem, &config.kernel, low_mem_end)?;
    crate::milestone!("kernel loaded");
    let initrd = match &config.initrd {
        Some(p) => Some(boot::load_initrd(&mem, p, &kernel, low_mem_end)?),
        None => None,
    };
    let cmdline = full_cmdline(config.cmdline(), &device_params);
    boot::load_command_line(&mem, &cmdline, &kernel)?;
    let e820 = e820_map(mem_bytes);
    // Both tables: the MP table for kernels without ACPI, ACPI for kernels
    // without MPPARSE (ACPI wins where a kernel has both).
    mptable::setup(&mem, config.vcpus)?;
    let mmio: Vec<acpi::MmioDevice> = virtio
        .devices()
        .map(|d| acpi::MmioDevice {
            base: d.mmio_base,
            size: d.mmio_size,
            irq: d.irq,
        })
        .collect();
    let rsdp = acpi::setup(&mem, config.vcpus, &mmio)?;
    boot::setup_zero_page(&mem, &kernel, cmdline.len(), initrd, &e820, Some(rsdp))?;
    log::info!("kernel entry {:#x}, cmdline: {cmdline}", kernel.entry);
    for e in &e820 {
        log::info!("e820 addr={:#x} size={:#x} type={}", e.addr, e.size, e.kind);
    }

    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, IRQ_SERIAL)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let (serial_out, serial_stats) = serial_out(&config)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        serial_tap(serial_out).map_err(BuildError::EventFd)?,
        serial_stats,
    )));
    let kbd_irq = eventfd()?;
    vm.register_irqfd(&kbd_irq, IRQ_I8042)
        .map_err(kvm_err("KVM_IRQFD (i8042)"))?;
    let reset_evt = eventfd()?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        reset_evt.try_clone().map_err(BuildError::EventFd)?,
        kbd_irq,
    )));

    // The ACPI devices end the VM themselves, from the vCPU thread, so that
    // the first of several guest events (pvpanic, then reset) is the one kept.
    let control = VmControl::new().map_err(BuildError::EventFd)?;
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(control.clone())));
    let pvpanic = Arc::new(Mutex::new(PvPanic::new(control.clone())));

    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), SERIAL_PORT, 8)?;
    io_bus.insert(i8042.clone(), I8042_PORT, 5)?;
    io_bus.insert(pvpanic, PVPANIC_PORT, 1)?;
    io_bus.insert(acpi_pm, ACPI_PM_PORT, ACPI_PM_PORTS)?;
    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);

    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, index, mem.clone(), io_bus.clone(), mmio_bus.clone())?;
        vcpu.configure(&base_cpuid, config.vcpus, kernel.entry)?;
        vcpus.push(vcpu);
    }

    crate::milestone!("vCPUs configured");
    Ok(Vm {
        config,
        kvm_vm: vm,
        mem,
        control,
        serial,
        i8042,
        reset_evt,
        vcpus,
        virtio,
        kvm,
    })
}

/// The user's command line followed by the device parameters.
fn full_cmdline(base: &str, device_params: &[String]) -> String {
    std::iter::once(base)
        .chain(device_params.iter().map(String::as_str))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

type VirtioSetup = (VirtioDevices, Vec<String>);

/// Creates the configured virtio devices on the MMIO bus, in the order the
/// guest sees them, and returns the command line parameters announcing them.
fn add_virtio_devices(
    config: &VmConfig,
    vm: &kvm_ioctls::VmFd,
    mem: &vm_memory::GuestMemoryMmap,
    mmio_bus: &mut Bus,
) -> Result<VirtioSetup, BuildError> {
    let mut devices = VirtioDevices::new(Arc::new(mem.clone()));
    let mut params = Vec::new();
    for device in crate::devices::virtio::create(&config.devices, mem)? {
        devices.add_boxed(device, mmio_bus, vm, &mut params)?;
    }
    Ok((devices, params))
}
