//! The guest's kernel command line (`-append`) and shell quoting for `--dry-run`.
//!
//! Format (docs/ARCHITECTURE.md, "Kernel command line"): `[kernel options] [-- app arguments]`,
//! encoded by [`stencil_abi::cmdline::encode`], the inverse of what the guest decodes. This module
//! adds what only the host knows: how long a line each loader carries intact.

use anyhow::{Result, bail};

use crate::qemu::Machine;

/// Builds the whole command line from kernel options and app arguments. The `--` separator is
/// written only when there are app arguments. An option holding the word `--` and any NUL are
/// errors (they would change or cut what the guest receives).
pub fn kernel_cmdline(options: &[String], args: &[String]) -> Result<String> {
    match stencil_abi::cmdline::encode(options, args) {
        Ok(line) => Ok(line),
        Err(e) => bail!("cannot build the kernel command line: {e}"),
    }
}

/// The longest command line, in bytes, that reaches the guest intact on `machine` (`qboot`: q35
/// booted through qboot rather than SeaBIOS). Measured with QEMU 7.2 (the guest itself takes any
/// length its loader places below 1 MiB):
///
/// - microvm: 131,071, Linux's limit on one `execve` argument (`MAX_ARG_STRLEN`, 128 KiB with the
///   NUL); qboot's microvm loader carries all of it;
/// - q35 + qboot: 65,359 arrive intact, longer ones overwrite the memory map; we allow 65,024;
/// - q35 + SeaBIOS: 4,127 arrive intact, longer ones overwrite the PVH start info (or hang the
///   loader); we allow 4,096.
pub fn max_len(machine: Machine, qboot: bool) -> usize {
    match (machine, qboot) {
        (Machine::Microvm, _) => 131_071,
        (Machine::Q35, true) => 65_024,
        (Machine::Q35, false) => 4_096,
    }
}

/// Refuses a command line longer than [`max_len`], before QEMU could cut or mangle it.
pub fn check_len(line: &str, machine: Machine, qboot: bool) -> Result<()> {
    let max = max_len(machine, qboot);
    if line.len() > max {
        let (loader, hint) = match (machine, qboot) {
            (Machine::Microvm, _) => ("microvm", " (the host's limit on one QEMU argument)"),
            (Machine::Q35, true) => ("q35 with qboot", " (microvm carries 131071)"),
            (Machine::Q35, false) => (
                "q35 with SeaBIOS",
                " (with --firmware qboot: 65024; microvm: 131071)",
            ),
        };
        bail!(
            "the kernel command line is {} bytes; {loader} carries at most {max} intact{hint}",
            line.len()
        );
    }
    Ok(())
}

/// Quotes a word for a POSIX shell, so a `--dry-run` line can be pasted as is.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn cmdline_layout() {
        assert_eq!(kernel_cmdline(&[], &[]).unwrap(), "");
        assert_eq!(
            kernel_cmdline(&s(&["log=debug"]), &[]).unwrap(),
            "log=debug"
        );
        assert_eq!(
            kernel_cmdline(&s(&["log=debug", "share=off"]), &s(&["a b", "c\"d", "e"])).unwrap(),
            r#"log=debug share=off -- "a b" "c\"d" e"#
        );
        assert_eq!(kernel_cmdline(&[], &s(&["x"])).unwrap(), "-- x");
        assert_eq!(
            kernel_cmdline(&s(&["  ", " log=info "]), &[]).unwrap(),
            "log=info"
        );
        assert_eq!(
            kernel_cmdline(&[], &s(&["", "tab\there", r"\"])).unwrap(),
            "-- \"\" \"tab\there\" \"\\\\\""
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let e = kernel_cmdline(&s(&["log=info --"]), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("'--'"), "{e:#}");
        let e = kernel_cmdline(&[], &s(&["ok", "a\0b"])).unwrap_err();
        assert!(format!("{e:#}").contains("app argument 1"), "{e:#}");
    }

    #[test]
    fn length_limits() {
        let line = "x".repeat(max_len(Machine::Microvm, false));
        check_len(&line, Machine::Microvm, false).unwrap();
        let e = check_len(&format!("{line}y"), Machine::Microvm, false).unwrap_err();
        assert!(format!("{e}").contains("131072 bytes"), "{e}");
        let e = check_len(&"x".repeat(5003), Machine::Q35, false).unwrap_err();
        assert!(
            format!("{e}").contains("5003 bytes; q35 with SeaBIOS carries at most 4096"),
            "{e}"
        );
        check_len(&"x".repeat(4096), Machine::Q35, false).unwrap();
        assert!(check_len(&"x".repeat(4097), Machine::Q35, false).is_err());
        check_len(&"x".repeat(65_024), Machine::Q35, true).unwrap();
        assert!(check_len(&"x".repeat(65_025), Machine::Q35, true).is_err());
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-kernel"), "-kernel");
        assert_eq!(shell_quote("/a/b.elf"), "/a/b.elf");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
