//! CPU exceptions and interrupts: entry stubs, the IDT, and decoding.
//!
//! `extern "x86-interrupt"` is nightly-only, so every vector gets a small assembly stub that
//! pushes a uniform [`TrapFrame`] (a dummy error code where the CPU pushes none, the vector, all
//! general registers) and calls `stencil_trap`, which hands the frame to the one handler the
//! kernel core registered with [`init`] (what a trap *means* — resolve a page fault, end a task,
//! end the app — is the core's policy, not arch's). The IDT is filled with `set_handler_addr`.
//! The double fault runs on its own stack (IST1) so a kernel stack overflow is still reported.

use ::x86_64::VirtAddr;
use ::x86_64::registers::control::Cr2;
use ::x86_64::structures::idt::InterruptDescriptorTable;
use core::fmt::Write;
use spin::Once;

/// Vectors that have a stub (CPU exceptions 0..32, interrupts 32..64, spurious 255).
const STUB_VECTORS: usize = 64;

/// One 16-byte-aligned stub per vector: a dummy error code where the CPU pushes none, the vector
/// number, then the common path. The stub for table index `i` is at `stencil_isr_base + 16 * i`.
macro_rules! trap_stubs {
    (@err e) => { "" };
    (@err n) => { "push $0\n" };
    ($($vec:literal $kind:ident),* $(,)?) => {
        core::arch::global_asm!(
            ".text",
            ".p2align 4",
            ".global stencil_isr_base",
            "stencil_isr_base:",
            $(
                ".p2align 4",
                trap_stubs!(@err $kind),
                concat!("push $", stringify!($vec)),
                "jmp stencil_isr_common",
            )*
            "stencil_isr_common:",
            "push %rax", "push %rcx", "push %rdx", "push %rbx", "push %rbp", "push %rsi",
            "push %rdi", "push %r8", "push %r9", "push %r10", "push %r11", "push %r12",
            "push %r13", "push %r14", "push %r15",
            "mov %rsp, %rdi",
            "cld",
            "call stencil_trap",
            "pop %r15", "pop %r14", "pop %r13", "pop %r12", "pop %r11", "pop %r10", "pop %r9",
            "pop %r8", "pop %rdi", "pop %rsi", "pop %rbp", "pop %rbx", "pop %rdx", "pop %rcx",
            "pop %rax",
            "add $16, %rsp",
            "iretq",
            options(att_syntax)
        );
    };
}

trap_stubs!(0 n, 1 n, 2 n, 3 n, 4 n, 5 n, 6 n, 7 n, 8 e, 9 n, 10 e, 11 e, 12 e, 13 e, 14 e, 15 n, 16 n, 17 e, 18 n, 19 n, 20 n, 21 e, 22 n, 23 n, 24 n, 25 n, 26 n, 27 n, 28 n, 29 e, 30 e, 31 n, 32 n, 33 n, 34 n, 35 n, 36 n, 37 n, 38 n, 39 n, 40 n, 41 n, 42 n, 43 n, 44 n, 45 n, 46 n, 47 n, 48 n, 49 n, 50 n, 51 n, 52 n, 53 n, 54 n, 55 n, 56 n, 57 n, 58 n, 59 n, 60 n, 61 n, 62 n, 63 n, 255 n);

unsafe extern "C" {
    /// The first stub; see [`trap_stubs`].
    static stencil_isr_base: [u8; 16];
}

/// Address of the stub for table index `i` (vectors 0..64 are indices 0..64; vector 255 is 64).
fn stub_addr(i: usize) -> VirtAddr {
    VirtAddr::new((&raw const stencil_isr_base) as u64 + 16 * i as u64)
}

/// What the stubs push: general registers, vector, error code, then the CPU's interrupt frame.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// The faulting address (CR2) for a page fault or a double fault (which may follow a stack
    /// overflow), else 0.
    pub fn fault_address(&self) -> u64 {
        if self.vector == 14 || self.vector == 8 {
            Cr2::read_raw()
        } else {
            0
        }
    }
}

/// The kernel core's trap handler: gets every exception and interrupt, with interrupts off.
pub type Handler = fn(&mut TrapFrame);

static IDT: Once<InterruptDescriptorTable> = Once::new();
static HANDLER: Once<Handler> = Once::new();

/// Builds and loads the IDT; every vector goes to `handler` from now on.
pub fn init(handler: Handler) {
    HANDLER.call_once(|| handler);
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        for vector in 0..STUB_VECTORS {
            let handler = stub_addr(vector);
            // SAFETY (for every set_handler_addr below): each address is a stub that saves all
            // registers, calls `stencil_trap` and returns with `iretq`, the contract an IDT gate
            // needs.
            match vector {
                8 => {
                    // SAFETY: see above; IST1 is set up in the TSS by gdt::init.
                    unsafe {
                        idt.double_fault
                            .set_handler_addr(handler)
                            .set_stack_index(super::gdt::DOUBLE_FAULT_IST);
                    }
                }
                // Reserved vectors the crate does not expose (9, 15, 22..=27, 31): left empty.
                9 | 15 | 22..=27 | 31 => {}
                v if v < 32 => {
                    let entry = match v {
                        0 => &mut idt.divide_error,
                        1 => &mut idt.debug,
                        2 => &mut idt.non_maskable_interrupt,
                        3 => &mut idt.breakpoint,
                        4 => &mut idt.overflow,
                        5 => &mut idt.bound_range_exceeded,
                        6 => &mut idt.invalid_opcode,
                        7 => &mut idt.device_not_available,
                        16 => &mut idt.x87_floating_point,
                        19 => &mut idt.simd_floating_point,
                        20 => &mut idt.virtualization,
                        28 => &mut idt.hv_injection_exception,
                        _ => {
                            set_with_error(&mut idt, v, handler);
                            continue;
                        }
                    };
                    // SAFETY: see above.
                    unsafe {
                        entry.set_handler_addr(handler);
                    }
                }
                v => {
                    // SAFETY: see above.
                    unsafe {
                        idt[v as u8].set_handler_addr(handler);
                    }
                }
            }
        }
        // SAFETY: see above.
        unsafe {
            idt[255].set_handler_addr(stub_addr(STUB_VECTORS));
        }
        idt
    });
    idt.load();
}

/// Exceptions whose entries have the "with error code" type in the crate.
fn set_with_error(idt: &mut InterruptDescriptorTable, vector: usize, handler: VirtAddr) {
    // SAFETY: in every arm the handler is a stub as described in `init`.
    unsafe {
        match vector {
            10 => idt.invalid_tss.set_handler_addr(handler),
            11 => idt.segment_not_present.set_handler_addr(handler),
            12 => idt.stack_segment_fault.set_handler_addr(handler),
            13 => idt.general_protection_fault.set_handler_addr(handler),
            14 => idt.page_fault.set_handler_addr(handler),
            17 => idt.alignment_check.set_handler_addr(handler),
            18 => idt.machine_check.set_handler_addr(handler),
            21 => idt.cp_protection_exception.set_handler_addr(handler),
            29 => idt.vmm_communication_exception.set_handler_addr(handler),
            30 => idt.security_exception.set_handler_addr(handler),
            _ => return,
        };
    }
}

/// Name and mnemonic of a CPU exception vector.
pub fn exception_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("divide error", "#DE"),
        1 => ("debug", "#DB"),
        2 => ("non-maskable interrupt", "NMI"),
        3 => ("breakpoint", "#BP"),
        4 => ("overflow", "#OF"),
        5 => ("bound range exceeded", "#BR"),
        6 => ("invalid opcode", "#UD"),
        7 => ("device not available", "#NM"),
        8 => ("double fault", "#DF"),
        10 => ("invalid TSS", "#TS"),
        11 => ("segment not present", "#NP"),
        12 => ("stack-segment fault", "#SS"),
        13 => ("general protection fault", "#GP"),
        14 => ("page fault", "#PF"),
        16 => ("x87 floating-point error", "#MF"),
        17 => ("alignment check", "#AC"),
        18 => ("machine check", "#MC"),
        19 => ("SIMD floating-point error", "#XM"),
        20 => ("virtualization exception", "#VE"),
        21 => ("control protection", "#CP"),
        28 => ("hypervisor injection", "#HV"),
        29 => ("VMM communication", "#VC"),
        30 => ("security exception", "#SX"),
        _ => ("reserved exception", "#??"),
    }
}

/// Human-readable decoding of a page-fault error code.
pub fn describe_pf_error(code: u64) -> &'static str {
    match (code & 1 != 0, code & 2 != 0, code & 16 != 0) {
        (_, _, true) => {
            if code & 1 != 0 {
                "instruction fetch from a non-executable page"
            } else {
                "instruction fetch from an unmapped page"
            }
        }
        (false, false, false) => "read of an unmapped page",
        (false, true, false) => "write to an unmapped page",
        (true, true, false) => "write to a read-only page",
        (true, false, false) => "read denied (reserved bit or protection key)",
    }
}

/// Common Rust entry for every vector, called by the stubs.
#[unsafe(no_mangle)]
extern "C" fn stencil_trap(frame: &mut TrapFrame) {
    match HANDLER.get() {
        Some(handler) => handler(frame),
        // The IDT is loaded only after a handler is set, so this cannot happen; stop rather than
        // return into a fault that would repeat forever.
        None => super::halt_forever(),
    }
}

/// Writes return addresses to `out` by following the frame-pointer chain from `rbp` (libos and
/// apps are built with `-C force-frame-pointers=yes`). A frame is followed only where
/// `readable(addr, len)` says the memory lies in a known stack, so a corrupt chain cannot fault.
pub fn backtrace(mut rbp: u64, readable: impl Fn(u64, u64) -> bool, out: &mut dyn Write) {
    // `cargo xtask run` and the test harness symbolize these lines from the booted ELF.
    let _ = writeln!(
        out,
        "backtrace (return addresses; cargo xtask names each function):"
    );
    let (mut last, mut repeats) = (0u64, 0u32);
    for depth in 0..256 {
        if !rbp.is_multiple_of(8) || !readable(rbp, 16) {
            break;
        }
        // SAFETY: rbp and rbp + 8 lie inside a mapped kernel stack (checked just above).
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        if ret == 0 {
            break;
        }
        if ret == last {
            repeats += 1;
        } else {
            if repeats > 0 {
                let _ = writeln!(out, "      (the frame above repeats {repeats} more times)");
            }
            let _ = writeln!(out, "  #{depth:<2} {ret:#018x}");
            (last, repeats) = (ret, 0);
        }
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    if repeats > 0 {
        let _ = writeln!(
            out,
            "      (the frame above repeats {repeats} more times; chain cut)"
        );
    }
}
