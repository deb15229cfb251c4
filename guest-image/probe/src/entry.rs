//! Everything that runs at CPL0, in assembly.
//!
//! On this project's development machines (KVM's PVM backend) the
//! hypervisor emulates CPL0 code one instruction at a time (about 1 us each)
//! while CPL3 code runs natively, so CPL0 work is kept to ~40 instructions on
//! boot plus ~10 per service call. No compiled Rust ever runs at CPL0: rustc
//! freely emits SSE and other instructions an instruction emulator may lack.
//!
//! Boot (`_start`, from the VMM: long mode, interrupts off, rsi =
//! boot_params): enable SSE, check the boot_params magic (else print an
//! error by polling the UART and reset), read CPUID 0x8000_0001 (at CPL0 it
//! reports the VM's CPUID), switch to the static bootstrap page tables
//! (0..4 MiB identity, user-accessible), load our GDT, TSS and IDT, and
//! `iretq` to `user_start` at CPL3 with IF=0. CPL3 then zeroes .bss, fills
//! the IDT (in user-accessible memory: a test probe, not an OS), builds the
//! final page tables and has the CPL0 service load them.
//!
//! What the PVM machines taught us (an ordinary VT-x/AMD-V host is happy with
//! either way):
//! - Port I/O from CPL3 needs the TSS I/O permission bitmap: RFLAGS.IOPL=3 is
//!   not honoured (user mode runs with the hardware IOPL=0). The TSS carries
//!   an all-zero bitmap, and RFLAGS.IOPL=3 is set as well.
//! - `int n` from CPL3 raises #UD whatever the gate's DPL, and `syscall`
//!   lands at LSTAR still at CPL3 (PVM's own event ABI). Exceptions from CPL3
//!   are delivered through our IDT, though, so CPL3 reaches its CPL0
//!   services with a `ud2` at a known address (`probe_service`): the #UD
//!   handler recognises the address and dispatches on rdi.
//!
//! CPL0 services (`probe_service(rdi = service, rsi = argument)`, every
//! register preserved):
//! - `SYS_IDLE`: `sti; hlt; cli`: sleeps until an interrupt.
//! - `SYS_SET_CR3`: `mov cr3, rsi`.
//! - `SYS_FAULT_EMULATION`: `lock cmpxchg16b` at CPL0, which KVM's
//!   instruction emulator refuses (X86EMUL_UNHANDLEABLE): the VMM gets
//!   KVM_EXIT_INTERNAL_ERROR (emulation failure).
//! - `SYS_FAULT_TRIPLE`: load an IDT with limit 0 and `ud2`: triple fault.
//!
//! Interrupts: vectors 0x20..0x2f (8259 PIC) send EOI and return; 0xff (LAPIC
//! spurious) just returns. Other exceptions from CPL3 are redirected to
//! `user_exception_entry` at CPL3 (which reports and powers off); exceptions
//! at CPL0 print a line and triple-fault.

use core::arch::global_asm;

/// GDT selectors.
pub const KERNEL_CS: u16 = 0x08;
/// Numbers of the CPL0 services (see `probe_service`).
pub const SYS_IDLE: u64 = 0;
pub const SYS_SET_CR3: u64 = 1;
pub const SYS_FAULT_EMULATION: u64 = 2;
pub const SYS_FAULT_TRIPLE: u64 = 3;
/// First vector of the master PIC.
pub const VEC_PIC_MASTER: u8 = 0x20;
/// First vector of the slave PIC.
pub const VEC_PIC_SLAVE: u8 = 0x28;
/// LAPIC spurious-interrupt vector.
pub const VEC_SPURIOUS: u8 = 0xff;

extern "C" {
    /// Runs CPL0 service `service` with `arg` (entry.rs: a `ud2` whose #UD
    /// handler recognises its address). Preserves every register.
    pub fn probe_service(service: u64, arg: u64);
    /// Addresses of the 32 exception stubs, in vector order.
    pub static EXCEPTION_STUBS: [u64; 32];
    /// The IDT (256 gates of 16 bytes), already loaded by `_start`, zeroed
    /// with .bss at CPL3 and filled by `idt::init`.
    pub static mut IDT: [u64; 512];
    pub fn isr_irq_master();
    pub fn isr_irq_slave();
    pub fn isr_spurious();
    /// Start and end of the loaded image including .bss (linker.ld).
    pub static __image_start: u8;
    pub static __image_end: u8;
}

global_asm!(
    r#"
    .section .text.entry, "ax"
    .code64
    .global _start
_start:
    /* SSE: CR0.EM=0, CR0.TS=0, CR0.MP=1; CR4.OSFXSR|OSXMMEXCPT; no SMEP/SMAP (our
       CPL0 stubs live in user-accessible pages). */
    mov rax, cr0
    and rax, -13
    or eax, 2
    mov cr0, rax
    mov rax, cr4
    or eax, 0x600
    and eax, 0xffcfffff
    mov cr4, rax

    /* The Linux boot protocol magic in boot_params. */
    cmp word ptr [rsi + 0x1fe], 0xaa55
    jne 90f
    cmp dword ptr [rsi + 0x202], 0x53726448
    jne 90f
    mov r12, rsi

    /* CPUID 0x80000001 EDX (bit 26: 1 GiB pages), 0 if the leaf is absent. */
    xor r13d, r13d
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb 1f
    mov eax, 0x80000001
    cpuid
    mov r13d, edx
1:
    /* Bootstrap page tables: 0..4 MiB identity, user-accessible. */
    lea rax, [rip + BOOT_PML4]
    mov cr3, rax
    /* GDT with the TSS base patched in (the image is below 4 GiB). */
    lea rax, [rip + TSS]
    lea rdx, [rip + GDT]
    mov [rdx + 0x2a], ax
    shr eax, 16
    mov [rdx + 0x2c], al
    mov [rdx + 0x2f], ah
    lgdt [rip + GDT_PTR]
    mov ax, 0x28
    ltr ax
    lidt [rip + IDT_PTR]

    /* iretq to CPL3: SS, RSP, RFLAGS (IOPL=3, IF=0), CS, RIP. */
    push 0x1b
    lea rax, [rip + __user_stack_top]
    push rax
    push 0x3002
    push 0x23
    lea rax, [rip + user_start]
    push rax
    mov rdi, r12
    mov esi, r13d
    iretq

90: /* Bad boot_params: print by polling the UART, then reset via i8042. */
    lea rsi, [rip + BAD_MAGIC_MSG]
    mov ecx, offset BAD_MAGIC_LEN
    cld
91: mov dx, 0x3fd
92: in al, dx
    test al, 0x20
    jz 92b
    mov dx, 0x3f8
    lodsb
    out dx, al
    loop 91b
    mov al, 0xfe
    out 0x64, al
93: hlt
    jmp 93b

    .section .text, "ax"

/* ---- CPL3 ---- */
    .global user_start
user_start:
    mov r12, rdi
    mov r13, rsi
    cld
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, r12
    mov rsi, r13
    and rsp, -16
    call probe_main
    ud2

    .global user_exception_entry
user_exception_entry:
    and rsp, -16
    call user_exception
    ud2

/* ---- CPL0 interrupt and gate handlers ---- */
    .macro EXC_NOERR n
isr_exc_\n:
    push 0
    push \n
    jmp exc_common
    .endm
    .macro EXC_ERR n
isr_exc_\n:
    push \n
    jmp exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 7
    EXC_ERR 8
    EXC_NOERR 9
    EXC_ERR 10
    EXC_ERR 11
    EXC_ERR 12
    EXC_ERR 13
    EXC_ERR 14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR 17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR 21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR 29
    EXC_ERR 30
    EXC_NOERR 31

/* Stack: vector, error, rip, cs, rflags, rsp, ss. From CPL3: rewrite the
   frame to return to user_exception_entry(vector, error, rip, cr2, cs,
   rflags) on the fault stack. From CPL0: print and triple-fault. */
exc_common:
    test byte ptr [rsp + 24], 3
    jz 95f
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    mov rcx, cr2
    mov r8, [rsp + 24]
    mov r9, [rsp + 32]
    add rsp, 16
    lea rax, [rip + user_exception_entry]
    mov [rsp], rax
    mov qword ptr [rsp + 16], 0x3002
    lea rax, [rip + __fault_stack_top]
    mov [rsp + 24], rax
    iretq
95: cld
    lea rsi, [rip + CPL0_EXC_MSG]
    mov ecx, offset CPL0_EXC_LEN
    mov dx, 0x3fd
96: in al, dx
    test al, 0x20
    jz 96b
    mov dx, 0x3f8
    lodsb
    out dx, al
    mov dx, 0x3fd
    loop 96b
    jmp isr_fault_triple

    .global isr_irq_master
isr_irq_master:
    push rax
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq

    .global isr_irq_slave
isr_irq_slave:
    push rax
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    pop rax
    iretq

    .global isr_spurious
isr_spurious:
    iretq

/* ---- CPL0 services, called from CPL3 as probe_service(rdi = service,
   rsi = argument): a `ud2` at svc_ud2, whose #UD the hypervisor delivers
   through our IDT. (`int n` and `syscall` from CPL3 do not reach our CPL0
   code on this project's machines.) Every register is preserved. ---- */
    .global probe_service
probe_service:
svc_ud2:
    ud2
    ret

isr_exc_6:
    push rax
    lea rax, [rip + svc_ud2]
    cmp [rsp + 8], rax
    pop rax
    jne 1f
    add qword ptr [rsp], 2      /* return past the ud2 */
    test edi, edi
    jz svc_idle
    cmp edi, 1
    je svc_set_cr3
    cmp edi, 2
    je svc_fault_emulation
    jmp isr_fault_triple
1:  push 0                      /* a genuine #UD */
    push 6
    jmp exc_common

/* Sleep until an interrupt (hlt with IF=1, on the kernel stack). */
svc_idle:
    sti
    hlt
    cli
    iretq

svc_set_cr3:
    mov cr3, rsi
    iretq

/* KVM's instruction emulator refuses cmpxchg16b (X86EMUL_UNHANDLEABLE). */
svc_fault_emulation:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    lea rsi, [rip + CX16_BUF]
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    lock cmpxchg16b [rsi]
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    iretq

    .global isr_fault_triple
isr_fault_triple:
    lidt [rip + NULL_IDT_PTR]
    ud2

/* ---- data ---- */
    .section .rodata, "a"
    .balign 8
    .global EXCEPTION_STUBS
EXCEPTION_STUBS:
    .quad isr_exc_0, isr_exc_1, isr_exc_2, isr_exc_3
    .quad isr_exc_4, isr_exc_5, isr_exc_6, isr_exc_7
    .quad isr_exc_8, isr_exc_9, isr_exc_10, isr_exc_11
    .quad isr_exc_12, isr_exc_13, isr_exc_14, isr_exc_15
    .quad isr_exc_16, isr_exc_17, isr_exc_18, isr_exc_19
    .quad isr_exc_20, isr_exc_21, isr_exc_22, isr_exc_23
    .quad isr_exc_24, isr_exc_25, isr_exc_26, isr_exc_27
    .quad isr_exc_28, isr_exc_29, isr_exc_30, isr_exc_31
BAD_MAGIC_MSG:
    .ascii "PROBE ERROR bad boot_params magic\n"
    .set BAD_MAGIC_LEN, . - BAD_MAGIC_MSG
CPL0_EXC_MSG:
    .ascii "PROBE ERROR exception at CPL0\n"
    .set CPL0_EXC_LEN, . - CPL0_EXC_MSG

    .section .data.boot_pt, "aw"
    .balign 4096
/* Identity map of 0..4 MiB with 2 MiB pages, P|RW|US on every level. */
BOOT_PML4:
    .quad BOOT_PDPT + 7
    .fill 511, 8, 0
BOOT_PDPT:
    .quad BOOT_PD + 7
    .fill 511, 8, 0
BOOT_PD:
    .quad 0x000087
    .quad 0x200087
    .fill 510, 8, 0

    .section .data, "aw"
    .balign 16
GDT:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cff2000000ffff    /* 0x18 user data (DPL3) */
    .quad 0x00affa000000ffff    /* 0x20 user code, 64-bit (DPL3) */
    .quad 0x0000890000002068    /* 0x28 TSS (base patched by _start) */
    .quad 0
GDT_END:
    .balign 8
    .word 0, 0, 0
GDT_PTR:
    .word GDT_END - GDT - 1
    .quad GDT
    .word 0, 0, 0
IDT_PTR:
    .word 4095
    .quad IDT
    .word 0, 0, 0
NULL_IDT_PTR:
    .word 0
    .quad 0

    .balign 16
TSS:
    .long 0
    .quad __kernel_stack_top    /* RSP0 */
    .quad 0, 0                  /* RSP1, RSP2 */
    .quad 0                     /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0   /* IST1..7 */
    .quad 0                     /* reserved */
    .word 0                     /* reserved */
    .word 104                   /* I/O permission bitmap offset */
    .fill 8192, 1, 0            /* every port allowed */
    .byte 0xff

    .balign 16
CX16_BUF:
    .quad 0, 0

    .section .bss, "aw", @nobits
    .balign 4096
    .global IDT
IDT:
    .skip 4096
    .balign 16
    .skip 16384
__kernel_stack_top:
    .skip 65536
__user_stack_top:
    .skip 16384
__fault_stack_top:
"#
);
