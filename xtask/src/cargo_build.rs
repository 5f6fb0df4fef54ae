//! Building apps for `x86_64-unknown-none` and finding their ELF files in cargo's JSON messages.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::proc::{self, ChildGuard, Echo, Ending, Stop};

pub const TARGET: &str = "x86_64-unknown-none";
pub const RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_NONE_RUSTFLAGS";
/// The target rustflags of docs/ARCHITECTURE.md ("Building an app").
pub const RUSTFLAGS: &str =
    "-C relocation-model=static -C force-frame-pointers=yes -C link-arg=-Tstencil.ld";

/// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Removes RUSTFLAGS / CARGO_ENCODED_RUSTFLAGS from a cargo command (they would replace the target
/// rustflags), warning once.
fn strip_overriding_flags(cmd: &mut Command, flags: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        if std::env::var_os(var).is_some() {
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "stencil: warning: {var} is set; it would replace the target rustflags \
                     ({flags}), so it is unset for the build"
                );
            }
            cmd.env_remove(var);
        }
    }
}

/// What to build.
#[derive(Debug)]
pub struct BuildRequest<'a> {
    /// Directory to run cargo in (its .cargo/config.toml applies).
    pub dir: &'a Path,
    /// `--manifest-path` (a crate outside the workspace), if any.
    pub manifest_path: Option<&'a Path>,
    /// Packages for `-p`; empty with a manifest path: that manifest's package.
    pub packages: &'a [String],
    pub release: bool,
}

/// A built executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub package_id: String,
    pub manifest_path: PathBuf,
    pub target_name: String,
    pub executable: PathBuf,
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    package_id: String,
    #[serde(default)]
    manifest_path: PathBuf,
    #[serde(default)]
    target: Option<MessageTarget>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct MessageTarget {
    name: String,
    kind: Vec<String>,
}

/// Picks a binary artifact out of one line of `--message-format=json` output.
pub fn parse_artifact(line: &str) -> Option<Artifact> {
    let msg: Message = serde_json::from_str(line).ok()?;
    if msg.reason != "compiler-artifact" {
        return None;
    }
    let target = msg.target?;
    if !target.kind.iter().any(|k| k == "bin") {
        return None;
    }
    Some(Artifact {
        package_id: msg.package_id,
        manifest_path: msg.manifest_path,
        target_name: target.name,
        executable: msg.executable?,
    })
}

/// Runs one `cargo build` of apps and returns every binary it produced (fresh or rebuilt).
pub fn build(req: &BuildRequest<'_>) -> Result<Vec<Artifact>> {
    build_for(req, TARGET, RUSTFLAGS_VAR, RUSTFLAGS)
}

/// Like [`build`], for another target with its own rustflags (`rustflags_var` is cargo's
/// `CARGO_TARGET_<TRIPLE>_RUSTFLAGS` variable for it).
pub fn build_for(
    req: &BuildRequest<'_>,
    target: &str,
    rustflags_var: &str,
    rustflags: &str,
) -> Result<Vec<Artifact>> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(req.dir).args([
        "build",
        "--target",
        target,
        "--message-format=json-render-diagnostics",
    ]);
    if req.release {
        cmd.arg("--release");
    }
    if let Some(m) = req.manifest_path {
        cmd.arg("--manifest-path").arg(m);
    }
    for p in req.packages {
        cmd.args(["-p", p]);
    }
    cmd.env(rustflags_var, rustflags);
    strip_overriding_flags(&mut cmd, rustflags);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard = ChildGuard::spawn(&mut cmd, Stop::Terminate).context("cannot run cargo")?;
    let out = guard.child_mut().stdout.take().expect("piped");
    let reader = proc::lines(
        out,
        Echo::Nowhere,
        Vec::new(),
        |found: &mut Vec<Artifact>, line| {
            found.extend(parse_artifact(line));
        },
    );
    let ending = guard.wait(None)?;
    drop(guard);
    let found = reader.join().unwrap_or_default();
    match ending {
        Ending::Exited(status) if status.success() => Ok(found),
        Ending::Exited(status) => bail!("cargo build failed ({status})"),
        Ending::Interrupted(sig) => Err(crate::Interrupted(sig).into()),
        Ending::TimedOut => unreachable!("no deadline"),
    }
}

/// Chooses each package's executable: the bin named like the package, else its only bin.
pub fn executables_by_package(
    artifacts: &[Artifact],
    wanted: &[(String, String)],
) -> Result<HashMap<String, PathBuf>> {
    let mut map = HashMap::new();
    for (name, id) in wanted {
        let bins: Vec<&Artifact> = artifacts.iter().filter(|a| &a.package_id == id).collect();
        let chosen = bins
            .iter()
            .find(|a| &a.target_name == name)
            .or_else(|| if bins.len() == 1 { bins.first() } else { None });
        match chosen {
            Some(a) => {
                map.insert(name.clone(), a.executable.clone());
            }
            None if bins.is_empty() => bail!("cargo built no executable for `{name}`"),
            None => bail!(
                "package `{name}` has several binaries ({}); none is named `{name}`",
                bins.iter()
                    .map(|a| a.target_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ART: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///ws/apps/hello#0.1.0","manifest_path":"/ws/apps/hello/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"hello","src_path":"/ws/apps/hello/src/main.rs","edition":"2024","doc":true,"doctest":false,"test":true},"profile":{},"features":[],"filenames":["/ws/target/x86_64-unknown-none/debug/hello"],"executable":"/ws/target/x86_64-unknown-none/debug/hello","fresh":true}"#;
    const LIB: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///ws/libos#0.1.0","manifest_path":"/ws/libos/Cargo.toml","target":{"kind":["lib"],"name":"libos"},"filenames":["/ws/target/x86_64-unknown-none/debug/liblibos.rlib"],"executable":null,"fresh":true}"#;

    #[test]
    fn artifacts_from_json() {
        let a = parse_artifact(ART).unwrap();
        assert_eq!(a.target_name, "hello");
        assert_eq!(
            a.executable,
            Path::new("/ws/target/x86_64-unknown-none/debug/hello")
        );
        assert_eq!(parse_artifact(LIB), None);
        assert_eq!(
            parse_artifact(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(parse_artifact("not json"), None);
    }

    #[test]
    fn choosing_executables() {
        let a = parse_artifact(ART).unwrap();
        let mut other = a.clone();
        other.target_name = "tool".to_owned();
        other.executable = "/ws/tool".into();
        let id = a.package_id.clone();
        let wanted = [("hello".to_owned(), id.clone())];
        let map = executables_by_package(&[other.clone(), a.clone()], &wanted).unwrap();
        assert_eq!(map["hello"], a.executable);
        let map = executables_by_package(&[other.clone()], &wanted).unwrap();
        assert_eq!(map["hello"], Path::new("/ws/tool"));
        let mut third = other.clone();
        third.target_name = "x".to_owned();
        assert!(executables_by_package(&[other, third], &wanted).is_err());
        assert!(executables_by_package(&[], &wanted).is_err());
    }
}
