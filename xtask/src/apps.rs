//! Finding apps and their test cases through `cargo metadata`.
//!
//! A package is an app if its manifest lives under `apps/` or `tests/apps/` of the workspace, or
//! if it depends on `libos`. Test cases are declared in the app's own Cargo.toml as
//! `[[package.metadata.stencil.test]]` tables (see docs/xtask.md).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::parse::{MAX_TIMEOUT_SECS, MemSize};
use crate::qemu::Machine;

#[derive(Debug, Deserialize)]
pub struct Metadata {
    pub packages: Vec<Package>,
    pub workspace_root: PathBuf,
}

#[derive(Debug, Deserialize)]
pub struct Package {
    pub name: String,
    pub id: String,
    pub manifest_path: PathBuf,
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

#[derive(Debug, Deserialize)]
pub struct Dependency {
    pub name: String,
}

/// One boot of one app, as declared in `[[package.metadata.stencil.test]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// Unique case name (across all apps).
    pub name: String,
    #[serde(default)]
    pub machine: Machine,
    /// App arguments: each a string, or `{ repeat = "TEXT", chars = N, suffix = "END" }` for a
    /// long generated one (the first N characters of TEXT repeated, then the optional suffix).
    #[serde(default, deserialize_with = "arg_list")]
    pub args: Vec<String>,
    /// Extra kernel options, e.g. `log=debug`.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Expected xtask-level exit code.
    #[serde(default)]
    pub exit: i32,
    /// Substrings that must all appear in the serial output, in this order.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Substrings that must not appear in the serial output.
    #[serde(default)]
    pub reject: Vec<String>,
    /// Seconds before the VM is killed.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// Guest memory, in `--mem` syntax.
    #[serde(default = "default_mem", deserialize_with = "mem_size")]
    pub mem: MemSize,
    #[serde(default = "default_smp")]
    pub smp: u32,
    /// Build the app with `--release`.
    #[serde(default)]
    pub release: bool,
    /// Host-side HTTP script run against the guest while it runs (gives the VM a NIC with a free
    /// host port forwarded to `guest_port`); see `crate::http::HttpCheck`.
    #[serde(default)]
    pub http: Option<crate::http::HttpCheck>,
}

fn default_timeout() -> u64 {
    60
}

fn default_mem() -> MemSize {
    MemSize::DEFAULT
}

fn mem_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MemSize, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e| serde::de::Error::custom(format!("mem: {e}")))
}

/// Longest generated argument, in characters: well past what any loader carries (xtask refuses a
/// command line over 131,071 bytes anyway), and small enough to build without a second thought.
const MAX_GENERATED_CHARS: usize = 1 << 20;

/// One entry of a case's `args`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ArgSpec {
    Text(String),
    Generated {
        repeat: String,
        chars: usize,
        #[serde(default)]
        suffix: String,
    },
}

impl ArgSpec {
    fn build(self) -> Result<String, String> {
        match self {
            ArgSpec::Text(s) => Ok(s),
            ArgSpec::Generated {
                repeat,
                chars,
                suffix,
            } => {
                if repeat.is_empty() {
                    return Err("args: `repeat` must not be empty".into());
                }
                if chars > MAX_GENERATED_CHARS {
                    return Err(format!(
                        "args: `chars = {chars}` is more than {MAX_GENERATED_CHARS}"
                    ));
                }
                let mut s: String = repeat.chars().cycle().take(chars).collect();
                s.push_str(&suffix);
                Ok(s)
            }
        }
    }
}

fn arg_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<ArgSpec>::deserialize(d)?
        .into_iter()
        .map(|a| a.build().map_err(serde::de::Error::custom))
        .collect()
}

fn default_smp() -> u32 {
    1
}

/// An app package and the cases it declares.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    pub id: String,
    pub cases: Vec<TestCase>,
}

/// Runs `cargo metadata --no-deps` for the given manifest.
pub fn load(manifest: &Path) -> Result<Metadata> {
    let cargo = crate::cargo_build::cargo();
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed for {} ({})",
            manifest.display(),
            out.status
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse(json: &str) -> Result<Metadata> {
    serde_json::from_str(json).context("cannot parse cargo metadata output")
}

fn is_app(pkg: &Package, root: &Path) -> bool {
    if pkg.name == "libos" {
        return false;
    }
    let dir = pkg.manifest_path.parent().unwrap_or(Path::new(""));
    let under = |sub: &str| dir.parent() == Some(&root.join(sub));
    under("apps") || under("tests/apps") || pkg.dependencies.iter().any(|d| d.name == "libos")
}

/// Reads the `[[package.metadata.stencil.test]]` tables of one package.
pub fn cases_of(pkg: &Package) -> Result<Vec<TestCase>> {
    let Some(tests) = pkg.metadata.get("stencil").and_then(|s| s.get("test")) else {
        return Ok(Vec::new());
    };
    let cases: Vec<TestCase> = serde_json::from_value(tests.clone()).with_context(|| {
        format!(
            "package `{}` ({}): bad [[package.metadata.stencil.test]]",
            pkg.name,
            pkg.manifest_path.display()
        )
    })?;
    for c in &cases {
        if c.name.trim().is_empty() {
            bail!("package `{}`: a test case has an empty name", pkg.name);
        }
        if !(0..=255).contains(&c.exit) {
            bail!(
                "package `{}`, case `{}`: exit must be 0..=255",
                pkg.name,
                c.name
            );
        }
        if c.timeout == 0 || c.timeout > MAX_TIMEOUT_SECS {
            bail!(
                "package `{}`, case `{}`: timeout must be 1..={MAX_TIMEOUT_SECS} s",
                pkg.name,
                c.name
            );
        }
        if c.smp != 1 {
            bail!(
                "package `{}`, case `{}`: smp = {}: Stencil runs on one CPU for now",
                pkg.name,
                c.name,
                c.smp
            );
        }
    }
    Ok(cases)
}

/// Every app of the workspace, sorted by name, with its cases; case names must be unique.
pub fn apps(meta: &Metadata) -> Result<Vec<App>> {
    let mut apps = Vec::new();
    let mut names = HashSet::new();
    for pkg in &meta.packages {
        if !is_app(pkg, &meta.workspace_root) {
            continue;
        }
        let cases = cases_of(pkg)?;
        for c in &cases {
            if !names.insert(c.name.clone()) {
                bail!(
                    "test case name `{}` is used twice (last in `{}`)",
                    c.name,
                    pkg.name
                );
            }
        }
        apps.push(App {
            name: pkg.name.clone(),
            id: pkg.id.clone(),
            cases,
        });
    }
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(apps)
}

/// Finds an app by package name, or explains which apps there are.
pub fn find<'a>(apps: &'a [App], name: &str) -> Result<&'a App> {
    if let Some(app) = apps.iter().find(|a| a.name == name) {
        return Ok(app);
    }
    let list: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
    if list.is_empty() {
        bail!("unknown app `{name}`: this workspace has no apps (under apps/ or tests/apps/)")
    }
    bail!("unknown app `{name}`; the apps are: {}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"{
      "packages": [
        {"name": "libos", "id": "path+file:///ws/libos#0.1.0",
         "manifest_path": "/ws/libos/Cargo.toml", "dependencies": [], "metadata": null,
         "targets": []},
        {"name": "xtask", "id": "path+file:///ws/xtask#0.1.0",
         "manifest_path": "/ws/xtask/Cargo.toml",
         "dependencies": [{"name": "clap", "rename": null}], "metadata": null},
        {"name": "hello", "id": "path+file:///ws/apps/hello#0.1.0",
         "manifest_path": "/ws/apps/hello/Cargo.toml",
         "dependencies": [{"name": "libos"}],
         "metadata": {"stencil": {"test": [
            {"name": "hello-microvm", "args": ["a b", "c\"d"],
             "expect": ["Hello", "arg[1] = a b"]},
            {"name": "hello-q35", "machine": "q35", "exit": 3, "cmdline": ["log=debug"],
             "reject": ["panicked"], "timeout": 30, "mem": "512M", "release": true,
             "smp": 1}
         ]}, "other-tool": 1}},
        {"name": "stack", "id": "path+file:///ws/tests/apps/stack#0.1.0",
         "manifest_path": "/ws/tests/apps/stack/Cargo.toml", "dependencies": [],
         "metadata": {"stencil": {}}},
        {"name": "outside", "id": "path+file:///elsewhere/outside#0.1.0",
         "manifest_path": "/elsewhere/outside/Cargo.toml",
         "dependencies": [{"name": "libos"}], "metadata": null}
      ],
      "workspace_root": "/ws",
      "target_directory": "/ws/target",
      "version": 1
    }"#;

    #[test]
    fn discovers_apps_and_cases() {
        let meta = parse(META).unwrap();
        let apps = apps(&meta).unwrap();
        let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["hello", "outside", "stack"]);
        let hello = &apps[0];
        assert_eq!(hello.cases.len(), 2);
        let a = &hello.cases[0];
        assert_eq!(a.machine, Machine::Microvm);
        assert_eq!(a.args, ["a b", "c\"d"]);
        assert_eq!(
            (a.exit, a.timeout, a.mem.mib(), a.smp, a.release),
            (0, 60, 256, 1, false)
        );
        assert!(a.reject.is_empty() && a.cmdline.is_empty());
        let b = &hello.cases[1];
        assert_eq!(b.machine, Machine::Q35);
        assert_eq!(
            (b.exit, b.timeout, b.mem.mib(), b.smp, b.release),
            (3, 30, 512, 1, true)
        );
        assert!(apps[2].cases.is_empty());
    }

    #[test]
    fn generated_arguments() {
        let case = |args: &str| {
            serde_json::from_str::<TestCase>(&format!(r#"{{"name": "g", "args": {args}}}"#))
                .map(|c| c.args)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            case(r#"["x", {"repeat": "ab✓", "chars": 7, "suffix": "!"}]"#).unwrap(),
            ["x", "ab✓ab✓a!"]
        );
        assert_eq!(case(r#"[{"repeat": "a", "chars": 0}]"#).unwrap(), [""]);
        let long = case(r#"[{"repeat": "0123456789", "chars": 100000}]"#).unwrap();
        assert_eq!(long[0].len(), 100_000);
        assert!(long[0].ends_with("6789"));
        let empty = case(r#"[{"repeat": "", "chars": 3}]"#).unwrap_err();
        assert!(empty.contains("`repeat` must not be empty"), "{empty}");
        let huge = case(r#"[{"repeat": "a", "chars": 99999999}]"#).unwrap_err();
        assert!(huge.contains("is more than"), "{huge}");
        assert!(case(r#"[7]"#).is_err());
    }

    #[test]
    fn unknown_app_lists_apps() {
        let meta = parse(META).unwrap();
        let apps = apps(&meta).unwrap();
        let err = find(&apps, "nope").unwrap_err().to_string();
        assert!(err.contains("hello, outside, stack"), "{err}");
        assert_eq!(find(&apps, "stack").unwrap().name, "stack");
    }

    #[test]
    fn rejects_typos_and_duplicates() {
        let typo = META.replace("\"reject\"", "\"rejects\"");
        assert!(apps(&parse(&typo).unwrap()).is_err());
        let dup = META.replace("hello-q35", "hello-microvm");
        let err = apps(&parse(&dup).unwrap()).unwrap_err().to_string();
        assert!(err.contains("used twice"), "{err}");
        let bad_machine = META.replace("\"q35\"", "\"pc\"");
        assert!(apps(&parse(&bad_machine).unwrap()).is_err());
        let bad_mem = META.replace("\"512M\"", "\"0\"");
        let err = format!("{:#}", apps(&parse(&bad_mem).unwrap()).unwrap_err());
        assert!(err.contains("mem: '0' is too small"), "{err}");
        let smp = META.replace("\"smp\": 1", "\"smp\": 2");
        let err = apps(&parse(&smp).unwrap()).unwrap_err().to_string();
        assert!(err.contains("one CPU for now"), "{err}");
        let long = META.replace("\"timeout\": 30", "\"timeout\": 99999999999");
        assert!(apps(&parse(&long).unwrap()).is_err());
    }
}
