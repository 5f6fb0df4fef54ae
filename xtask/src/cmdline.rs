//! The guest's kernel command line (`-append`) and shell quoting for `--dry-run`.
//!
//! Format (docs/ARCHITECTURE.md): `[kernel options] [-- app arguments]`. Every app argument that
//! contains whitespace, `"` or `\` (or is empty) is written in double quotes with `\"` and `\\`
//! escapes; the guest's parser undoes this.

/// Quotes one app argument for the kernel command line.
pub fn quote_arg(arg: &str) -> String {
    let needs = arg.is_empty()
        || arg
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\');
    if !needs {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Builds the whole command line from kernel options and app arguments. The `--` separator is
/// written only when there are app arguments.
pub fn kernel_cmdline(options: &[String], args: &[String]) -> String {
    let mut parts: Vec<String> = options
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    if !args.is_empty() {
        parts.push("--".to_owned());
        parts.extend(args.iter().map(|a| quote_arg(a)));
    }
    parts.join(" ")
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
    fn plain_args_stay_plain() {
        assert_eq!(quote_arg("abc"), "abc");
        assert_eq!(quote_arg("a=b,c"), "a=b,c");
        assert_eq!(quote_arg("--flag"), "--flag");
    }

    #[test]
    fn whitespace_quotes_and_backslashes_are_quoted() {
        assert_eq!(quote_arg("a b"), r#""a b""#);
        assert_eq!(quote_arg("tab\there"), "\"tab\there\"");
        assert_eq!(quote_arg(r#"c"d"#), r#""c\"d""#);
        assert_eq!(quote_arg(r"back\slash"), r#""back\\slash""#);
        assert_eq!(quote_arg(r#"\""#), r#""\\\"""#);
        assert_eq!(quote_arg(""), r#""""#);
    }

    #[test]
    fn cmdline_layout() {
        assert_eq!(kernel_cmdline(&[], &[]), "");
        assert_eq!(kernel_cmdline(&s(&["log=debug"]), &[]), "log=debug");
        assert_eq!(
            kernel_cmdline(&s(&["log=debug", "share=off"]), &s(&["a b", "c\"d", "e"])),
            r#"log=debug share=off -- "a b" "c\"d" e"#
        );
        assert_eq!(kernel_cmdline(&[], &s(&["x"])), "-- x");
        assert_eq!(kernel_cmdline(&s(&["  ", " log=info "]), &[]), "log=info");
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
