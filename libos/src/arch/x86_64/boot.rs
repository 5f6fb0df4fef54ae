//! The PVH entry point: 32-bit protected mode → long mode → `stencil_boot64` (the kernel's first
//! Rust code, which the boot module defines; arch names only the symbol).
//!
//! QEMU (and any PVH loader) finds the 32-bit entry address in the `.note.Xen` ELF note
//! (type 18, `XEN_ELFNOTE_PHYS32_ENTRY`) and jumps there with paging off and `ebx` holding the
//! physical address of `hvm_start_info`. The code below:
//!
//! 1. records the TSC (the boot-time reference point) and keeps `ebx`;
//! 2. builds throw-away page tables in `.boot.bss` that map the first 1 GiB of physical memory
//!    twice: identity (for the next few instructions) and at `KERNEL_BASE` (where the Rust code
//!    is linked);
//! 3. enables PAE, long mode, NX (if the CPU has it), paging and CR0.WP (so the kernel, which runs
//!    in ring 0, faults on writes to read-only pages — copy-on-write depends on it);
//! 4. far-jumps into 64-bit code, switches to the boot stack in the upper half and calls
//!    `stencil_boot64(start_info_phys, entry_tsc)`.
//!
//! The Rust side replaces these tables with the real kernel tables almost immediately.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* namesz: "Xen\0" */
    .long 8                         /* descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32

    .section .boot.text, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi                  /* hvm_start_info (physical) */
    rdtsc
    mov %eax, boot_entry_tsc
    mov %edx, boot_entry_tsc + 4

    /* PD: 512 × 2 MiB identity pages = the first 1 GiB */
    mov $boot_pd, %edi
    mov $0x83, %eax                 /* present | writable | huge */
    mov $512, %ecx
1:  mov %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b

    mov $boot_pdpt_lo, %eax
    or $3, %eax
    mov %eax, boot_pml4             /* L4[0]   → identity */
    mov $boot_pdpt_hi, %eax
    or $3, %eax
    mov %eax, boot_pml4 + 511 * 8   /* L4[511] → KERNEL_BASE */
    mov $boot_pd, %eax
    or $3, %eax
    mov %eax, boot_pdpt_lo
    mov %eax, boot_pdpt_hi + 510 * 8

    mov %cr4, %eax
    or $(1 << 5), %eax              /* PAE */
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3

    mov $0x80000001, %eax
    cpuid
    mov %edx, %edi                  /* bit 20: NX */
    mov $0xC0000080, %ecx           /* EFER */
    rdmsr
    or $(1 << 8), %eax              /* LME */
    bt $20, %edi
    jnc 2f
    or $(1 << 11), %eax             /* NXE */
2:  wrmsr

    mov %cr0, %eax
    or $((1 << 31) | (1 << 16) | 1), %eax   /* PG | WP | PE */
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    movabs $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov %esi, %edi                  /* arg 0: start info (physical, zero-extended) */
    mov boot_entry_tsc, %rsi        /* arg 1: TSC at entry */
    movabs $stencil_boot64, %rax
    call *%rax
3:  cli
    hlt
    jmp 3b

    .section .boot.data, "aw"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
boot_gdt_end:
    .p2align 2
    .word 0
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .p2align 3
boot_entry_tsc:
    .quad 0

    .section .boot.bss, "aw"
    .p2align 12
boot_pml4:    .skip 4096
boot_pdpt_lo: .skip 4096
boot_pdpt_hi: .skip 4096
boot_pd:      .skip 4096

    .section .bss.stencil.boot_stack, "aw", @nobits
    .p2align 12
    .global boot_stack_bottom
boot_stack_bottom:
    .skip 65536
    .global boot_stack_top
boot_stack_top:
    .text
"#,
    options(att_syntax)
);
