//! The kernel command line: `[kernel options] [-- app arguments]`.
//!
//! How the line is split into kernel words and app arguments (and how xtask quotes arguments) is
//! defined once, in [`stencil_abi::cmdline`]; this module gives the kernel words their meaning.
//! Kernel options are `key=value` words: `log=off|error|warn|info|debug|trace`, `share=on|off`,
//! and `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (the words QEMU's microvm, like Linux, uses
//! to describe virtio-mmio devices; see [`virtio_mmio_devices`]). Anything else is a
//! [`CmdlineError`], reported at boot before `main` runs.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use stencil_abi::cmdline::{DecodeError, app_args, kernel_words};

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
    /// The app arguments are malformed (an unclosed quote, a trailing backslash).
    Args(DecodeError),
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
            CmdlineError::Args(e) => write!(f, "{e}"),
        }
    }
}

/// Parses the kernel options (the part before `--`). Needs no allocation.
pub fn parse_options(line: &str) -> Result<Options, CmdlineError<'_>> {
    let mut opts = Options::default();
    for word in kernel_words(line) {
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
/// `None` for anything else (a sign, no digits) and for a value that does not fit in 64 bits.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let (digits, radix) = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (digits, 10),
    };
    // from_str_radix also takes a leading `+`; memparse does not.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, radix)
        .ok()?
        .checked_mul(1 << shift)
}

/// A decimal `u32` (an IRQ or device id), without sign.
fn parse_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses the value of `virtio_mmio.device=`: `<size>@<base>:<irq>[:<id>]`. `None` unless it is
/// exactly that, the size is not zero and `base + size` does not wrap around.
fn parse_virtio_mmio(value: &str) -> Option<VirtioMmio> {
    let (size, rest) = value.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = match rest.split_once(':') {
        Some((irq, id)) => {
            parse_u32(id)?;
            irq
        }
        None => rest,
    };
    let v = VirtioMmio {
        base: parse_size(base)?,
        size: parse_size(size)?,
        irq: parse_u32(irq)?,
    };
    (v.size > 0 && v.base.checked_add(v.size).is_some()).then_some(v)
}

/// The `virtio_mmio.device=` options of the kernel part of `line` (malformed ones are skipped;
/// [`parse_options`] reports them).
pub fn virtio_mmio_devices(line: &str) -> impl Iterator<Item = VirtioMmio> + '_ {
    kernel_words(line)
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(parse_virtio_mmio)
}

/// Parses the app arguments (the part after `--`), undoing xtask's quoting.
pub fn parse_args(line: &str) -> Result<Vec<String>, CmdlineError<'_>> {
    app_args(line).map_err(CmdlineError::Args)
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
            Err(CmdlineError::Args(DecodeError::UnterminatedQuote {
                arg: 0
            }))
        );
        assert_eq!(
            parse_args("-- end\\"),
            Err(CmdlineError::Args(DecodeError::TrailingBackslash {
                arg: 0
            }))
        );
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

    #[test]
    fn virtio_mmio_edge_cases() {
        let ok = |w: &str| parse_virtio_mmio(w);
        assert_eq!(
            ok("1K@0x1000:5:3"),
            Some(VirtioMmio {
                base: 0x1000,
                size: 1024,
                irq: 5
            })
        );
        for bad in [
            // base + size wraps around
            "0x1000@0xfffffffffffff000:1",
            "1@18446744073709551615:1",
            // the size overflows through its suffix
            "0x400000000G@0x1000:1",
            // a sign, no digits, trailing junk, an id that is not a number, one part too many
            "+512@0x1000:1",
            "512@0x:1",
            "K@0x1000:1",
            "512@0x1000:-1",
            "512@0x1000:1:x",
            "512@0x1000:1:2:3",
            "512@0x1000:99999999999",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    mod props {
        use super::super::*;
        use alloc::format;
        use alloc::string::ToString;
        use proptest::prelude::*;

        /// How a size or base is spelled: decimal, hex, or with a K/M/G suffix.
        fn spell(n: u64, style: u8) -> String {
            match style % 5 {
                0 => n.to_string(),
                1 => format!("{n:#x}"),
                2 => format!("0X{n:X}"),
                3 if n.is_multiple_of(1 << 10) => format!("{}K", n >> 10),
                4 if n.is_multiple_of(1 << 20) => format!("{}m", n >> 20),
                _ => n.to_string(),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Every well-formed word is accepted with exactly its values; parsing arbitrary
            /// text never panics.
            #[test]
            fn virtio_mmio_accepts_every_well_formed_word(
                size in prop_oneof![1u64..=1 << 20, (1u64..=1 << 20).prop_map(|k| k << 10), 1u64..=u64::MAX],
                base_frac in any::<u64>(),
                irq in any::<u32>(),
                id in proptest::option::of(any::<u32>()),
                styles in any::<(u8, u8)>(),
            ) {
                let base = base_frac % (u64::MAX - size + 1);
                let id = id.map(|i| format!(":{i}")).unwrap_or_default();
                let word = format!("{}@{}:{irq}{id}", spell(size, styles.0), spell(base, styles.1));
                prop_assert_eq!(parse_virtio_mmio(&word), Some(VirtioMmio { base, size, irq }));
                let line = format!("log=info virtio_mmio.device={word} -- x");
                prop_assert_eq!(parse_options(&line), Ok(Options::default()));
                prop_assert_eq!(virtio_mmio_devices(&line).count(), 1);
            }

            /// A region that wraps around the address space is refused.
            #[test]
            fn virtio_mmio_rejects_wrapping(size in 1u64..=u64::MAX, over in 0u64..=u64::MAX) {
                // base >= 2^64 - size, so base + size > u64::MAX.
                let base = (u64::MAX - size + 1).saturating_add(over % size.max(1));
                let word = format!("{size}@{base:#x}:1");
                prop_assert_eq!(parse_virtio_mmio(&word), None);
                let line = format!("virtio_mmio.device={word}");
                prop_assert!(parse_options(&line).is_err());
            }

            /// The kernel-option parser never panics on arbitrary input, and on a valid option
            /// list it gives what the last `log=` / `share=` said.
            #[test]
            fn options_parse_like_the_model(
                junk in prop_oneof![any::<String>(), "[a-z_.=@:0-9x -]{0,40}"],
                opts in proptest::collection::vec((any::<bool>(), 0usize..6, any::<bool>()), 0..8),
            ) {
                let _ = parse_options(&junk);
                let _ = parse_args(&junk);
                let _ = virtio_mmio_devices(&junk).count();
                let levels = ["off", "error", "warn", "info", "debug", "trace"];
                let mut want = Options::default();
                let mut words = Vec::new();
                for (is_log, level, share) in opts {
                    if is_log {
                        words.push(format!("log={}", levels[level]));
                        want.log = [
                            LogLevel::Off,
                            LogLevel::Error,
                            LogLevel::Warn,
                            LogLevel::Info,
                            LogLevel::Debug,
                            LogLevel::Trace,
                        ][level];
                    } else {
                        words.push(format!("share={}", if share { "on" } else { "off" }));
                        want.share = share;
                    }
                }
                let line = stencil_abi::cmdline::encode(&words, &["log=bogus"]).unwrap();
                prop_assert_eq!(parse_options(&line), Ok(want));
                prop_assert_eq!(parse_args(&line).unwrap(), ["log=bogus"]);
            }
        }
    }
}
