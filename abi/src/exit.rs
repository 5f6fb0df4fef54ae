//! The exit-code scheme and the `isa-debug-exit` mapping (docs/ARCHITECTURE.md, "Exit codes").
//!
//! | code | who | meaning |
//! |---|---|---|
//! | 0–99 | the app | its own exit code (`main`'s return value or `libos::exit`) |
//! | 100 | libos | panic |
//! | 101 | libos | fatal CPU exception |
//! | 102 | libos | kernel stack overflow |
//! | 103 | libos | bad kernel command line (options, app arguments, length or encoding) |
//! | 104 | libos | out of memory (during boot, or the kernel heap cannot grow) |
//! | 105 | libos | boot failed otherwise: bad PVH start info, no or unusable memory map |
//! | 110 | xtask | the guest crashed (triple fault / reset: QEMU exited 0) |
//! | 111 | xtask | timeout: the guest was killed |
//! | 112 | xtask | QEMU failed (exited 1 or with a status outside the scheme) |
//! | 113 | xtask | xtask error |
//! | 130 | xtask | interrupted (Ctrl-C); QEMU was killed |
//!
//! The guest ends the VM by writing `code + 1` to the `isa-debug-exit` port; QEMU then exits with
//! status `(value << 1) | 1`, i.e. `2 * code + 3`. So QEMU's status 0 (a reset under `-no-reboot`,
//! e.g. a triple fault) and 1 (QEMU's own error) can never come from the guest ([`decode_status`]).

use core::fmt;

/// An exit code of Stencil's scheme. Only the constructors below make one, so it always holds a
/// code the scheme defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitCode(u8);

impl ExitCode {
    /// The app succeeded.
    pub const SUCCESS: ExitCode = ExitCode(0);
    /// Highest code an app may exit with.
    pub const MAX_APP: u8 = 99;
    /// libos: a panic.
    pub const PANIC: ExitCode = ExitCode(100);
    /// libos: a fatal CPU exception.
    pub const EXCEPTION: ExitCode = ExitCode(101);
    /// libos: a kernel stack overflow.
    pub const STACK_OVERFLOW: ExitCode = ExitCode(102);
    /// libos: the kernel command line was rejected.
    pub const BAD_CMDLINE: ExitCode = ExitCode(103);
    /// libos: out of memory (during boot, or the kernel heap cannot grow).
    pub const OUT_OF_MEMORY: ExitCode = ExitCode(104);
    /// libos: boot failed for a reason other than memory: bad PVH start info, no or unusable
    /// memory map.
    pub const BOOT_FAILED: ExitCode = ExitCode(105);
    /// xtask: the guest crashed (triple fault or reset; QEMU exited 0).
    pub const CRASH: ExitCode = ExitCode(110);
    /// xtask: the guest did not exit in time and was killed.
    pub const TIMEOUT: ExitCode = ExitCode(111);
    /// xtask: QEMU failed (exited 1, was killed, or exited with a status outside the scheme).
    pub const QEMU_FAILED: ExitCode = ExitCode(112);
    /// xtask: its own error (bad usage, build failure, QEMU missing, ...).
    pub const XTASK_ERROR: ExitCode = ExitCode(113);
    /// xtask: interrupted by Ctrl-C (128 + SIGINT); QEMU was killed.
    pub const INTERRUPTED: ExitCode = ExitCode(130);

    /// Every code that is not an app's, in increasing order.
    pub const RESERVED: [ExitCode; 11] = [
        Self::PANIC,
        Self::EXCEPTION,
        Self::STACK_OVERFLOW,
        Self::BAD_CMDLINE,
        Self::OUT_OF_MEMORY,
        Self::BOOT_FAILED,
        Self::CRASH,
        Self::TIMEOUT,
        Self::QEMU_FAILED,
        Self::XTASK_ERROR,
        Self::INTERRUPTED,
    ];

    /// An app's exit code, if `code` is in 0–99.
    pub const fn app(code: i32) -> Option<ExitCode> {
        if code >= 0 && code <= Self::MAX_APP as i32 {
            Some(ExitCode(code as u8))
        } else {
            None
        }
    }

    /// The code `code` stands for, if the scheme defines it.
    pub const fn from_code(code: i32) -> Option<ExitCode> {
        match code {
            0..=99 | 100..=105 | 110..=113 | 130 => Some(ExitCode(code as u8)),
            _ => None,
        }
    }

    /// The number.
    pub const fn code(self) -> u8 {
        self.0
    }

    /// The number as a process exit status (what `std::process::exit` takes).
    pub const fn status(self) -> i32 {
        self.0 as i32
    }

    /// Whether the app chose this code (0–99).
    pub const fn is_app(self) -> bool {
        self.0 <= Self::MAX_APP
    }

    /// Whether the guest can report this code through `isa-debug-exit` (0–105).
    pub const fn is_guest(self) -> bool {
        self.0 <= Self::BOOT_FAILED.0
    }

    /// A few words for the code, as the `--help` table writes them ("panic", "timeout", ...).
    /// App codes are "the app's own exit code".
    pub const fn name(self) -> &'static str {
        match self.0 {
            0..=99 => "the app's own exit code",
            100 => "panic",
            101 => "CPU exception",
            102 => "stack overflow",
            103 => "bad kernel command line",
            104 => "out of memory",
            105 => "boot failed (bad start info or memory map)",
            110 => "the guest crashed (triple fault / reset: QEMU exited 0)",
            111 => "timeout: the guest was killed",
            112 => "QEMU failed (exited 1 or with an unexpected status)",
            113 => "xtask error (bad usage, build failure, QEMU missing, unknown app)",
            _ => "interrupted (Ctrl-C); QEMU was killed",
        }
    }

    /// The value the guest writes to the `isa-debug-exit` port to exit with this code (`code +
    /// 1`), or `None` for a host-side code (110 and above), which the guest never reports.
    pub const fn port_value(self) -> Option<u32> {
        if self.is_guest() {
            Some(self.0 as u32 + 1)
        } else {
            None
        }
    }

    /// QEMU's exit status when the guest exits with this code (`2 * code + 3`), or `None` for a
    /// host-side code.
    pub const fn qemu_status(self) -> Option<i32> {
        match self.port_value() {
            Some(v) => Some(((v << 1) | 1) as i32),
            None => None,
        }
    }
}

/// One sentence for humans: what the code means ("guest panicked", "the app exited with code 7").
impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("the app exited successfully"),
            c @ 1..=99 => write!(f, "the app exited with code {c}"),
            100 => f.write_str("guest panicked"),
            101 => f.write_str("CPU exception in the guest"),
            102 => f.write_str("stack overflow in the guest"),
            103 => f.write_str("the guest rejected its kernel command line"),
            104 => f.write_str("the guest ran out of memory"),
            105 => f.write_str("the guest could not boot (bad start info or memory map)"),
            110 => f.write_str("the guest crashed: triple fault or reset (QEMU exited 0)"),
            111 => f.write_str("timeout: the guest was killed"),
            112 => f.write_str("QEMU failed"),
            113 => f.write_str("xtask error"),
            _ => f.write_str("interrupted (Ctrl-C); QEMU was killed"),
        }
    }
}

/// The `isa-debug-exit` I/O port (QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// What QEMU's exit status says about the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuExit {
    /// The guest exited through `isa-debug-exit` with a code of the scheme (0–105).
    Guest(ExitCode),
    /// Status 0: the VM was reset (a triple fault under `-no-reboot`) — a crash.
    Reset,
    /// Status 1: QEMU's own error (bad option, missing file, ...).
    QemuError,
    /// An odd status ≥ 3 whose code (`(status - 3) / 2`) the guest may not report.
    OutsideScheme {
        /// The code the guest wrote.
        code: i32,
    },
    /// Any other status (even, negative, or above 255): not from `isa-debug-exit`.
    Unexpected(i32),
}

/// Decodes QEMU's exit status.
pub const fn decode_status(status: i32) -> QemuExit {
    match status {
        0 => QemuExit::Reset,
        1 => QemuExit::QemuError,
        3..=255 if status % 2 == 1 => {
            let code = (status - 3) / 2;
            match ExitCode::from_code(code) {
                Some(c) if c.is_guest() => QemuExit::Guest(c),
                _ => QemuExit::OutsideScheme { code },
            }
        }
        _ => QemuExit::Unexpected(status),
    }
}

/// The `--help` text of the exit-code table, one line per code or range, generated from the
/// scheme above (xtask prints it; a test there keeps its copy identical).
#[derive(Clone, Copy, Debug)]
pub struct HelpTable;

impl fmt::Display for HelpTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  0-99     {}", ExitCode::SUCCESS.name())?;
        let guest = ExitCode::RESERVED.iter().filter(|c| c.is_guest());
        let (first, last) = (ExitCode::PANIC.0, ExitCode::BOOT_FAILED.0);
        write!(f, "  {first}-{last}  reported by libos:")?;
        // Wrapped after every two codes so the lines stay under 80 columns.
        for (i, c) in guest.enumerate() {
            let sep = match i {
                0 => " ",
                i if i % 2 == 0 => ",\n           ",
                _ => ", ",
            };
            write!(f, "{sep}{} {}", c.0, c.name())?;
        }
        for c in ExitCode::RESERVED.iter().filter(|c| !c.is_guest()) {
            write!(f, "\n  {:<8} {}", c.0, c.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;

    #[test]
    fn the_scheme() {
        assert_eq!(ExitCode::from_code(7), ExitCode::app(7));
        assert_eq!(ExitCode::app(100), None);
        assert_eq!(ExitCode::app(-1), None);
        for c in [106, 109, 114, 129, 131, 255, -1, i32::MAX, i32::MIN] {
            assert_eq!(ExitCode::from_code(c), None, "{c}");
        }
        assert_eq!(ExitCode::BOOT_FAILED.code(), 105);
        assert_ne!(ExitCode::BOOT_FAILED, ExitCode::OUT_OF_MEMORY);
        assert!(ExitCode::BOOT_FAILED.is_guest() && !ExitCode::CRASH.is_guest());
        assert_eq!(ExitCode::PANIC.to_string(), "guest panicked");
        assert_eq!(
            ExitCode::app(7).unwrap().to_string(),
            "the app exited with code 7"
        );
        // RESERVED is sorted, complete and distinct.
        assert!(ExitCode::RESERVED.windows(2).all(|w| w[0] < w[1]));
        let all = (i32::from(i8::MIN)..=300).filter_map(ExitCode::from_code);
        assert_eq!(
            all.filter(|c| !c.is_app()).count(),
            ExitCode::RESERVED.len()
        );
    }

    #[test]
    fn debug_exit_mapping_fixed_points() {
        assert_eq!(ExitCode::SUCCESS.port_value(), Some(1));
        assert_eq!(ExitCode::SUCCESS.qemu_status(), Some(3));
        assert_eq!(ExitCode::BOOT_FAILED.qemu_status(), Some(213));
        assert_eq!(ExitCode::TIMEOUT.port_value(), None);
        assert_eq!(decode_status(0), QemuExit::Reset);
        assert_eq!(decode_status(1), QemuExit::QemuError);
        assert_eq!(decode_status(2), QemuExit::Unexpected(2));
        assert_eq!(decode_status(203), QemuExit::Guest(ExitCode::PANIC));
        // 2 * 110 + 3: a guest cannot claim a host-side code.
        assert_eq!(decode_status(223), QemuExit::OutsideScheme { code: 110 });
        assert_eq!(decode_status(255), QemuExit::OutsideScheme { code: 126 });
        assert_eq!(decode_status(257), QemuExit::Unexpected(257));
    }

    #[test]
    fn help_table_lists_every_code() {
        let help = HelpTable.to_string();
        for c in ExitCode::RESERVED {
            assert!(
                help.contains(&std::format!("{} {}", c.code(), c.name()))
                    || help.contains(&std::format!("{:<8} {}", c.code(), c.name())),
                "{c:?} missing from\n{help}"
            );
        }
        assert!(help.lines().all(|l| l.len() < 80), "{help}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Every guest code survives guest write → QEMU status → decode; host codes have no
        /// port value.
        #[test]
        fn exit_mapping_round_trips(code in 0i32..=255) {
            match ExitCode::from_code(code) {
                Some(c) if c.is_guest() => {
                    let status = c.qemu_status().unwrap();
                    prop_assert!((3..=255).contains(&status));
                    prop_assert_eq!(decode_status(status), QemuExit::Guest(c));
                }
                Some(c) => prop_assert_eq!(c.qemu_status(), None),
                None => prop_assert!(ExitCode::app(code).is_none()),
            }
        }

        /// Decoding never panics, and whatever decodes as a guest code encodes back to the same
        /// status.
        #[test]
        fn decode_is_total_and_consistent(status in any::<i32>()) {
            match decode_status(status) {
                QemuExit::Guest(c) => prop_assert_eq!(c.qemu_status(), Some(status)),
                QemuExit::Reset => prop_assert_eq!(status, 0),
                QemuExit::QemuError => prop_assert_eq!(status, 1),
                QemuExit::OutsideScheme { code } => {
                    prop_assert_eq!(2 * code + 3, status);
                    prop_assert!(!ExitCode::from_code(code).is_some_and(ExitCode::is_guest));
                }
                QemuExit::Unexpected(s) => {
                    prop_assert_eq!(s, status);
                    prop_assert!(!(3..=255).contains(&s) || s % 2 == 0);
                }
            }
        }
    }
}
