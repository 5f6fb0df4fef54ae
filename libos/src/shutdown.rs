//! Ending the VM: libos's reserved exit codes and the one path that reports a code to QEMU.
//!
//! The scheme (app codes 0–99, libos's 100 and up, the isa-debug-exit mapping) is
//! `stencil_abi::exit`; `docs/ARCHITECTURE.md`, "Exit codes", lists the meanings.

use stencil_abi::ExitCode;

use crate::arch;

// libos's reserved exit codes (docs/ARCHITECTURE.md, "Exit codes"; the scheme is `stencil_abi::exit`).
/// Exit code of a panic.
pub const EXIT_PANIC: u32 = ExitCode::PANIC.code() as u32;
/// Exit code of a malformed kernel command line.
pub const EXIT_BAD_CMDLINE: u32 = ExitCode::BAD_CMDLINE.code() as u32;
/// Exit code of running out of memory (during boot, or the kernel heap cannot grow).
pub const EXIT_OOM: u32 = ExitCode::OUT_OF_MEMORY.code() as u32;
/// Exit code of a boot failure that is not about memory: bad PVH start info, no or unusable
/// memory map.
pub const EXIT_BOOT_FAILED: u32 = ExitCode::BOOT_FAILED.code() as u32;
/// Highest exit code an app may use.
pub const MAX_APP_EXIT: i32 = ExitCode::MAX_APP as i32;

/// Ends the app (and the VM) with `code`: 0–99 as given, anything else reported and replaced by
/// 99 (codes from 100 up are libos's).
pub(crate) fn exit_app(code: i32) -> ! {
    let code = if (0..=MAX_APP_EXIT).contains(&code) {
        code
    } else {
        crate::console::emergency_write(format_args!(
            "stencil: exit code {code} is outside 0..={MAX_APP_EXIT}; exiting with {MAX_APP_EXIT}\n"
        ));
        MAX_APP_EXIT
    };
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
