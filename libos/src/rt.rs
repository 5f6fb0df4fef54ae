//! The app runtime: entry macro, exit, command-line arguments (the top floor: what an app
//! calls first). The panic handler and the fault policy are in `fault.rs`.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Debug;

use spin::Once;

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
    log::debug!("exit({code}) after {:?}", crate::time::uptime());
    crate::shutdown::exit_app(code)
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
                crate::console::_print(format_args!("Error: {e:?}\n"));
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

/// Runs the app's `main` and exits with its code (boot calls this once everything is up).
pub(crate) fn run_main() -> ! {
    // SAFETY: `main!` defines this symbol with exactly this signature; an app without `main!`
    // fails to link, with the symbol named in the error.
    let code = unsafe { __stencil_app_main() };
    exit(code)
}
