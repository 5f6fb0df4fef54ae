//! The guest's kernel command line (`-append`) and shell quoting for `--dry-run`.
//!
//! Format (docs/ARCHITECTURE.md, "Kernel command line"): `[kernel options] [-- app arguments]`,
//! encoded by [`stencil_abi::cmdline::encode`], the inverse of what the guest decodes. How long a
//! line each loader carries intact is the machine's business: `qemu::check_cmdline_len`.

use anyhow::{Result, bail};

/// Builds the whole command line from kernel options and app arguments. The `--` separator is
/// written only when there are app arguments. An option holding the word `--` and any NUL are
/// errors (they would change or cut what the guest receives).
pub fn kernel_cmdline(options: &[String], args: &[String]) -> Result<String> {
    match stencil_abi::cmdline::encode(options, args) {
        Ok(line) => Ok(line),
        Err(e) => bail!("cannot build the kernel command line: {e}"),
    }
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
    fn shell_quoting() {
        assert_eq!(shell_quote("-kernel"), "-kernel");
        assert_eq!(shell_quote("/a/b.elf"), "/a/b.elf");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
