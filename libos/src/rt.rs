//! The app runtime: entry macro, exit, panics, command-line arguments.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Debug;
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Once;

use crate::arch;

use stencil_abi::ExitCode;

// libos's reserved exit codes (docs/ARCHITECTURE.md, "Exit codes"; the scheme is `stencil_abi::exit`).
/// Exit code of a panic.
pub const EXIT_PANIC: u32 = ExitCode::PANIC.code() as u32;
/// Exit code of a fatal CPU exception.
pub const EXIT_EXCEPTION: u32 = ExitCode::EXCEPTION.code() as u32;
/// Exit code of a kernel stack overflow.
pub const EXIT_STACK_OVERFLOW: u32 = ExitCode::STACK_OVERFLOW.code() as u32;
/// Exit code of a malformed kernel command line.
pub const EXIT_BAD_CMDLINE: u32 = ExitCode::BAD_CMDLINE.code() as u32;
/// Exit code of running out of memory (during boot, or the kernel heap cannot grow).
pub const EXIT_OOM: u32 = ExitCode::OUT_OF_MEMORY.code() as u32;
/// Exit code of a boot failure that is not about memory: bad PVH start info, no or unusable
/// memory map.
pub const EXIT_BOOT_FAILED: u32 = ExitCode::BOOT_FAILED.code() as u32;
/// Highest exit code an app may use.
pub const MAX_APP_EXIT: i32 = ExitCode::MAX_APP as i32;

static ARGS: Once<Vec<String>> = Once::new();

pub(crate) fn set_args(args: Vec<String>) {
    ARGS.call_once(|| args);
}

/// The app's command-line arguments: what follows `--` on the kernel command line
/// (`cargo xtask run <app> -- <args>`). There is no program name at index 0.
///
/// ```no_run
/// for (i, a) in libos::args().iter().enumerate() {
///     libos::println!("arg[{i}] = {a}");
/// }
/// ```
pub fn args() -> &'static [String] {
    ARGS.get().map_or(&[], Vec::as_slice)
}

/// Ends the app (and the VM) with `code`, which `cargo xtask run` returns as its own exit code.
///
/// Codes 0–99 belong to the app; 100 and above are reserved for libos's failure reports, so a
/// code outside 0–99 is reported and replaced by 99.
///
/// ```no_run
/// libos::exit(7);
/// ```
pub fn exit(code: i32) -> ! {
    let code = if (0..=MAX_APP_EXIT).contains(&code) {
        code
    } else {
        crate::println!(
            "stencil: exit code {code} is outside 0..={MAX_APP_EXIT}; exiting with {MAX_APP_EXIT}"
        );
        MAX_APP_EXIT
    };
    log::debug!("exit({code}) after {:?}", crate::time::uptime());
    raw_exit(code as u32)
}

/// Exits with one of libos's reserved codes (100..).
pub(crate) fn fatal_exit(code: u32) -> ! {
    raw_exit(code)
}

fn raw_exit(code: u32) -> ! {
    // isa-debug-exit makes QEMU exit with (v << 1) | 1; the scheme's v = code + 1 keeps 0 and 1
    // for crashes and QEMU's own errors.
    let value = i32::try_from(code)
        .ok()
        .and_then(ExitCode::from_code)
        .and_then(ExitCode::port_value);
    let value = value.unwrap_or_else(|| {
        crate::console::emergency_write(format_args!(
            "stencil: exit code {code} is not one the guest may report; exiting with {EXIT_PANIC}\n"
        ));
        EXIT_PANIC + 1
    });
    arch::debug_exit(value);
    crate::console::emergency_write(format_args!(
        "stencil: exit({code}): no isa-debug-exit device at port {:#x}; halting\n",
        stencil_abi::exit::DEBUG_EXIT_PORT
    ));
    arch::halt_forever()
}

/// What `main` may return: `()`, an `i32` exit code, or a `Result` (an `Err` is printed and
/// exits with 1).
pub trait Termination {
    /// The exit code this value stands for.
    fn report(self) -> i32;
}

impl Termination for () {
    fn report(self) -> i32 {
        0
    }
}

impl Termination for i32 {
    fn report(self) -> i32 {
        self
    }
}

impl<T: Termination, E: Debug> Termination for Result<T, E> {
    fn report(self) -> i32 {
        match self {
            Ok(v) => v.report(),
            Err(e) => {
                crate::println!("Error: {e:?}");
                1
            }
        }
    }
}

/// Declares the app's entry point.
///
/// ```ignore
/// #![no_std]
/// #![no_main]
/// libos::main!(main);
/// fn main() {
///     libos::println!("Hello from Stencil");
/// }
/// ```
///
/// `main` may return `()`, `i32` or `Result<T, E: Debug>` (see [`Termination`]).
#[macro_export]
macro_rules! main {
    ($main:path) => {
        #[doc(hidden)]
        #[unsafe(export_name = "__stencil_app_main")]
        pub fn __stencil_app_main() -> i32 {
            $crate::Termination::report($main())
        }
    };
}

unsafe extern "Rust" {
    /// Defined by the app through [`main!`].
    fn __stencil_app_main() -> i32;
}

/// Runs the app's `main` and exits with its code.
pub(crate) fn run_main() -> ! {
    crate::task::init();
    crate::time::mark_main();
    crate::boot::banner();
    // SAFETY: `main!` defines this symbol with exactly this signature; an app without `main!`
    // fails to link, with the symbol named in the error.
    let code = unsafe { __stencil_app_main() };
    exit(code)
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // No preemption while reporting: another task panicking meanwhile would see PANICKING set.
    crate::arch::irq::disable();
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
    crate::arch::traps::backtrace(crate::arch::cpu::frame_pointer());
    let oom = kernel_heap_oom(info);
    if let Some(bytes) = oom {
        crate::console::emergency_write(format_args!(
            "stencil: {}out of memory: the kernel heap cannot grow for an allocation of {} bytes \
             ({} frames free; the heap holds {} KiB)\n",
            TaskPrefix,
            bytes,
            if crate::mm::kernel::ready() {
                crate::mm::kernel::frames().free_frames()
            } else {
                0
            },
            crate::mm::heap::reserved_bytes() / 1024
        ));
    }
    if crate::task::in_spawned_task() {
        // Only this task ends; the app goes on. (Inside a kernel critical section the app ends
        // instead, in `fail_current`, and the lock may be the heap's: do not allocate then.)
        let msg = if crate::arch::irq::irq_locks_held() == 0 {
            task_message(info)
        } else {
            String::new()
        };
        PANICKING.store(false, Ordering::Relaxed);
        crate::task::fail_current(crate::task::TaskError::Panic(msg));
    }
    fatal_exit(if oom.is_some() { EXIT_OOM } else { EXIT_PANIC })
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
