//! The kernel command line: `[kernel options] [-- app arguments]`.
//!
//! Kernel options are `key=value` words: `log=off|error|warn|info|debug|trace`,
//! `share=on|off`, and `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (the words QEMU's
//! microvm, like Linux, uses to describe virtio-mmio devices; see [`virtio_mmio_devices`]). App arguments follow a lone `--`; an argument that contains spaces, quotes or
//! backslashes is written in double quotes with `\"` and `\\` escapes (xtask quotes this way).
//! Anything else is a [`CmdlineError`], reported at boot before `main` runs.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Log verbosity, as `log=` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// No log output.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    Info,
    /// Debug output.
    Debug,
    /// Everything.
    Trace,
}

/// Kernel options parsed from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `log=`: maximum log level.
    pub log: LogLevel,
    /// `share=on|off`: attach templates by reference (on) or deep-copy them (off).
    pub share: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            log: LogLevel::Info,
            share: true,
        }
    }
}

/// What is wrong with a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A word before `--` that is not `key=value`.
    NotKeyValue(&'a str),
    /// A key this kernel does not know.
    UnknownOption(&'a str),
    /// A known key with a value it does not take.
    BadValue {
        /// The option.
        key: &'a str,
        /// The rejected value.
        value: &'a str,
        /// What it accepts.
        expected: &'static str,
    },
    /// A double quote that is never closed.
    UnterminatedQuote,
    /// A backslash at the very end of the line.
    TrailingBackslash,
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::NotKeyValue(w) => write!(
                f,
                "'{w}' is not a kernel option (expected key=value; app arguments go after a lone '--')"
            ),
            CmdlineError::UnknownOption(k) => {
                write!(
                    f,
                    "unknown kernel option '{k}' (known: log=, share=, virtio_mmio.device=)"
                )
            }
            CmdlineError::BadValue {
                key,
                value,
                expected,
            } => {
                write!(f, "bad value '{value}' for '{key}' (expected {expected})")
            }
            CmdlineError::UnterminatedQuote => write!(f, "unterminated double quote"),
            CmdlineError::TrailingBackslash => write!(f, "backslash at the end of the line"),
        }
    }
}

/// Splits the line at the first lone `--`: (kernel part, app part).
fn split(line: &str) -> (&str, &str) {
    let mut rest = line;
    let mut offset = 0;
    loop {
        let trimmed = rest.trim_start();
        offset += rest.len() - trimmed.len();
        if trimmed.is_empty() {
            return (line, "");
        }
        let word_len = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        if &trimmed[..word_len] == "--" {
            return (&line[..offset], &line[offset + word_len..]);
        }
        offset += word_len;
        rest = &trimmed[word_len..];
    }
}

/// Parses the kernel options (the part before `--`). Needs no allocation.
pub fn parse_options(line: &str) -> Result<Options, CmdlineError<'_>> {
    let mut opts = Options::default();
    for word in split(line).0.split_whitespace() {
        let (key, value) = word
            .split_once('=')
            .ok_or(CmdlineError::NotKeyValue(word))?;
        match key {
            "log" => {
                opts.log = match value {
                    "off" => LogLevel::Off,
                    "error" => LogLevel::Error,
                    "warn" => LogLevel::Warn,
                    "info" => LogLevel::Info,
                    "debug" => LogLevel::Debug,
                    "trace" => LogLevel::Trace,
                    _ => {
                        return Err(CmdlineError::BadValue {
                            key,
                            value,
                            expected: "off, error, warn, info, debug or trace",
                        });
                    }
                }
            }
            "share" => {
                opts.share = match value {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(CmdlineError::BadValue {
                            key,
                            value,
                            expected: "on or off",
                        });
                    }
                }
            }
            "virtio_mmio.device" => {
                parse_virtio_mmio(value).ok_or(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "<size>@<base>:<irq>[:<id>], e.g. 512@0xfeb00e00:12",
                })?;
            }
            _ => return Err(CmdlineError::UnknownOption(key)),
        }
    }
    Ok(opts)
}

/// A virtio-mmio device announced on the command line (`virtio_mmio.device=512@0xfeb00e00:12`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Physical address of the register block.
    pub base: u64,
    /// Size of the register block in bytes.
    pub size: u64,
    /// Its interrupt line.
    pub irq: u32,
}

/// A number as Linux's `memparse` reads it: decimal or `0x` hex, optional `K`/`M`/`G` suffix.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(1 << shift)
}

fn parse_virtio_mmio(value: &str) -> Option<VirtioMmio> {
    let (size, rest) = value.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = rest.split(':').next()?.parse().ok()?;
    let v = VirtioMmio {
        base: parse_size(base)?,
        size: parse_size(size)?,
        irq,
    };
    (v.size > 0).then_some(v)
}

/// The `virtio_mmio.device=` options of the kernel part of `line` (malformed ones are skipped;
/// [`parse_options`] reports them).
pub fn virtio_mmio_devices(line: &str) -> impl Iterator<Item = VirtioMmio> + '_ {
    split(line)
        .0
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(parse_virtio_mmio)
}

/// Parses the app arguments (the part after `--`), undoing xtask's quoting.
pub fn parse_args(line: &str) -> Result<Vec<String>, CmdlineError<'_>> {
    let mut args = Vec::new();
    let mut chars = split(line).1.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(args);
        }
        let mut arg = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match c {
                '"' => quoted = !quoted,
                '\\' => match chars.next() {
                    Some(n) => arg.push(n),
                    None => return Err(CmdlineError::TrailingBackslash),
                },
                c if c.is_whitespace() && !quoted => break,
                c => arg.push(c),
            }
        }
        if quoted {
            return Err(CmdlineError::UnterminatedQuote);
        }
        args.push(arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_on_empty_line() {
        assert_eq!(parse_options("").unwrap(), Options::default());
        assert!(parse_args("").unwrap().is_empty());
        assert!(parse_args("log=debug").unwrap().is_empty());
    }

    #[test]
    fn options_then_args() {
        let line = "log=debug share=off -- one \"two words\" \"q\\\"uote\" back\\\\slash";
        let o = parse_options(line).unwrap();
        assert_eq!(
            o,
            Options {
                log: LogLevel::Debug,
                share: false
            }
        );
        assert_eq!(
            parse_args(line).unwrap(),
            ["one", "two words", "q\"uote", "back\\slash"]
        );
    }

    #[test]
    fn double_dash_inside_args_is_an_argument() {
        let line = "-- a -- b";
        assert_eq!(parse_args(line).unwrap(), ["a", "--", "b"]);
        assert_eq!(parse_options(line).unwrap(), Options::default());
    }

    #[test]
    fn empty_quoted_argument_survives() {
        assert_eq!(parse_args("-- \"\" x").unwrap(), ["", "x"]);
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(
            parse_options("verbose"),
            Err(CmdlineError::NotKeyValue("verbose"))
        );
        assert_eq!(
            parse_options("colour=red"),
            Err(CmdlineError::UnknownOption("colour"))
        );
        assert!(matches!(
            parse_options("log=loud"),
            Err(CmdlineError::BadValue { key: "log", .. })
        ));
        assert!(matches!(
            parse_options("share=yes"),
            Err(CmdlineError::BadValue { .. })
        ));
        assert_eq!(
            parse_args("-- \"open"),
            Err(CmdlineError::UnterminatedQuote)
        );
        assert_eq!(parse_args("-- end\\"), Err(CmdlineError::TrailingBackslash));
        let msg = alloc::format!("{}", parse_options("log=loud").unwrap_err());
        assert!(msg.contains("loud") && msg.contains("debug"), "{msg}");
    }

    #[test]
    fn virtio_mmio_words_are_accepted_and_recorded() {
        let line = "log=info virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=4K@0xd0000000:5:3 -- x";
        assert_eq!(parse_options(line).unwrap(), Options::default());
        let v: Vec<VirtioMmio> = virtio_mmio_devices(line).collect();
        assert_eq!(
            v,
            [
                VirtioMmio {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                },
                VirtioMmio {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                }
            ]
        );
        assert_eq!(parse_args(line).unwrap(), ["x"]);
        for bad in [
            "virtio_mmio.device=512",
            "virtio_mmio.device=512@zz:1",
            "virtio_mmio.device=0@0x1000:1",
            "virtio_mmio.device=512@0x1000:",
        ] {
            assert!(
                matches!(parse_options(bad), Err(CmdlineError::BadValue { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            virtio_mmio_devices("-- virtio_mmio.device=512@0x1000:1").count(),
            0
        );
    }

    #[test]
    fn options_after_double_dash_are_not_parsed() {
        assert_eq!(
            parse_options("-- log=nonsense").unwrap(),
            Options::default()
        );
    }
}
