//! The serial console (COM1) behind [`println!`](crate::println), and the `log` backend.
//!
//! Output goes to the 16550 UART at port 0x3f8 through the `uart_16550` crate. The kernel command
//! line's `log=` option sets the log level; log lines look like `[ INFO] message`.

use crate::sync::IrqMutex;
use core::fmt::{self, Write};
use uart_16550::Uart16550;
use uart_16550::backend::PioBackend;

static COM1: IrqMutex<Option<Uart16550<PioBackend>>> = IrqMutex::new(None);

/// Initialises COM1 (115200 8N1). Without a UART, output is silently dropped.
pub(crate) fn init() {
    // SAFETY: 0x3f8..0x400 are COM1's ports on every PC machine type QEMU offers; nothing else
    // in libos drives them.
    let Ok(mut uart) = (unsafe { Uart16550::new_port(0x3f8) }) else {
        return;
    };
    if uart.init(uart_16550::Config::default()).is_ok() {
        *COM1.lock() = Some(uart);
    }
}

fn write_bytes(uart: &mut Uart16550<PioBackend>, s: &str) {
    for b in s.bytes() {
        if b == b'\n' {
            uart.send_bytes_exact(b"\r");
        }
        uart.send_bytes_exact(&[b]);
    }
}

struct Locked<'a>(&'a mut Uart16550<PioBackend>);

impl Write for Locked<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(self.0, s);
        Ok(())
    }
}

/// Writes formatted text to the console (used by `print!`/`println!`).
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    if let Some(uart) = COM1.lock().as_mut() {
        let _ = Locked(uart).write_fmt(args);
    }
}

/// A writer for fault reports: it does not wait for the console lock (the faulting code may hold
/// it), at the price of possibly interleaving with a half-written line.
pub(crate) struct EmergencyWriter;

impl Write for EmergencyWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: COM1's ports, as in `init`; a second handle only risks interleaved output,
        // which is acceptable while reporting a fatal fault.
        if let Ok(mut uart) = unsafe { Uart16550::new_port(0x3f8) } {
            write_bytes(&mut uart, s);
        }
        Ok(())
    }
}

/// Writes a fault report without taking the console lock.
pub(crate) fn emergency_write(args: fmt::Arguments<'_>) {
    let _ = EmergencyWriter.write_fmt(args);
}

/// Prints to the serial console.
///
/// ```no_run
/// libos::print!("no newline; ");
/// ```
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
///
/// ```no_run
/// libos::println!("{} tasks spawned", 3);
/// ```
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            _print(format_args!("[{:>5}] {}\n", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the serial logger with the given maximum level.
pub(crate) fn init_logger(level: crate::cmdline::LogLevel) {
    use crate::cmdline::LogLevel;
    let filter = match level {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    };
    // Only fails if a logger is already set, which boot never does twice.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}
