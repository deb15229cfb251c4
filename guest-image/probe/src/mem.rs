//! The C memory functions rustc expects from libc (we link none), plain
//! `rep movsb`/`rep stosb` that only ever run at CPL3 (natively), and a stub
//! `rust_eh_personality`.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.memfuncs, "ax"
    .global memcpy
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

    .global memmove
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 1f
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

    .global memset
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xor eax, eax
    test rdx, rdx
    jz 2f
1:  movzx eax, byte ptr [rdi]
    movzx ecx, byte ptr [rsi]
    sub eax, ecx
    jnz 2f
    inc rdi
    inc rsi
    dec rdx
    jnz 1b
2:  ret

/* Referenced by the precompiled core's unwind tables in unoptimised builds;
   never called (panic = "abort"). */
    .global rust_eh_personality
rust_eh_personality:
    ud2
"#
);
