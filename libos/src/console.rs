//! The serial console (COM1) behind [`println!`](crate::println), and the `log` backend.
//!
//! Output goes to the 16550 UART at port 0x3f8 through the `uart_16550` crate. The kernel command
//! line's `log=` option sets the log level; log lines look like `[ INFO] message`.
//!
//! Every message is formatted *before* the console lock is taken (on the stack, or in the kernel
//! heap when it is long), and the lock is held only to send its bytes: the lock keeps interrupts
//! off, so app code (a `Display` impl) must never run under it.

use crate::arch::irq::IrqMutex;
use alloc::string::String;
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

/// Writes `bytes` to COM1 under the console lock. Nothing but the byte transfer happens while the
/// lock is held (it keeps interrupts off): no formatting, no app code, no allocation.
fn write_locked(s: &str) {
    if let Some(uart) = COM1.lock().as_mut() {
        write_bytes(uart, s);
    }
}

/// Bytes of a message formatted on the stack before it needs the heap.
const STACK_BUF: usize = 256;

/// Collects one formatted message so that it can be written in one piece, after formatting has
/// finished: on the stack while it fits, then in a heap `String`. If the heap cannot grow, what
/// is collected so far is written out and collection starts over (the message is then written in
/// several pieces, but nothing is lost).
struct Collect {
    stack: [u8; STACK_BUF],
    len: usize,
    heap: String,
}

impl Collect {
    const fn new() -> Self {
        Collect {
            stack: [0; STACK_BUF],
            len: 0,
            heap: String::new(),
        }
    }

    fn as_str(&self) -> &str {
        if self.heap.is_empty() {
            // Only whole `&str`s are ever copied in, so this is valid UTF-8.
            core::str::from_utf8(&self.stack[..self.len]).unwrap_or("")
        } else {
            &self.heap
        }
    }

    fn flush(&mut self) {
        write_locked(self.as_str());
        self.len = 0;
        self.heap.clear();
    }
}

impl Write for Collect {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.heap.is_empty() && self.len + s.len() <= STACK_BUF {
            self.stack[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
            return Ok(());
        }
        let have = if self.heap.is_empty() {
            self.len
        } else {
            self.heap.len()
        };
        let need = have.saturating_add(s.len());
        if self
            .heap
            .try_reserve(need.saturating_sub(self.heap.len()))
            .is_err()
        {
            // Out of kernel heap: write what we have and go on with the stack buffer.
            self.flush();
            if s.len() > STACK_BUF {
                write_locked(s);
            } else {
                return self.write_str(s);
            }
            return Ok(());
        }
        if self.heap.is_empty() {
            self.heap
                .push_str(core::str::from_utf8(&self.stack[..self.len]).unwrap_or(""));
        }
        self.heap.push_str(s);
        Ok(())
    }
}

/// Writes formatted text to the console (used by `print!`/`println!` and the logger).
///
/// The text is formatted first and written under the console lock afterwards, so formatting may
/// do anything safe code may: lock a contended [`crate::sync::Mutex`], yield, even print (that
/// inner output comes first, as it is complete first). A message is written in one piece, so
/// lines from different tasks do not interleave.
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    if let Some(s) = args.as_str() {
        write_locked(s);
        return;
    }
    let mut c = Collect::new();
    // `Collect` itself never fails; an error comes from a `Display` impl and ends that message.
    let _ = c.write_fmt(args);
    c.flush();
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
