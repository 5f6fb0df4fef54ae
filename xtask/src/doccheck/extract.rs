//! Finding the fenced code examples in a Rust source file's `///` and `//!` comments, the way
//! rustdoc reads them: a doc comment block is a run of consecutive lines of one kind (`///` or
//! `//!`; `////` is a plain comment), unindented by its common leading whitespace; a fence is a
//! line of three or more backticks or tildes (at most three spaces in, CommonMark), closed by a
//! line of at least as many of the same character; the info string after the opening fence
//! decides what the example is ([`Kind`]); hidden lines (`# ` and a lone `#`) are part of the
//! code, `##` stands for a literal `#`. Every code line keeps the source line and column it came
//! from, so a compiler error in generated code can be reported at its place in the source.

use std::fmt;

/// What the info string of a fence says to do with the example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Rust that must compile (`no_run`, `should_panic`, a plain fence or `rust`): compiled,
    /// never run.
    Compile,
    /// `ignore` (or `ignore-<target>`): not compiled by rustdoc.
    Ignore,
    /// `compile_fail`, with the error codes (`E0599`) the compiler must report, if any.
    CompileFail { codes: Vec<String> },
    /// Not Rust (`text`, `toml`, `sh`, ...): not an example. Holds the info string.
    Other(String),
}

/// One line of an example's code, after hidden-line processing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeLine {
    pub text: String,
    /// 1-based line in the source file.
    pub line: usize,
    /// Byte offset in the source line at which `text` begins (a column in `text` plus this is the
    /// column in the source line, except after a `##` escape, which is one byte shorter).
    pub col: usize,
}

/// One fenced block of a doc comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// 1-based source line of the opening fence.
    pub line: usize,
    pub kind: Kind,
    pub code: Vec<CodeLine>,
}

impl Example {
    /// The code as rustdoc compiles it, one line per [`CodeLine`].
    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in &self.code {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }
}

/// A doc comment that cannot be read as rustdoc would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractError {
    /// 1-based source line.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ExtractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.line, self.message)
    }
}

/// What the info string `info` (the text after the opening fence) makes of an example.
///
/// Tokens are separated by commas and whitespace. It is Rust if it is empty, names `rust`, or
/// has no token rustdoc does not know as a doctest attribute; `compile_fail` wins over `ignore`,
/// which wins over the rest (`no_run`, `should_panic`, `edition2024`, ... all compile).
pub fn parse_info(info: &str) -> Kind {
    let tokens: Vec<&str> = info
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    let mut rust = false;
    let mut unknown = false;
    let mut ignore = false;
    let mut compile_fail = false;
    let mut codes = Vec::new();
    for t in &tokens {
        match *t {
            "rust" => rust = true,
            "no_run" | "should_panic" | "test_harness" | "standalone_crate" => {}
            "ignore" => ignore = true,
            "compile_fail" => compile_fail = true,
            t if t.starts_with("ignore-") => ignore = true,
            t if t.starts_with("edition")
                && t["edition".len()..].bytes().all(|b| b.is_ascii_digit()) => {}
            t if is_error_code(t) => codes.push(t.to_owned()),
            _ => unknown = true,
        }
    }
    if unknown && !rust {
        return Kind::Other(info.trim().to_owned());
    }
    if compile_fail {
        Kind::CompileFail { codes }
    } else if ignore {
        Kind::Ignore
    } else {
        Kind::Compile
    }
}

/// `E` and four digits: a rustc error code.
fn is_error_code(t: &str) -> bool {
    t.len() == 5 && t.starts_with('E') && t[1..].bytes().all(|b| b.is_ascii_digit())
}

/// A line's doc comment: its kind marker and the byte offset where its text begins.
fn doc_marker(line: &str) -> Option<(&'static str, usize)> {
    let indent = line.len() - line.trim_start().len();
    let rest = &line[indent..];
    if rest.starts_with("///") && !rest.starts_with("////") {
        Some(("///", indent + 3))
    } else if rest.starts_with("//!") {
        Some(("//!", indent + 3))
    } else {
        None
    }
}

/// A fence line: its character, its length and the info string after it. At most three spaces
/// of indentation; a backtick fence's info string may not contain a backtick (CommonMark), so an
/// inline code span such as "```x```" at the start of a line is text, not a fence.
fn fence(text: &str) -> Option<(char, usize, &str)> {
    let indent = text.len() - text.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &text[indent..];
    let ch = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let len = rest.len() - rest.trim_start_matches(ch).len();
    if len < 3 {
        return None;
    }
    let info = &rest[len..];
    if ch == '`' && info.contains('`') {
        return None;
    }
    Some((ch, len, info.trim()))
}

/// rustdoc's hidden-line rule for one code line: the text compiled and how many leading bytes of
/// the line it drops.
fn unhide(s: &str) -> (String, usize) {
    let trimmed = s.trim();
    let lead = s.len() - s.trim_start().len();
    if trimmed.starts_with("##") {
        (s.replacen("##", "#", 1), 0)
    } else if let Some(stripped) = trimmed.strip_prefix("# ") {
        (stripped.to_owned(), lead + 2)
    } else if trimmed == "#" {
        (String::new(), lead + 1)
    } else {
        (s.to_owned(), 0)
    }
}

/// One line of a doc comment block.
struct DocLine<'a> {
    /// 1-based source line.
    line: usize,
    /// Byte offset of `text` in the source line.
    col: usize,
    text: &'a str,
}

/// Every fenced block in the doc comments of `source`, in order. An unclosed fence is an error
/// (rustdoc would silently run it to the end of the comment).
pub fn extract(source: &str) -> Result<Vec<Example>, ExtractError> {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((kind, _)) = doc_marker(lines[i]) else {
            i += 1;
            continue;
        };
        let start = i;
        while i < lines.len() && doc_marker(lines[i]).is_some_and(|(k, _)| k == kind) {
            i += 1;
        }
        out.extend(examples_in_block(&block(&lines, start, i))?);
    }
    Ok(out)
}

/// Bytes of leading spaces and tabs (one byte each, so cutting at any count up to it is safe).
fn leading_blanks(t: &str) -> usize {
    t.len() - t.trim_start_matches([' ', '\t']).len()
}

/// Lines `start..end` (one doc comment block) unindented by their common leading spaces and tabs,
/// as rustdoc does for `///` comments.
fn block<'a>(lines: &[&'a str], start: usize, end: usize) -> Vec<DocLine<'a>> {
    let raw: Vec<(usize, &str)> = (start..end)
        .map(|n| {
            let (_, at) = doc_marker(lines[n]).expect("a doc line");
            (at, &lines[n][at..])
        })
        .collect();
    let common = raw
        .iter()
        .filter(|(_, t)| !t.trim().is_empty())
        .map(|(_, t)| leading_blanks(t))
        .min()
        .unwrap_or(0);
    raw.into_iter()
        .enumerate()
        .map(|(k, (at, t))| {
            let cut = common.min(leading_blanks(t));
            DocLine {
                line: start + k + 1,
                col: at + cut,
                text: &t[cut..],
            }
        })
        .collect()
}

fn examples_in_block(block: &[DocLine<'_>]) -> Result<Vec<Example>, ExtractError> {
    let mut out = Vec::new();
    let mut open: Option<(char, usize, usize, Example)> = None;
    for d in block {
        match open.take() {
            None => {
                if let Some((ch, len, info)) = fence(d.text) {
                    let indent = d.text.len() - d.text.trim_start_matches(' ').len();
                    let ex = Example {
                        line: d.line,
                        kind: parse_info(info),
                        code: Vec::new(),
                    };
                    open = Some((ch, len, indent, ex));
                }
            }
            Some((ch, len, indent, mut ex)) => {
                if fence(d.text).is_some_and(|(c, l, info)| c == ch && l >= len && info.is_empty())
                {
                    out.push(ex);
                    continue;
                }
                // CommonMark: content loses up to the opening fence's indentation.
                let cut = indent.min(d.text.len() - d.text.trim_start_matches(' ').len());
                let (text, dropped) = unhide(&d.text[cut..]);
                ex.code.push(CodeLine {
                    text,
                    line: d.line,
                    col: d.col + cut + dropped,
                });
                open = Some((ch, len, indent, ex));
            }
        }
    }
    match open {
        None => Ok(out),
        Some((_, _, _, ex)) => Err(ExtractError {
            line: ex.line,
            message: "code fence is never closed in this doc comment".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Cases per property, the same in every run (CI included).
    const CASES: u32 = 256;

    /// Source lines made of the pieces a doc comment can hold, with odd whitespace among them:
    /// most lines are doc comments, so blocks, fences and examples are common.
    fn source() -> impl Strategy<Value = String> {
        let indent = prop::sample::select(vec!["", "", " ", "    ", "\t"]);
        let marker = prop::sample::select(vec!["///", "///", "///", "//!", "////", "// ", ""]);
        let piece = prop::sample::select(vec![
            "```",
            "````",
            "~~~",
            "``",
            "`",
            "no_run",
            "ignore",
            "compile_fail,E0308",
            "text",
            " ",
            "  ",
            "    ",
            "\t",
            "\u{a0}",
            "\u{3000}",
            "# ",
            "#",
            "##",
            "#!",
            "x",
            "é",
            "fn f() {}",
            ",",
        ]);
        let line = (indent, marker, prop::collection::vec(piece, 0..6))
            .prop_map(|(i, m, rest)| format!("{i}{m}{}", rest.concat()));
        prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// No source makes the extractor panic, and every code line it finds maps back to its
        /// place: the source line, from the recorded column on, holds the code (trailing
        /// whitespace aside; a `##` escape is the one rewrite).
        #[test]
        fn any_source_maps_back(src in source()) {
            let lines: Vec<&str> = src.lines().collect();
            if let Ok(examples) = extract(&src) {
                for ex in &examples {
                    prop_assert!(ex.line >= 1 && ex.line <= lines.len());
                    for l in &ex.code {
                        prop_assert!(l.line > ex.line && l.line <= lines.len());
                        let line = lines[l.line - 1];
                        prop_assert!(line.is_char_boundary(l.col), "{line:?} at {}", l.col);
                        if !l.text.trim_start().starts_with('#') {
                            prop_assert_eq!(line[l.col..].trim_end(), l.text.trim_end());
                        }
                    }
                }
            }
        }
    }

    fn texts(ex: &Example) -> Vec<&str> {
        ex.code.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn info_strings() {
        assert_eq!(parse_info(""), Kind::Compile);
        assert_eq!(parse_info("rust"), Kind::Compile);
        assert_eq!(parse_info("no_run"), Kind::Compile);
        assert_eq!(parse_info("should_panic, edition2024"), Kind::Compile);
        assert_eq!(parse_info("ignore"), Kind::Ignore);
        assert_eq!(parse_info("ignore-x86_64"), Kind::Ignore);
        assert_eq!(parse_info("no_run,ignore"), Kind::Ignore);
        assert_eq!(
            parse_info("compile_fail,E0599"),
            Kind::CompileFail {
                codes: vec!["E0599".to_owned()]
            }
        );
        assert_eq!(
            parse_info("compile_fail ignore"),
            Kind::CompileFail { codes: vec![] }
        );
        assert_eq!(parse_info("text"), Kind::Other("text".to_owned()));
        assert_eq!(parse_info("toml"), Kind::Other("toml".to_owned()));
        assert_eq!(parse_info("sh,no_run"), Kind::Other("sh,no_run".to_owned()));
        assert_eq!(parse_info("rust,custom"), Kind::Compile);
        assert_eq!(parse_info("editionX"), Kind::Other("editionX".to_owned()));
        assert_eq!(parse_info("E059"), Kind::Other("E059".to_owned()));
    }

    #[test]
    fn fences_attributes_and_line_mapping() {
        let src = "\
//! Crate doc, in a module comment with no #[doc] attribute.
//!
//! ```no_run
//! let x = 1;
//! ```
use core::fmt;

/// An item.
///
/// ```ignore
/// libos::main!(main);
/// ```
///
/// ```text
/// not rust
/// ```
    /// Indented item.
    /// ```compile_fail,E0308
    /// let x: u8 = \"no\";
    /// ```
fn f() {}
";
        let ex = extract(src).unwrap();
        assert_eq!(ex.len(), 4);
        assert_eq!((ex[0].line, &ex[0].kind), (3, &Kind::Compile));
        assert_eq!(
            ex[0].code,
            vec![CodeLine {
                text: "let x = 1;".to_owned(),
                line: 4,
                col: 4
            }]
        );
        assert_eq!((ex[1].line, &ex[1].kind), (10, &Kind::Ignore));
        assert_eq!(texts(&ex[1]), ["libos::main!(main);"]);
        assert_eq!(ex[2].kind, Kind::Other("text".to_owned()));
        assert_eq!(texts(&ex[2]), ["not rust"]);
        assert_eq!(ex[3].line, 18);
        assert_eq!(
            ex[3].kind,
            Kind::CompileFail {
                codes: vec!["E0308".to_owned()]
            }
        );
        // Indented comment: the column counts the indentation and the marker.
        assert_eq!(ex[3].code[0].line, 19);
        assert_eq!(ex[3].code[0].col, 8);
        assert_eq!(&src.lines().nth(18).unwrap()[8..], "let x: u8 = \"no\";");
    }

    #[test]
    fn hidden_lines_are_compiled() {
        let src = "\
/// ```
/// # fn main() -> Result<(), ()> {
/// #
///     # let hidden = 1;
/// ## not hidden, a literal hash
/// #[derive(Debug)]
/// let shown = 2;
/// # Ok(())
/// # }
/// ```
";
        let ex = extract(src).unwrap();
        assert_eq!(
            texts(&ex[0]),
            [
                "fn main() -> Result<(), ()> {",
                "",
                "let hidden = 1;",
                "# not hidden, a literal hash",
                "#[derive(Debug)]",
                "let shown = 2;",
                "Ok(())",
                "}",
            ]
        );
        let hidden = &ex[0].code[2];
        assert_eq!(hidden.line, 4);
        assert_eq!(
            &src.lines().nth(3).unwrap()[hidden.col..],
            "let hidden = 1;"
        );
        assert_eq!(ex[0].code[0].col, 6);
    }

    #[test]
    fn nested_backticks_and_longer_fences() {
        let src = "\
/// Inline: ```not a fence``` and `x` in text; ```` ``` ```` too.
/// ```x``` starts a line but has a backtick in its info string: text.
///
/// ````no_run
/// // a doc comment that shows a fence:
/// /// ```
/// /// inner();
/// /// ```
/// let y = 2;
/// ````
/// ~~~
/// tilde();
/// ~~~
";
        let ex = extract(src).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].line, 4);
        assert_eq!(ex[0].kind, Kind::Compile);
        assert_eq!(
            texts(&ex[0]),
            [
                "// a doc comment that shows a fence:",
                "/// ```",
                "/// inner();",
                "/// ```",
                "let y = 2;"
            ]
        );
        assert_eq!(texts(&ex[1]), ["tilde();"]);
    }

    #[test]
    fn unindenting_and_blocks() {
        // A block is unindented by its common indentation (here two spaces); `////` is not a doc
        // comment and a plain line ends the block.
        let src = "\
///  Text.
///  ```
///    indented();
///  ```
//// ```
/// plain text, the fence above was a normal comment
";
        let ex = extract(src).unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(texts(&ex[0]), ["  indented();"]);
        assert_eq!(ex[0].code[0].col, 5);
        // A `///` block and a `//!` block are separate: a fence cannot span them.
        let err = extract("//! ```\n/// ```\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.message.contains("never closed"));
        let err = extract("/// ```\n/// code\nfn f() {}\n/// ```\n").unwrap_err();
        assert_eq!(err.line, 1);
    }

    #[test]
    fn fence_needs_three_and_closes_with_as_many() {
        let src = "\
/// ``
/// not code
/// ````
/// ```
/// still inside
/// `````
";
        let ex = extract(src).unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].line, 3);
        assert_eq!(texts(&ex[0]), ["```", "still inside"]);
        // A closing fence with an info string is content, not a close.
        let err = extract("/// ```\n/// ```rust\n").unwrap_err();
        assert_eq!(err.line, 1);
        // Four spaces in (after unindenting): not a fence (an indented code block, not checked).
        assert!(
            extract("/// text\n///     ```\n///     x\n")
                .unwrap()
                .is_empty()
        );
    }
}
