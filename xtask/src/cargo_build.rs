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
pub fn strip_overriding_flags(cmd: &mut Command, flags: &str) {
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

/// True if `sysroot` (from `rustc --print sysroot`) holds the standard library for `target`:
/// `lib/rustlib/<target>/lib/libcore-*.rlib`.
pub fn sysroot_has_target(sysroot: &Path, target: &str) -> bool {
    let lib = sysroot.join("lib/rustlib").join(target).join("lib");
    std::fs::read_dir(lib).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libcore-") && name.ends_with(".rlib")
        })
    })
}

/// The rustup toolchain a sysroot belongs to: `<RUSTUP_HOME>/toolchains/<name>`.
pub fn rustup_toolchain_of(sysroot: &Path) -> Option<String> {
    if sysroot.parent()?.file_name()? != "toolchains" {
        return None;
    }
    sysroot.file_name()?.to_str().map(str::to_owned)
}

/// Makes sure the toolchain that builds in `dir` has `target`'s standard library: rustup 1.29
/// does not install rust-toolchain.toml's `targets` when the channel is already installed. If
/// it is missing, prints one line and runs `rustup target add`; fails with the exact command
/// if that is impossible. Checked once per (directory, target) per xtask run.
pub fn ensure_target(dir: &Path, target: &str) -> Result<()> {
    static CHECKED: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let key = (dir.to_path_buf(), target.to_owned());
    if CHECKED.lock().is_ok_and(|c| c.contains(&key)) {
        return Ok(());
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .current_dir(dir)
        .args(["--print", "sysroot"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", rustc.to_string_lossy()))?;
    if !out.status.success() {
        bail!("`rustc --print sysroot` failed ({})", out.status);
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot_has_target(&sysroot, target) {
        install_target(&sysroot, target)?;
    }
    if let Ok(mut c) = CHECKED.lock() {
        c.push(key);
    }
    Ok(())
}

fn install_target(sysroot: &Path, target: &str) -> Result<()> {
    let Some(toolchain) = rustup_toolchain_of(sysroot) else {
        bail!(
            "the Rust standard library for {target} is missing from {} (not a rustup \
             toolchain, so xtask cannot add it); install it, e.g. with: rustup target add {target}",
            sysroot.display()
        );
    };
    let command = format!("rustup target add {target} --toolchain {toolchain}");
    eprintln!("stencil: the {target} target is not installed for {toolchain}; running: {command}");
    let status = Command::new("rustup")
        .args(["target", "add", target, "--toolchain", &toolchain])
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() && sysroot_has_target(sysroot, target) => Ok(()),
        Ok(s) if s.success() => bail!(
            "`{command}` succeeded but {} still lacks {target}; run it yourself and check \
             `rustup target list --installed --toolchain {toolchain}`",
            sysroot.display()
        ),
        Ok(s) => bail!("`{command}` failed ({s}); run it yourself: {command}"),
        Err(e) => bail!("cannot run rustup ({e}); install the target with: {command}"),
    }
}

/// Cargo options beyond the package selection: `--features` and `--bin`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Passed as `--features` (cargo splits on commas and spaces).
    pub features: Vec<String>,
    /// Passed as `--bin`; the one binary to build and boot.
    pub bin: Option<String>,
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

/// Runs one `cargo build` of apps (with `--features` / `--bin` from `sel`) and returns every
/// binary it produced (fresh or rebuilt).
pub fn build_selected(req: &BuildRequest<'_>, sel: &Selection) -> Result<Vec<Artifact>> {
    build_inner(req, sel, TARGET, RUSTFLAGS_VAR, RUSTFLAGS)
}

/// Like [`build_selected`], for another target with its own rustflags (`rustflags_var` is cargo's
/// `CARGO_TARGET_<TRIPLE>_RUSTFLAGS` variable for it).
pub fn build_for(
    req: &BuildRequest<'_>,
    target: &str,
    rustflags_var: &str,
    rustflags: &str,
) -> Result<Vec<Artifact>> {
    build_inner(req, &Selection::default(), target, rustflags_var, rustflags)
}

/// The arguments of the `cargo build` that [`build_selected`] runs.
pub fn build_args(req: &BuildRequest<'_>, sel: &Selection, target: &str) -> Vec<OsString> {
    let mut a: Vec<OsString> = [
        "build",
        "--target",
        target,
        "--message-format=json-render-diagnostics",
    ]
    .map(OsString::from)
    .to_vec();
    if req.release {
        a.push("--release".into());
    }
    if let Some(m) = req.manifest_path {
        a.push("--manifest-path".into());
        a.push(m.into());
    }
    for p in req.packages {
        a.extend(["-p".into(), p.into()]);
    }
    for f in &sel.features {
        a.extend(["--features".into(), f.into()]);
    }
    if let Some(bin) = &sel.bin {
        a.extend(["--bin".into(), bin.into()]);
    }
    a
}

fn build_inner(
    req: &BuildRequest<'_>,
    sel: &Selection,
    target: &str,
    rustflags_var: &str,
    rustflags: &str,
) -> Result<Vec<Artifact>> {
    ensure_target(req.dir, target)?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(req.dir).args(build_args(req, sel, target));
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
        Ending::Interrupted(sig) => Err(crate::proc::Interrupted(sig).into()),
        Ending::TimedOut => unreachable!("no deadline"),
    }
}

/// Chooses each package's executable: the `--bin` one if given, else its only bin. A package
/// with several bins needs `--bin` (the error lists them).
pub fn executables_by_package(
    artifacts: &[Artifact],
    wanted: &[(String, String)],
    bin: Option<&str>,
) -> Result<HashMap<String, PathBuf>> {
    let mut map = HashMap::new();
    for (name, id) in wanted {
        let bins: Vec<&Artifact> = artifacts.iter().filter(|a| &a.package_id == id).collect();
        let list = || {
            bins.iter()
                .map(|a| a.target_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen = match bin {
            Some(b) => bins.iter().find(|a| a.target_name == b),
            None if bins.len() == 1 => bins.first(),
            None => None,
        };
        match chosen {
            Some(a) => {
                map.insert(name.clone(), a.executable.clone());
            }
            None if bins.is_empty() => bail!("cargo built no executable for `{name}`"),
            None => match bin {
                Some(b) => bail!(
                    "package `{name}` has no binary `{b}`; its binaries are: {}",
                    list()
                ),
                None => bail!(
                    "package `{name}` has several binaries ({}); pick one with --bin NAME",
                    list()
                ),
            },
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
        let both = [other.clone(), a.clone()];
        let err = executables_by_package(&both, &wanted, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("several binaries (tool, hello); pick one with --bin")
        );
        let map = executables_by_package(&both, &wanted, Some("hello")).unwrap();
        assert_eq!(map["hello"], a.executable);
        let map = executables_by_package(&both, &wanted, Some("tool")).unwrap();
        assert_eq!(map["hello"], Path::new("/ws/tool"));
        let err = executables_by_package(&both, &wanted, Some("nope")).unwrap_err();
        assert!(
            err.to_string()
                .contains("no binary `nope`; its binaries are: tool, hello")
        );
        let map = executables_by_package(std::slice::from_ref(&other), &wanted, None).unwrap();
        assert_eq!(map["hello"], Path::new("/ws/tool"));
        assert!(executables_by_package(&[], &wanted, None).is_err());
    }

    #[test]
    fn features_and_bin_go_to_cargo() {
        let packages = ["svc".to_owned()];
        let req = BuildRequest {
            dir: Path::new("/x"),
            manifest_path: Some(Path::new("/x/Cargo.toml")),
            packages: &packages,
            release: true,
        };
        let sel = Selection {
            features: vec!["a,b".to_owned(), "c".to_owned()],
            bin: Some("tool".to_owned()),
        };
        let args: Vec<String> = build_args(&req, &sel, TARGET)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "build --target x86_64-unknown-none --message-format=json-render-diagnostics \
             --release --manifest-path /x/Cargo.toml -p svc --features a,b --features c --bin tool"
        );
        let plain = build_args(&req, &Selection::default(), TARGET);
        assert!(!plain.iter().any(|a| a == "--features" || a == "--bin"));
    }

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn target_detection_in_a_sysroot() {
        let root = Scratch(
            std::env::temp_dir().join(format!("stencil-sysroot-test-{}", std::process::id())),
        );
        let sysroot = root.0.join("toolchains/stable-x86_64-unknown-linux-gnu");
        let lib = sysroot.join("lib/rustlib/x86_64-unknown-none/lib");
        std::fs::create_dir_all(&lib).unwrap();
        // Only the manifest, no libcore: what a removed target leaves behind.
        std::fs::write(
            sysroot.join("lib/rustlib/manifest-rust-std-x86_64-unknown-none"),
            "",
        )
        .unwrap();
        assert!(!sysroot_has_target(&sysroot, TARGET));
        std::fs::write(lib.join("liballoc-0123abcd.rlib"), "").unwrap();
        assert!(!sysroot_has_target(&sysroot, TARGET));
        std::fs::write(lib.join("libcore-0123abcd.rlib"), "").unwrap();
        assert!(sysroot_has_target(&sysroot, TARGET));
        assert!(!sysroot_has_target(&sysroot, "aarch64-unknown-none"));
        assert!(!sysroot_has_target(&root.0.join("missing"), TARGET));
        assert_eq!(
            rustup_toolchain_of(&sysroot).as_deref(),
            Some("stable-x86_64-unknown-linux-gnu")
        );
        assert_eq!(rustup_toolchain_of(Path::new("/usr/local")), None);
        assert_eq!(rustup_toolchain_of(Path::new("/")), None);
    }

    /// The toolchain running this test builds for this host, so its sysroot has the host
    /// target.
    #[test]
    fn this_toolchain_has_the_host_target() {
        let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
            .args(["--print", "sysroot"])
            .output()
            .unwrap();
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            sysroot_has_target(&sysroot, "x86_64-unknown-linux-gnu"),
            "{sysroot:?}"
        );
    }
}
