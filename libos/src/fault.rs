//! The fault policy: what a trap or a panic means, decided in one place.
//!
//! `arch` decodes a trap into a [`TrapFrame`] and hands it to [`on_trap`] (registered at boot);
//! the panic handler is here too. The rules:
//! - a page fault in the lower half goes to the running task's address space first (demand-zero,
//!   copy-on-write); resolved, the instruction is retried;
//! - a hit on a stack's guard page is a stack overflow;
//! - anything else the task caused (an unresolved page fault, any other CPU exception, a panic)
//!   is reported (task, address, RIP, cause, backtrace) and ends **only the running task** when it
//!   is a spawned one — unless it failed while holding a kernel lock (then the system cannot go
//!   on safely and the app ends); in the app's `main` it ends the app with the reserved exit
//!   code for the cause. That decision is `sched::policy::decide` (a pure, host-tested
//!   function), which `task::fail_current` applies;
//! - the timer interrupt is the scheduler's tick.

use alloc::string::String;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::traps::{self, TrapFrame};
use crate::arch::{apic, irq};
use crate::sched::policy::Failure;
use crate::shutdown::{EXIT_PANIC, fatal_exit};
use crate::task::TaskError;

/// End of the lower half: page faults below it belong to the current address space.
const LOWER_HALF_END: u64 = 1 << 47;

/// The one entry point for every trap (registered with `arch::traps::init`).
pub(crate) fn on_trap(frame: &mut TrapFrame) {
    // Whatever a handler allocates is libos's, never the interrupted task's (`mm::ctx`).
    let _k = crate::mm::ctx::kernel();
    match frame.vector {
        v if v < 32 => exception(frame),
        apic::TIMER_VECTOR => {
            apic::eoi();
            crate::task::timer_tick();
        }
        apic::SPURIOUS_VECTOR => {}
        _ => {
            // No other interrupt sources are enabled; a stray one is reported, not ignored.
            crate::console::emergency_write(format_args!(
                "stencil: unexpected interrupt vector {} at RIP {:#x}\n",
                frame.vector, frame.rip
            ));
        }
    }
}

fn exception(frame: &mut TrapFrame) {
    let cr2 = frame.fault_address();
    let mut unresolved = None;
    if frame.vector == 14 && cr2 < LOWER_HALF_END {
        let r = crate::space::handle_page_fault(cr2, frame.error_code);
        if crate::procmem::in_shadow_slot(cr2) {
            // The engine may have replaced the statics' L2 table: mirror it.
            crate::procmem::after_shadow_fault(crate::procmem::statics_of(cr2));
        }
        match r {
            Some(Ok(())) => return,
            Some(Err(fault)) => unresolved = Some(fault),
            None => {}
        }
    } else if frame.vector == 14 && crate::procmem::is_statics(cr2) {
        // The task's statics: resolved where the engine maps them (`process`).
        match crate::procmem::statics_fault(cr2, frame.error_code) {
            Some(Ok(())) => return,
            Some(Err(fault)) => unresolved = Some(fault),
            None => {}
        }
    }
    let task = TaskPrefix;
    if let Some(guard) =
        crate::stack::guard_hit(cr2).filter(|_| frame.vector == 8 || frame.vector == 14)
    {
        crate::console::emergency_write(format_args!(
            "\n{task}STACK OVERFLOW: {} hit its guard page at {:#x} (RIP {:#x}, RSP {:#x})\n",
            guard, cr2, frame.rip, frame.rsp
        ));
        backtrace(frame.rbp);
        crate::task::fail_current(Failure::StackOverflow, || TaskError::StackOverflow {
            addr: cr2,
        });
    }
    let (name, mnemonic) = traps::exception_name(frame.vector);
    let mut out = crate::console::EmergencyWriter;
    let _ = write!(
        out,
        "\n{task}EXCEPTION: {name} ({mnemonic}, vector {}), error code {:#x}\n  at RIP {:#018x}, RSP {:#018x}, RFLAGS {:#x}\n",
        frame.vector, frame.error_code, frame.rip, frame.rsp, frame.rflags
    );
    if frame.vector == 14 {
        let _ = writeln!(
            out,
            "  page fault address (CR2) {:#018x}: {}",
            cr2,
            traps::describe_pf_error(frame.error_code)
        );
        if let Some(fault) = &unresolved {
            let _ = writeln!(out, "  address space: {fault}");
        }
    }
    let _ = writeln!(
        out,
        "  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n  rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.r8
    );
    backtrace(frame.rbp);
    let (vector, error_code, rip) = (frame.vector, frame.error_code, frame.rip);
    // Built only when the task alone ends (inside a kernel lock, formatting could deadlock).
    crate::task::fail_current(Failure::Fault, move || {
        let cause = match (&unresolved, vector) {
            (Some(fault), _) => alloc::format!("{fault}"),
            (None, 14) => alloc::format!("{} at {cr2:#x}", traps::describe_pf_error(error_code)),
            (None, _) => alloc::format!("{name} ({mnemonic})"),
        };
        // Nothing on this stack is dropped after the switch: release what we hold first.
        drop(unresolved);
        let _ = writeln!(
            crate::console::EmergencyWriter,
            "{task}ended; the app goes on"
        );
        TaskError::Fault {
            addr: cr2,
            rip,
            cause,
        }
    })
}

/// Prints the frame-pointer chain from `rbp` to the console (only frames inside known stacks).
fn backtrace(rbp: u64) {
    traps::backtrace(
        rbp,
        crate::stack::contains,
        &mut crate::console::EmergencyWriter,
    );
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // The report (and the task's `TaskError`) is libos's: kernel heap, not the task's, whose
    // memory goes with it (`mm::ctx`). Never dropped: the task ends here.
    let _k = crate::mm::ctx::kernel();
    // No preemption while reporting: another task panicking meanwhile would see PANICKING set.
    irq::disable();
    if PANICKING.swap(true, Ordering::Relaxed) {
        crate::console::emergency_write(format_args!(
            "\npanicked while panicking: {}\n",
            info.message()
        ));
        fatal_exit(EXIT_PANIC);
    }
    match info.location() {
        Some(loc) => crate::console::emergency_write(format_args!(
            "\n{}panicked at {}:{}:{}:\n{}\n",
            TaskPrefix,
            loc.file(),
            loc.line(),
            loc.column(),
            info.message()
        )),
        None => crate::console::emergency_write(format_args!(
            "\n{}panicked:\n{}\n",
            TaskPrefix,
            info.message()
        )),
    }
    backtrace(crate::arch::cpu::frame_pointer());
    let oom = kernel_heap_oom(info);
    if let Some(bytes) = oom {
        crate::console::emergency_write(format_args!(
            "stencil: {}out of memory: {} cannot grow for an allocation of {} bytes \
             ({} frames free; the kernel heap holds {} KiB)\n",
            TaskPrefix,
            crate::mm::heap::failed_heap(),
            bytes,
            if crate::mm::kernel::ready() {
                crate::mm::kernel::frames().free_frames()
            } else {
                0
            },
            crate::mm::heap::reserved_bytes() / 1024
        ));
    }
    // A spawned task alone ends (the message is built only then: inside a kernel critical
    // section the lock may be the heap's); else the app ends with the code for the cause.
    crate::task::fail_current(Failure::Panic { oom: oom.is_some() }, || {
        let msg = task_message(info);
        PANICKING.store(false, Ordering::Relaxed);
        TaskError::Panic(msg)
    })
}

/// The panic message and location for `TaskError::Panic`. Built with fallible allocation: after
/// an out-of-memory panic the heap may not hold even this, and the message is then cut short (the
/// full report is on the console already).
fn task_message(info: &core::panic::PanicInfo<'_>) -> String {
    struct TryString(String);
    impl core::fmt::Write for TryString {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0.try_reserve(s.len()).map_err(|_| core::fmt::Error)?;
            self.0.push_str(s);
            Ok(())
        }
    }
    let mut out = TryString(String::new());
    let _ = match info.location() {
        Some(l) => core::fmt::write(
            &mut out,
            format_args!(
                "{} at {}:{}:{}",
                info.message(),
                l.file(),
                l.line(),
                l.column()
            ),
        ),
        None => core::fmt::write(&mut out, format_args!("{}", info.message())),
    };
    out.0
}

/// A small fixed buffer for comparing short formatted texts without allocating.
struct StackText {
    buf: [u8; 80],
    len: usize,
}

impl StackText {
    fn of(args: core::fmt::Arguments<'_>) -> Option<StackText> {
        let mut t = StackText {
            buf: [0; 80],
            len: 0,
        };
        core::fmt::write(&mut t, args).ok()?;
        Some(t)
    }
}

impl core::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(core::fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(core::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `Some(bytes)` if this panic is `alloc`'s report of a kernel-heap allocation the heap could
/// not grow for (stable Rust has no `alloc_error_handler`: the heap records the failed size, and
/// the message must be exactly the one `handle_alloc_error` panics with for that size).
fn kernel_heap_oom(info: &core::panic::PanicInfo<'_>) -> Option<usize> {
    let bytes = crate::mm::heap::failed_request()?;
    let got = StackText::of(format_args!("{}", info.message()))?;
    let want = StackText::of(format_args!("memory allocation of {bytes} bytes failed"))?;
    (got.buf[..got.len] == want.buf[..want.len]).then_some(bytes)
}

/// Prints "task N " in reports when a spawned task is running.
pub(crate) struct TaskPrefix;

impl core::fmt::Display for TaskPrefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match crate::task::current() {
            0 => Ok(()),
            id => write!(f, "task {id} "),
        }
    }
}
