//! The doc-example check of `cargo xtask test` (issue #10): every fenced example in the `///`
//! and `//!` comments of `libos/src` is compiled for `x86_64-unknown-none`, with the flags every
//! app gets. rustdoc cannot do it: its doctest harness needs `std`, which the guest target lacks
//! (and most of libos's API exists only for `target_os = "none"`).
//!
//! [`extract`] finds the examples; [`generate`] turns them into app crates, written to
//! `target/doccheck/` (a workspace of its own, with a copy of the repository's `Cargo.lock`);
//! one `cargo build --keep-going` builds them all into the repository's target directory, so
//! libos and its dependencies are the very artifacts the apps use; rustc's JSON messages are
//! mapped back from the generated files to the example lines (`libos/src/task.rs:312: example
//! does not compile: ...`). The examples are compiled and linked, never run. Host-built crates
//! such as `templates` need none of this: `cargo test` runs their examples as doctests.

pub mod extract;
pub mod generate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::cargo_build::{self, BuildRequest, Selection};
use crate::proc::{self, ChildGuard, Echo, Ending, Interrupted, Stop};
use generate::{Counts, Crate, Found, Role};

/// The source trees whose doc examples are checked, relative to the workspace root.
pub const SOURCES: &[&str] = &["libos/src"];

/// The crate whose API the examples use; the generated crates depend on it and on its own
/// dependencies (an example may use them, as in a doctest).
const CRATE: &str = "libos";

/// Where the generated workspace is written, relative to the workspace root.
pub const GEN_DIR: &str = "target/doccheck";

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub counts: Counts,
    /// Files with at least one Rust example.
    pub files: usize,
    /// Examples (or fences) that failed: did not compile, compiled though `compile_fail`, or
    /// could not be read.
    pub failed: usize,
}

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// `path` relative to `root`, with `/`.
fn display(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Finds every example under [`SOURCES`]; a fence that cannot be read is printed and counted.
fn find(root: &Path, failed: &mut usize) -> Result<(Vec<Found>, usize)> {
    let mut files = Vec::new();
    for dir in SOURCES {
        rust_files(&root.join(dir), &mut files)?;
    }
    let mut found = Vec::new();
    let mut with_examples = BTreeSet::new();
    for path in &files {
        let name = display(root, path);
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
        match extract::extract(&text) {
            Ok(examples) => {
                for ex in examples {
                    if !matches!(ex.kind, extract::Kind::Other(_)) {
                        with_examples.insert(name.clone());
                    }
                    found.push(Found {
                        file: name.clone(),
                        ex,
                    });
                }
            }
            Err(e) => {
                say(&format!("{name}:{e}"));
                *failed += 1;
            }
        }
    }
    Ok((found, with_examples.len()))
}

/// Runs the check and prints what failed and a summary line.
pub fn run(root: &Path) -> Result<Report> {
    let started = Instant::now();
    let mut failed = 0;
    let (found, files) = find(root, &mut failed)?;
    let (crates, counts) = generate::plan(&found);
    if !crates.is_empty() {
        let gen_dir = root.join(GEN_DIR);
        let lib = libos_package(root)?;
        write_workspace(root, &gen_dir, &lib, &crates)?;
        say(&format!(
            "doc examples: building {} generated crate(s) in {GEN_DIR}",
            crates.len()
        ));
        let build = build(root, &gen_dir)?;
        for msg in judge(&gen_dir, &found, &crates, &build) {
            say(&msg);
            failed += 1;
        }
    }
    let c = counts;
    say(&format!(
        "doc examples: {} found in {files} files, {} compiled ({} as their own crate: they \
         define main!), {} compile_fail, {} skipped (ignore); {} ({:.1} s)",
        c.found,
        c.compiled,
        c.standalone,
        c.compile_fail,
        c.ignored,
        if failed == 0 {
            "ok".to_owned()
        } else {
            format!("{failed} FAILED")
        },
        started.elapsed().as_secs_f64()
    ));
    Ok(Report {
        counts,
        files,
        failed,
    })
}

#[derive(Debug, Deserialize)]
struct Metadata {
    packages: Vec<Package>,
}

/// What `cargo metadata` says about libos.
#[derive(Debug, Deserialize)]
struct Package {
    name: String,
    manifest_path: PathBuf,
    edition: String,
    dependencies: Vec<Dependency>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Dependency {
    pub name: String,
    pub req: String,
    pub kind: Option<String>,
    pub rename: Option<String>,
    pub optional: bool,
    pub uses_default_features: bool,
    pub features: Vec<String>,
    pub target: Option<String>,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

fn libos_package(root: &Path) -> Result<Package> {
    let out = Command::new(cargo_build::cargo())
        .current_dir(root)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let meta: Metadata =
        serde_json::from_slice(&out.stdout).context("cannot parse cargo metadata's output")?;
    meta.packages
        .into_iter()
        .find(|p| p.name == CRATE)
        .with_context(|| format!("the workspace has no `{CRATE}` package"))
}

/// A TOML basic string (JSON's string escapes are TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// One dependency line of a generated manifest, as libos declares it; `None` for what an
/// example cannot use (dev and build dependencies, optional ones).
pub fn dependency_line(d: &Dependency) -> Option<String> {
    if d.kind.is_some() || d.optional {
        return None;
    }
    let mut fields = Vec::new();
    let key = match &d.rename {
        Some(r) => {
            fields.push(format!("package = {}", toml_str(&d.name)));
            r.clone()
        }
        None => d.name.clone(),
    };
    match &d.path {
        Some(p) => fields.push(format!("path = {}", toml_str(&p.to_string_lossy()))),
        None => fields.push(format!("version = {}", toml_str(&d.req))),
    }
    if !d.uses_default_features {
        fields.push("default-features = false".to_owned());
    }
    if !d.features.is_empty() {
        let f: Vec<String> = d.features.iter().map(|f| toml_str(f)).collect();
        fields.push(format!("features = [{}]", f.join(", ")));
    }
    Some(format!("{key} = {{ {} }}", fields.join(", ")))
}

/// The `Cargo.toml` of one generated crate.
fn member_manifest(package: &str, lib: &Package) -> String {
    let dir = lib.manifest_path.parent().unwrap_or(Path::new("."));
    let mut s = format!(
        "{}\n[package]\nname = {}\nversion = \"0.0.0\"\nedition = {}\npublish = false\n\n\
         [dependencies]\n{CRATE} = {{ path = {} }}\n",
        generate::HEADER.replace("//", "#"),
        toml_str(package),
        toml_str(&lib.edition),
        toml_str(&dir.to_string_lossy())
    );
    let mut by_target: Vec<(Option<&str>, String)> = lib
        .dependencies
        .iter()
        .filter_map(|d| Some((d.target.as_deref(), dependency_line(d)?)))
        .collect();
    by_target.sort();
    let mut current = None;
    for (target, line) in by_target {
        if target != current {
            if let Some(t) = target {
                let _ = write!(s, "\n[target.{}.dependencies]\n", toml_str(t));
            }
            current = target;
        }
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// The `[profile.*]` tables of the workspace manifest, copied as they are: the generated crates
/// build with the apps' profiles (profiles apply only in the workspace root).
pub fn profile_tables(manifest: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in manifest.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            inside = t.starts_with("[profile.") || t.starts_with("[profile]");
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Writes a file only if its content changes (an unchanged source keeps cargo's build fresh).
fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn write_workspace(root: &Path, gen_dir: &Path, lib: &Package, crates: &[Crate]) -> Result<()> {
    std::fs::create_dir_all(gen_dir)
        .with_context(|| format!("cannot create {}", gen_dir.display()))?;
    // Crates of an earlier run that this one does not generate.
    let current: BTreeSet<&str> = crates.iter().map(|c| c.package.as_str()).collect();
    for entry in std::fs::read_dir(gen_dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("doccheck-") && !current.contains(name.as_ref()) {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    let members: Vec<String> = crates.iter().map(|c| toml_str(&c.package)).collect();
    let ws_manifest = std::fs::read_to_string(root.join("Cargo.toml"))
        .context("cannot read the workspace's Cargo.toml")?;
    write_if_changed(
        &gen_dir.join("Cargo.toml"),
        &format!(
            "{}\n[workspace]\nresolver = \"3\"\nmembers = [{}]\n\n{}",
            generate::HEADER.replace("//", "#"),
            members.join(", "),
            profile_tables(&ws_manifest)
        ),
    )?;
    // The dependency versions libos is tested with, and no registry look-up for them.
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))
        .context("cannot read the workspace's Cargo.lock")?;
    write_if_changed(&gen_dir.join("Cargo.lock"), &lock)?;
    for c in crates {
        let dir = gen_dir.join(&c.package);
        write_if_changed(&dir.join("Cargo.toml"), &member_manifest(&c.package, lib))?;
        write_if_changed(&dir.join("src/main.rs"), &c.source)?;
    }
    Ok(())
}

/// One rustc diagnostic, as `--message-format=json` carries it.
#[derive(Debug, Clone, Deserialize)]
pub struct Diagnostic {
    pub message: String,
    pub level: String,
    #[serde(default)]
    pub code: Option<Code>,
    #[serde(default)]
    pub spans: Vec<Span>,
    #[serde(default)]
    pub children: Vec<Diagnostic>,
    #[serde(default)]
    pub rendered: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Code {
    pub code: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Span {
    pub file_name: String,
    pub line_start: usize,
    pub column_start: usize,
    pub is_primary: bool,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub expansion: Option<Box<Expansion>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Expansion {
    pub span: Span,
}

#[derive(Debug, Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    target: Option<MessageTarget>,
    #[serde(default)]
    message: Option<Diagnostic>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct MessageTarget {
    name: String,
}

/// What the build said, by compilation target name (a generated package, or libos or one of its
/// dependencies).
#[derive(Debug, Default)]
pub struct Build {
    /// Error diagnostics (not warnings, not the "aborting due to" summary).
    pub errors: HashMap<String, Vec<Diagnostic>>,
    /// Targets that produced an executable.
    pub built: BTreeSet<String>,
    /// cargo's own stderr (shown when a failure has no compiler message to explain it).
    pub stderr: String,
}

impl Build {
    /// Adds one line of cargo's JSON output.
    pub fn add(&mut self, line: &str) {
        let Ok(msg) = serde_json::from_str::<Message>(line) else {
            return;
        };
        let Some(target) = msg.target else {
            return;
        };
        match msg.reason.as_str() {
            "compiler-message" => {
                if let Some(d) = msg.message
                    && d.level.starts_with("error")
                    && !d.message.starts_with("aborting due to")
                {
                    self.errors.entry(target.name).or_default().push(d);
                }
            }
            "compiler-artifact" if msg.executable.is_some() => {
                self.built.insert(target.name);
            }
            _ => {}
        }
    }
}

/// One `cargo build --keep-going` of the generated workspace (a `compile_fail` crate failing
/// must not stop the others), for the guest target with the apps' rustflags, into the
/// repository's target directory.
fn build(root: &Path, gen_dir: &Path) -> Result<Build> {
    cargo_build::ensure_target(gen_dir, cargo_build::TARGET)?;
    let manifest = gen_dir.join("Cargo.toml");
    let req = BuildRequest {
        dir: gen_dir,
        manifest_path: Some(&manifest),
        packages: &[],
        release: false,
    };
    let args = cargo_build::build_args(&req, &Selection::default(), cargo_build::TARGET)
        .into_iter()
        .map(|a| {
            if a.to_string_lossy().starts_with("--message-format=") {
                // rustc's diagnostics as JSON, to map them back to the examples.
                "--message-format=json".into()
            } else {
                a
            }
        });
    let mut cmd = Command::new(cargo_build::cargo());
    cmd.current_dir(gen_dir)
        .args(args)
        .args(["--workspace", "--keep-going"]);
    if std::env::var_os("CARGO_TARGET_DIR").is_none() {
        cmd.env("CARGO_TARGET_DIR", root.join("target"));
    }
    cmd.env(cargo_build::RUSTFLAGS_VAR, cargo_build::RUSTFLAGS);
    cargo_build::strip_overriding_flags(&mut cmd, cargo_build::RUSTFLAGS);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(&mut cmd, Stop::Terminate).context("cannot run cargo")?;
    let out = guard.child_mut().stdout.take().context("cargo's stdout")?;
    let err = guard.child_mut().stderr.take().context("cargo's stderr")?;
    let reader = proc::lines(
        out,
        Echo::Nowhere,
        Build::default(),
        |b: &mut Build, line| {
            b.add(line);
        },
    );
    let stderr = proc::tee(err, Echo::Nowhere);
    let ending = guard.wait(None)?;
    drop(guard);
    let mut build = reader.join().unwrap_or_default();
    build.stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    match ending {
        Ending::Exited(_) => Ok(build),
        Ending::Interrupted(sig) => Err(Interrupted(sig).into()),
        Ending::TimedOut => bail!("cargo build timed out"),
    }
}

/// A span's place in an example: the first span of its macro-expansion chain that lies in the
/// generated crate's `src/main.rs`, as (example index, source line, source column).
fn place_of(
    c: &Crate,
    found: &[Found],
    main_rs: &Path,
    gen_dir: &Path,
    span: &Span,
) -> Option<(usize, usize, usize)> {
    let mut s = Some(span);
    while let Some(sp) = s {
        let file = gen_dir.join(&sp.file_name);
        if file == main_rs
            && let Some((i, k)) = c.origin(sp.line_start)
        {
            let line = &found[i].ex.code[k];
            return Some((i, line.line, line.col + sp.column_start));
        }
        s = sp.expansion.as_ref().map(|e| &e.span);
    }
    None
}

/// The example a diagnostic is about: that of its primary span, else of any span.
fn example_of(
    c: &Crate,
    found: &[Found],
    main_rs: &Path,
    gen_dir: &Path,
    d: &Diagnostic,
) -> Option<usize> {
    let primary = d.spans.iter().filter(|s| s.is_primary);
    let rest = d.spans.iter().filter(|s| !s.is_primary);
    primary
        .chain(rest)
        .find_map(|s| place_of(c, found, main_rs, gen_dir, s))
        .map(|(i, _, _)| i)
}

/// A diagnostic in the examples' terms: its message, then each span that lies in an example as
/// `file:line:col: label` with that source line, then its notes and help.
pub fn describe(
    c: &Crate,
    found: &[Found],
    main_rs: &Path,
    gen_dir: &Path,
    d: &Diagnostic,
    out: &mut String,
) {
    let code = d
        .code
        .as_ref()
        .map(|c| format!("[{}]", c.code))
        .unwrap_or_default();
    let _ = writeln!(out, "{}{code}: {}", d.level, d.message);
    for s in &d.spans {
        if let Some((i, line, col)) = place_of(c, found, main_rs, gen_dir, s) {
            let f = &found[i];
            let label = s
                .label
                .as_deref()
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            let _ = writeln!(out, "    {}:{line}:{col}{label}", f.file);
            if let Some(l) = f.ex.code.iter().find(|l| l.line == line) {
                let _ = writeln!(out, "        {}", l.text.trim_end());
            }
        }
    }
    for child in &d.children {
        let _ = writeln!(out, "    = {}: {}", child.level, child.message);
    }
}

/// Judges the build against what each crate must do: one message per failure.
pub fn judge(gen_dir: &Path, found: &[Found], crates: &[Crate], build: &Build) -> Vec<String> {
    let mut failures: Vec<String> = Vec::new();
    let generated: BTreeSet<&str> = crates.iter().map(|c| c.package.as_str()).collect();
    // A dependency (libos itself) that does not build: no example could be checked.
    for (target, errors) in &build.errors {
        if generated.contains(target.as_str()) {
            continue;
        }
        let mut msg = format!("doc examples: `{target}` does not compile for the guest:\n");
        for d in errors {
            msg.push_str(d.rendered.as_deref().unwrap_or(&d.message));
        }
        failures.push(msg.trim_end().to_owned());
    }
    if !build.errors.keys().all(|t| generated.contains(t.as_str())) {
        return failures;
    }
    for c in crates {
        let main_rs = gen_dir.join(&c.package).join("src/main.rs");
        let errors = build.errors.get(&c.package).map_or(&[][..], Vec::as_slice);
        let built = build.built.contains(&c.package);
        match c.role {
            Role::Examples | Role::Standalone(_) => {
                let mut unplaced = Vec::new();
                let mut bad: BTreeMap<usize, Vec<&Diagnostic>> = BTreeMap::new();
                for d in errors {
                    match example_of(c, found, &main_rs, gen_dir, d) {
                        Some(i) => bad.entry(i).or_default().push(d),
                        None => unplaced.push(d),
                    }
                }
                for (&i, diagnostics) in &bad {
                    let mut msg = format!("{}: example does not compile: ", found[i].place());
                    for d in diagnostics {
                        describe(c, found, &main_rs, gen_dir, d, &mut msg);
                    }
                    failures.push(msg.trim_end().to_owned());
                }
                if let Role::Standalone(i) = c.role
                    && !unplaced.is_empty()
                    && !bad.contains_key(&i)
                {
                    let mut msg = format!("{}: example does not build: ", found[i].place());
                    for d in &unplaced {
                        msg.push_str(d.rendered.as_deref().unwrap_or(&d.message));
                    }
                    failures.push(msg.trim_end().to_owned());
                } else if !unplaced.is_empty() {
                    // Not in any one example's lines (a link error, say).
                    let mut msg =
                        format!("doc examples: {GEN_DIR}/{} does not build:\n", c.package);
                    for d in &unplaced {
                        msg.push_str(d.rendered.as_deref().unwrap_or(&d.message));
                    }
                    failures.push(msg.trim_end().to_owned());
                } else if !built && errors.is_empty() {
                    failures.push(format!(
                        "doc examples: cargo built nothing for {GEN_DIR}/{}, and rustc reported \
                         no error; cargo said:\n{}",
                        c.package,
                        build.stderr.trim_end()
                    ));
                }
            }
            Role::CompileFail(i) => {
                let f = &found[i];
                let extract::Kind::CompileFail { codes } = &f.ex.kind else {
                    continue;
                };
                let got: BTreeSet<&str> = errors
                    .iter()
                    .filter_map(|d| d.code.as_ref().map(|c| c.code.as_str()))
                    .collect();
                let missing: Vec<&str> = codes
                    .iter()
                    .map(String::as_str)
                    .filter(|c| !got.contains(c))
                    .collect();
                if built {
                    failures.push(format!(
                        "{}: example compiles, but it is marked compile_fail",
                        f.place()
                    ));
                } else if errors.is_empty() {
                    failures.push(format!(
                        "{}: compile_fail example: cargo did not build it, and rustc reported no \
                         error; cargo said:\n{}",
                        f.place(),
                        build.stderr.trim_end()
                    ));
                } else if !errors
                    .iter()
                    .any(|d| example_of(c, found, &main_rs, gen_dir, d).is_some())
                {
                    // Only the generated code around it failed: that proves nothing.
                    let mut msg = format!(
                        "{}: compile_fail example: the errors are not in its lines:\n",
                        f.place()
                    );
                    for d in errors {
                        msg.push_str(d.rendered.as_deref().unwrap_or(&d.message));
                    }
                    failures.push(msg.trim_end().to_owned());
                } else if !missing.is_empty() {
                    let mut msg = format!(
                        "{}: compile_fail example fails, but without {} (got {}):\n",
                        f.place(),
                        missing.join(", "),
                        if got.is_empty() {
                            "no error code".to_owned()
                        } else {
                            got.iter().copied().collect::<Vec<_>>().join(", ")
                        }
                    );
                    for d in errors {
                        describe(c, found, &main_rs, gen_dir, d, &mut msg);
                    }
                    failures.push(msg.trim_end().to_owned());
                }
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &str) -> Dependency {
        Dependency {
            name: name.to_owned(),
            req: "^0.15".to_owned(),
            kind: None,
            rename: None,
            optional: false,
            uses_default_features: true,
            features: vec![],
            target: None,
            path: None,
        }
    }

    #[test]
    fn dependency_lines_follow_libos() {
        assert_eq!(
            dependency_line(&dep("log")).as_deref(),
            Some(r#"log = { version = "^0.15" }"#)
        );
        let mut d = dep("x86_64");
        d.uses_default_features = false;
        d.features = vec!["instructions".to_owned()];
        assert_eq!(
            dependency_line(&d).as_deref(),
            Some(
                r#"x86_64 = { version = "^0.15", default-features = false, features = ["instructions"] }"#
            )
        );
        let mut d = dep("stencil-abi");
        d.path = Some(PathBuf::from("/ws/a \"b\"/abi"));
        d.rename = Some("abi".to_owned());
        assert_eq!(
            dependency_line(&d).as_deref(),
            Some(r#"abi = { package = "stencil-abi", path = "/ws/a \"b\"/abi" }"#)
        );
        let mut d = dep("proptest");
        d.kind = Some("dev".to_owned());
        assert_eq!(dependency_line(&d), None);
        let mut d = dep("extra");
        d.optional = true;
        assert_eq!(dependency_line(&d), None);
    }

    #[test]
    fn profiles_are_copied() {
        let m = "[workspace]\nmembers = []\n\n[profile.dev]\n# c\nopt-level = 1\n\n\
                 [workspace.lints.rust]\nx = 1\n[profile.release]\ndebug = true\n";
        assert_eq!(
            profile_tables(m),
            "[profile.dev]\n# c\nopt-level = 1\n\n[profile.release]\ndebug = true\n"
        );
    }

    const SRC: &str = "\
/// Reads.
///
/// ```no_run
/// let mut b = [0u8; 8];
///     # let hidden = missing;
/// ```
///
/// ```no_run
/// let fine = 1;
/// ```
///
/// ```compile_fail,E0308
/// let x: u8 = \"no\";
/// ```
pub fn read() {}
";

    fn setup() -> (Vec<Found>, Vec<Crate>) {
        let found = Found::all_in("libos/src/task.rs", SRC);
        let (crates, _) = generate::plan(&found);
        (found, crates)
    }

    /// The generated line (1-based) of `crate_`'s main.rs that holds `text`.
    fn line_of(c: &Crate, text: &str) -> usize {
        c.source.lines().position(|l| l.contains(text)).unwrap() + 1
    }

    fn message(target: &str, code: &str, file: &str, line: usize, col: usize) -> String {
        serde_json::json!({
            "reason": "compiler-message",
            "package_id": "x",
            "target": { "name": target, "kind": ["bin"] },
            "message": {
                "message": "cannot find value `missing` in this scope",
                "level": "error",
                "code": { "code": code },
                "spans": [{
                    "file_name": file,
                    "line_start": line,
                    "column_start": col,
                    "is_primary": true,
                    "label": "not found in this scope",
                    "expansion": null
                }],
                "children": [{ "message": "a note", "level": "help", "spans": [], "children": [] }],
                "rendered": "error[E0425]: rendered with generated paths"
            }
        })
        .to_string()
    }

    fn artifact(target: &str) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "target": { "name": target, "kind": ["bin"] },
            "executable": format!("/t/{target}")
        })
        .to_string()
    }

    #[test]
    fn errors_are_reported_at_the_example() {
        let (found, crates) = setup();
        let gen_dir = Path::new("/ws/target/doccheck");
        let ex = &crates[0];
        assert_eq!(ex.package, "doccheck-examples");
        let line = line_of(ex, "let hidden = missing;");
        let mut b = Build::default();
        // rustc names member files relative to the workspace root; `col` is 1-based in the
        // generated line, which holds the example line verbatim.
        b.add(&message(
            "doccheck-examples",
            "E0425",
            "doccheck-examples/src/main.rs",
            line,
            14,
        ));
        b.add(&artifact("doccheck-fail-task-12"));
        b.add("not json");
        b.add(r#"{"reason":"build-finished","success":false}"#);
        let failures = judge(gen_dir, &found, &crates, &b);
        assert_eq!(failures.len(), 2, "{failures:#?}");
        assert_eq!(
            failures[0],
            "libos/src/task.rs:3: example does not compile: error[E0425]: cannot find value \
             `missing` in this scope\n    \
             libos/src/task.rs:5:24: not found in this scope\n        \
             let hidden = missing;\n    \
             = help: a note"
        );
        // Column 24 of source line 5 is where `missing` is.
        assert_eq!(&SRC.lines().nth(4).unwrap()[23..], "missing;");
        assert_eq!(
            failures[1],
            "libos/src/task.rs:12: example compiles, but it is marked compile_fail"
        );
    }

    #[test]
    fn compile_fail_needs_its_error_code() {
        let (found, crates) = setup();
        let gen_dir = Path::new("/ws/target/doccheck");
        let fail = &crates[1];
        assert_eq!(fail.package, "doccheck-fail-task-12");
        let line = line_of(fail, "let x: u8");
        let file = "doccheck-fail-task-12/src/main.rs";
        let mut b = Build::default();
        b.add(&artifact("doccheck-examples"));
        b.add(&message("doccheck-fail-task-12", "E0425", file, line, 13));
        let failures = judge(gen_dir, &found, &crates, &b);
        assert_eq!(failures.len(), 1, "{failures:#?}");
        assert!(
            failures[0].starts_with(
                "libos/src/task.rs:12: compile_fail example fails, but without E0308 (got E0425):\n\
                 error[E0425]: cannot find value"
            ),
            "{}",
            failures[0]
        );
        assert!(failures[0].contains("libos/src/task.rs:13:17: not found in this scope"));
        // With the expected code it passes, and so does the examples crate that built.
        let mut b = Build::default();
        b.add(&artifact("doccheck-examples"));
        b.add(&message("doccheck-fail-task-12", "E0308", file, line, 13));
        assert_eq!(judge(gen_dir, &found, &crates, &b), Vec::<String>::new());
        // An error outside the example's lines (in the generated wrapper) does not count.
        let mut b = Build::default();
        b.add(&artifact("doccheck-examples"));
        b.add(&message("doccheck-fail-task-12", "E0308", file, 1, 1));
        let failures = judge(gen_dir, &found, &crates, &b);
        assert_eq!(failures.len(), 1, "{failures:#?}");
        assert!(failures[0].starts_with(
            "libos/src/task.rs:12: compile_fail example: the errors are not in its lines:\n\
             error[E0425]: rendered with generated paths"
        ));
    }

    #[test]
    fn a_broken_dependency_or_build_is_reported_as_such() {
        let (found, crates) = setup();
        let gen_dir = Path::new("/ws/target/doccheck");
        // libos itself fails: that is the one report (no example could be judged).
        let mut b = Build::default();
        b.add(&message("libos", "E0425", "/ws/libos/src/task.rs", 10, 1));
        let failures = judge(gen_dir, &found, &crates, &b);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].starts_with("doc examples: `libos` does not compile for the guest:"));
        assert!(failures[0].contains("rendered with generated paths"));
        // An error in no example's lines (a link error) names the generated crate.
        let mut b = Build::default();
        b.add(&message(
            "doccheck-examples",
            "E0000",
            "doccheck-examples/src/main.rs",
            1,
            1,
        ));
        let failures = judge(gen_dir, &found, &crates, &b);
        assert!(
            failures[0]
                .starts_with("doc examples: target/doccheck/doccheck-examples does not build:")
        );
        // Nothing built and nothing said (cargo failed before rustc): cargo's stderr is shown.
        let b = Build {
            stderr: "error: failed to load manifest".to_owned(),
            ..Build::default()
        };
        let failures = judge(gen_dir, &found, &crates, &b);
        assert_eq!(failures.len(), 2, "{failures:#?}");
        assert!(failures[0].ends_with("cargo said:\nerror: failed to load manifest"));
        // Warnings are not failures.
        let mut b = Build::default();
        b.add(&artifact("doccheck-examples"));
        b.add(&message(
            "doccheck-fail-task-12",
            "E0308",
            "doccheck-fail-task-12/src/main.rs",
            line_of(&crates[1], "let x: u8"),
            13,
        ));
        b.add(
            &message("doccheck-examples", "E0425", "x", 1, 1).replace("\"error\"", "\"warning\""),
        );
        assert!(judge(gen_dir, &found, &crates, &b).is_empty());
    }
}
