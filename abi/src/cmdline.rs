//! The kernel command line: one string (QEMU's `-append`, the PVH start info's `cmdline_paddr`)
//! that carries kernel options and the app's arguments.
//!
//! Layout: `[kernel words] [-- app arguments]`.
//!
//! - Kernel words are separated by whitespace (`char::is_whitespace`) and never quoted; what they
//!   mean (`log=`, `share=`, ...) is libos's business, not this module's.
//! - The first word that is exactly `--` ends the kernel words; everything after it is app
//!   arguments, `--` included.
//! - App arguments are separated by whitespace. Inside an argument `"` toggles quoting (whitespace
//!   inside quotes is part of the argument) and `\` takes the next character literally. The
//!   encoder writes an argument bare when it is non-empty and holds no whitespace, `"` or `\`;
//!   otherwise in double quotes with `\"` and `\\` escapes.
//! - The line is a C string, so no part of it can hold NUL.
//!
//! [`encode`] (xtask) and [`split`] / [`kernel_words`] / [`app_args`] (libos) are the only
//! implementations of each direction; a property test checks that they are inverse.

use core::fmt;

#[cfg(feature = "alloc")]
use alloc::{string::String, vec::Vec};

/// The word that separates kernel words from app arguments.
pub const SEPARATOR: &str = "--";

/// The longest command line (in bytes, without the terminating NUL) the guest accepts; a longer
/// one is a boot error (exit 103) that names its length. Loaders carry less (xtask knows how much
/// each one carries and refuses a longer line before booting).
pub const MAX_LEN: usize = 1 << 20;

/// Splits `line` at the first word that is exactly `--`: (kernel part, app part). The app part
/// starts right after the separator; without one it is empty.
pub fn split(line: &str) -> (&str, &str) {
    let mut offset = 0;
    loop {
        let rest = &line[offset..];
        let trimmed = rest.trim_start();
        offset += rest.len() - trimmed.len();
        if trimmed.is_empty() {
            return (line, "");
        }
        let word_len = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        if &trimmed[..word_len] == SEPARATOR {
            return (&line[..offset], &line[offset + word_len..]);
        }
        offset += word_len;
    }
}

/// The kernel words of `line` (those before the separator). Needs no allocation.
pub fn kernel_words(line: &str) -> impl Iterator<Item = &str> {
    split(line).0.split_whitespace()
}

/// What is wrong with the app-argument part of a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A double quote in app argument `arg` (0-based) is never closed.
    UnterminatedQuote {
        /// Which argument.
        arg: usize,
    },
    /// The line ends with a backslash (in app argument `arg`) that escapes nothing.
    TrailingBackslash {
        /// Which argument.
        arg: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnterminatedQuote { arg } => {
                write!(f, "unterminated double quote in app argument {arg}")
            }
            DecodeError::TrailingBackslash { arg } => write!(
                f,
                "backslash at the end of the line (app argument {arg}) escapes nothing"
            ),
        }
    }
}

/// The app arguments of `line` (those after the separator), with the quoting undone.
#[cfg(feature = "alloc")]
pub fn app_args(line: &str) -> Result<Vec<String>, DecodeError> {
    let mut args = Vec::new();
    let mut chars = split(line).1.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(args);
        }
        let index = args.len();
        let mut arg = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match c {
                '"' => quoted = !quoted,
                '\\' => match chars.next() {
                    Some(n) => arg.push(n),
                    None => return Err(DecodeError::TrailingBackslash { arg: index }),
                },
                c if c.is_whitespace() && !quoted => break,
                c => arg.push(c),
            }
        }
        if quoted {
            return Err(DecodeError::UnterminatedQuote { arg: index });
        }
        args.push(arg);
    }
}

/// Why a command line cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError<'a> {
    /// A kernel option holds the word `--`, which would start the app arguments.
    SeparatorInOptions {
        /// The option (as given).
        option: &'a str,
    },
    /// A kernel option holds NUL, which ends the C string the guest receives.
    NulInOption {
        /// The option (as given).
        option: &'a str,
    },
    /// App argument `index` (0-based) holds NUL.
    NulInArg {
        /// Which argument.
        index: usize,
    },
}

impl fmt::Display for EncodeError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::SeparatorInOptions { option } => write!(
                f,
                "kernel option {option:?} holds the word '--', which separates kernel options \
                 from app arguments; pass app arguments after '--' instead"
            ),
            EncodeError::NulInOption { option } => write!(
                f,
                "kernel option {option:?} holds a NUL character, which the kernel command line \
                 (a C string) cannot carry"
            ),
            EncodeError::NulInArg { index } => write!(
                f,
                "app argument {index} holds a NUL character, which the kernel command line \
                 (a C string) cannot carry"
            ),
        }
    }
}

/// Whether `arg` is written in quotes.
fn needs_quotes(arg: &str) -> bool {
    arg.is_empty()
        || arg
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\')
}

/// Appends app argument `arg`, quoted as the module docs say.
#[cfg(feature = "alloc")]
pub fn push_arg(out: &mut String, arg: &str) {
    if !needs_quotes(arg) {
        out.push_str(arg);
        return;
    }
    out.reserve(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Builds the command line from kernel options and app arguments.
///
/// Each option may hold several whitespace-separated words (they are kernel words either way);
/// surrounding and repeated whitespace is dropped. `--` is written only when there are app
/// arguments. The result decodes back to exactly these words and arguments.
#[cfg(feature = "alloc")]
pub fn encode<'a, O, A>(options: &'a [O], args: &[A]) -> Result<String, EncodeError<'a>>
where
    O: AsRef<str>,
    A: AsRef<str>,
{
    let mut out = String::new();
    for option in options.iter().map(AsRef::as_ref) {
        if option.contains('\0') {
            return Err(EncodeError::NulInOption { option });
        }
        for word in option.split_whitespace() {
            if word == SEPARATOR {
                return Err(EncodeError::SeparatorInOptions { option });
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    if args.is_empty() {
        return Ok(out);
    }
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(SEPARATOR);
    for (index, arg) in args.iter().map(AsRef::as_ref).enumerate() {
        if arg.contains('\0') {
            return Err(EncodeError::NulInArg { index });
        }
        out.push(' ');
        push_arg(&mut out, arg);
    }
    Ok(out)
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    extern crate std;
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn enc(options: &[&str], args: &[&str]) -> String {
        encode(options, args).unwrap()
    }

    #[test]
    fn layout() {
        assert_eq!(enc(&[], &[]), "");
        assert_eq!(enc(&["log=debug"], &[]), "log=debug");
        assert_eq!(
            enc(&["log=debug", "share=off"], &["a b", "c\"d", "e"]),
            r#"log=debug share=off -- "a b" "c\"d" e"#
        );
        assert_eq!(enc(&[], &["x"]), "-- x");
        assert_eq!(
            enc(&["  ", " log=info  share=on "], &[]),
            "log=info share=on"
        );
        assert_eq!(enc(&[], &[""]), r#"-- """#);
        assert_eq!(enc(&[], &[r"back\slash"]), r#"-- "back\\slash""#);
        assert_eq!(enc(&[], &["--", "a"]), "-- -- a");
    }

    #[test]
    fn encode_errors_are_specific() {
        assert_eq!(
            encode(&["log=info -- x"], &[] as &[&str]),
            Err(EncodeError::SeparatorInOptions {
                option: "log=info -- x"
            })
        );
        assert_eq!(
            encode(&["log=\0"], &[] as &[&str]),
            Err(EncodeError::NulInOption { option: "log=\0" })
        );
        assert_eq!(
            encode(&[] as &[&str], &["ok", "n\0ul"]),
            Err(EncodeError::NulInArg { index: 1 })
        );
        let msg = EncodeError::NulInArg { index: 1 }.to_string();
        assert!(msg.contains("argument 1") && msg.contains("NUL"), "{msg}");
    }

    #[test]
    fn decoding() {
        let line = "log=debug share=off -- one \"two words\" \"q\\\"uote\" back\\\\slash";
        assert_eq!(
            kernel_words(line).collect::<Vec<_>>(),
            ["log=debug", "share=off"]
        );
        assert_eq!(
            app_args(line).unwrap(),
            ["one", "two words", "q\"uote", "back\\slash"]
        );
        assert_eq!(app_args("-- a -- b").unwrap(), ["a", "--", "b"]);
        assert_eq!(app_args("-- \"\" x").unwrap(), ["", "x"]);
        assert!(app_args("log=debug").unwrap().is_empty());
        assert_eq!(kernel_words("-- log=x").count(), 0);
        // `--x` and `x--` are kernel words, not separators.
        assert_eq!(
            kernel_words("--x x-- --\t").collect::<Vec<_>>(),
            ["--x", "x--"]
        );
        assert_eq!(split("a --"), ("a ", ""));
        assert_eq!(
            app_args("-- ok \"open"),
            Err(DecodeError::UnterminatedQuote { arg: 1 })
        );
        assert_eq!(
            app_args("-- end\\"),
            Err(DecodeError::TrailingBackslash { arg: 0 })
        );
    }

    /// Kernel option strings: any text without NUL and without a `--` word (those are encode
    /// errors, checked separately).
    fn option() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_.]{1,12}=[ -~]{0,12}",
            any::<String>(),
            "[ \t\"\\\\=a-]{0,8}",
        ]
        .prop_map(|s| s.replace('\0', ""))
        .prop_filter("holds a `--` word", |s| {
            !s.split_whitespace().any(|w| w == SEPARATOR)
        })
    }

    /// App arguments: any Unicode but NUL, with the characters that matter over-represented.
    fn arg() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[ \t\n\"\\\\a-]{0,8}",
            Just(String::new()),
            Just("--".to_string()),
            "\\PC{0,8}",
        ]
        .prop_map(|s| s.replace('\0', ""))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// encode → (kernel_words, app_args) gives back exactly the kernel words and arguments.
        #[test]
        fn encode_then_decode_round_trips(
            options in proptest::collection::vec(option(), 0..5),
            args in proptest::collection::vec(arg(), 0..6),
        ) {
            let line = encode(&options, &args).unwrap();
            prop_assert!(!line.contains('\0'));
            let words: Vec<&str> = options.iter().flat_map(|o| o.split_whitespace()).collect();
            prop_assert_eq!(kernel_words(&line).collect::<Vec<_>>(), words);
            prop_assert_eq!(app_args(&line).unwrap(), args);
        }

        /// Decoding arbitrary text never panics; the kernel part and app part are pieces of the
        /// line, in order.
        #[test]
        fn decode_never_panics(line in prop_oneof![any::<String>(), "[ \t\"\\\\a-]{0,40}"]) {
            let (k, a) = split(&line);
            prop_assert!(line.starts_with(k) && line.ends_with(a));
            prop_assert!(k.len() + a.len() <= line.len());
            prop_assert!(kernel_words(&line).all(|w| w != SEPARATOR && !w.is_empty()));
            let _ = app_args(&line);
        }

        /// Options holding a `--` word or NUL are refused, never encoded into something else.
        #[test]
        fn bad_options_are_refused(pre in "[a-z=]{0,6}", post in "[a-z=]{0,6}", nul in any::<bool>()) {
            let option = if nul { vec![std::format!("{pre}\0{post}")] } else { vec![std::format!("{pre} -- {post}")] };
            prop_assert!(encode(&option, &[] as &[&str]).is_err());
        }
    }
}
