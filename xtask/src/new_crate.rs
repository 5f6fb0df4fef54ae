//! `cargo xtask new <path>`: a service crate outside the workspace that depends on libos by path.
//!
//! The crate gets its own `[workspace]` table (so a parent directory's workspace does not claim
//! it), a `rust-toolchain.toml` like Stencil's (stable + `x86_64-unknown-none`), a copy of
//! Stencil's `Cargo.lock` (the dependency versions libos is tested with; no registry look-up for
//! them), a `.cargo/config.toml` whose `[build] target = "x86_64-unknown-none"` makes a plain
//! `cargo check` and rust-analyzer check the crate for the guest (the crate has no host code), a
//! `.gitignore` and a small `src/main.rs`. The manifest declares one QEMU test case, run by
//! `cargo xtask test --manifest-path <path>/Cargo.toml`. It needs no build script and no linker
//! flags: `cargo xtask run --manifest-path <path>/Cargo.toml` passes them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A package name from the directory name: lower case, `-` for anything not alphanumeric,
/// starting with a letter.
pub fn package_name(dir_name: &str) -> Result<String> {
    let mut name: String = dir_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches('-').to_owned();
    match name.chars().next() {
        None => bail!("cannot make a package name from `{dir_name}`; pass --name"),
        Some(c) if !c.is_ascii_alphabetic() => name.insert_str(0, "svc-"),
        Some(_) => {}
    }
    if name == "libos" || name == "templates" || name == "test" {
        bail!("`{name}` would clash with a crate or cargo name; pass --name");
    }
    Ok(name)
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The generated `Cargo.toml`.
pub fn manifest(name: &str, libos: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
libos = {{ path = {libos} }}

[profile.dev]
# QEMU's TCG runs unoptimised kernels very slowly; a little optimisation keeps debug builds usable.
opt-level = 1

[profile.release]
debug = "line-tables-only"
# As Stencil's own workspace: one codegen unit and fat LTO, so libos's hot paths inline into the
# app whatever module they sit in.
codegen-units = 1
lto = "fat"

# Boots run by `cargo xtask test --manifest-path Cargo.toml` (Stencil's docs/xtask.md, "Declaring
# a test case").
[[package.metadata.stencil.test]]
name = "{name}-ok"
expect = ["{name}: 4 tasks read the table, sum 6", "{name}: ok"]
timeout = 60

# A workspace of its own: a Cargo workspace in a parent directory must not claim this crate.
[workspace]
"#,
        libos = toml_string(&libos.display().to_string())
    )
}

/// The generated `.cargo/config.toml`.
pub const CARGO_CONFIG: &str = r#"# A plain `cargo check` / `cargo build` and rust-analyzer build this crate for the guest target.
# `cargo xtask run` / `build` / `test` pass the target and the linker flags themselves.
[build]
target = "x86_64-unknown-none"
"#;

/// The generated `src/main.rs`: a small service that spawns tasks from a template.
pub fn main_rs(name: &str) -> String {
    MAIN_RS.replace("{name}", name)
}

const MAIN_RS: &str = r#"//! {name}: a service on the Stencil libos. Build and boot it from the Stencil checkout with
//! `cargo xtask run --manifest-path <this crate>/Cargo.toml`; Stencil's docs/guide.md explains
//! tasks (each a fork of its parent), zygotes, templates and shared heaps.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use libos::println;
use libos::process::Zygote;
use libos::space::{Kind, TemplateBuilder};
use libos::task;

libos::main!(main);

/// Where the read-only table lives in every task that attaches it.
const TABLE_VA: u64 = 0x4000_0000;

/// The warm state: ordinary Rust data, built once, used in place by every request task.
struct State {
    names: BTreeMap<u64, String>,
    served: u64,
}

fn main() -> i32 {
    println!("{name}: hello from a service on Stencil, args {:?}", libos::args());
    // A read-only template of 64 KiB: every byte of page p holds p.
    let table = match TemplateBuilder::new()
        .region("table", TABLE_VA, 64 << 10, Kind::ReadOnly, |off, page| {
            page.fill((off >> 12) as u8)
        })
        .and_then(|b| b.seal())
    {
        Ok(t) => t,
        Err(e) => {
            println!("{name}: cannot build the template: {e}");
            return 3;
        }
    };
    let names = (0..4u64).map(|n| (n, alloc::format!("page {n}"))).collect();
    let mut zygote = Zygote::new(State { names, served: 0 });
    let mut handles = Vec::new();
    for n in 0..4u64 {
        // Each task gets its own copy-on-write copy of the state, and reports by its exit code.
        match zygote.spawn(&[&table], move |state| {
            let mut b = [0u8; 1];
            if task::read(TABLE_VA + n * 4096, &mut b).is_err() {
                return -1;
            }
            state.served += 1; // this task's copy only
            match state.names.get(&n) {
                Some(s) if *s == alloc::format!("page {}", b[0]) => i32::from(b[0]),
                _ => -2,
            }
        }) {
            Ok(h) => handles.push(h),
            Err(e) => {
                println!("{name}: cannot spawn: {e}");
                return 4;
            }
        }
    }
    let mut sum = 0;
    for (n, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(v) if v == n as i32 => sum += v,
            r => {
                println!("{name}: task {n} failed: {r:?}");
                return 1;
            }
        }
    }
    println!("{name}: 4 tasks read the table, sum {sum}");
    if sum == 6 && zygote.state().served == 0 {
        println!("{name}: ok");
        0
    } else {
        1
    }
}
"#;

/// Creates the crate at `path`; returns its manifest path.
pub fn create(root: &Path, path: &Path, name: Option<&str>) -> Result<PathBuf> {
    if path.exists()
        && (path.is_file()
            || fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .next()
                .is_some())
    {
        bail!(
            "{} already exists and is not an empty directory",
            path.display()
        );
    }
    let name = match name {
        Some(n) => package_name(n)?,
        None => package_name(
            &path
                .file_name()
                .with_context(|| format!("{} has no directory name", path.display()))?
                .to_string_lossy(),
        )?,
    };
    let libos = root
        .join("libos")
        .canonicalize()
        .context("cannot find libos/ in the Stencil checkout")?;
    for sub in ["src", ".cargo"] {
        fs::create_dir_all(path.join(sub))
            .with_context(|| format!("cannot create {}", path.join(sub).display()))?;
    }
    let write = |rel: &str, text: &str| {
        fs::write(path.join(rel), text).with_context(|| format!("cannot write {rel}"))
    };
    write("Cargo.toml", &manifest(&name, &libos))?;
    write("src/main.rs", &main_rs(&name))?;
    write(".gitignore", "/target\n")?;
    write(".cargo/config.toml", CARGO_CONFIG)?;
    let toolchain = fs::read_to_string(root.join("rust-toolchain.toml"))
        .context("cannot read Stencil's rust-toolchain.toml")?;
    write("rust-toolchain.toml", &toolchain)?;
    // Stencil's lock file pins the versions libos is tested with; cargo drops what this crate
    // does not use and adds the crate itself.
    if let Ok(lock) = fs::read_to_string(root.join("Cargo.lock")) {
        write("Cargo.lock", &lock)?;
    }
    let manifest = path
        .join("Cargo.toml")
        .canonicalize()
        .context("cannot resolve the new manifest")?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names() {
        assert_eq!(package_name("my-svc").unwrap(), "my-svc");
        assert_eq!(package_name("My Service").unwrap(), "my-service");
        assert_eq!(package_name("9lives").unwrap(), "svc-9lives");
        assert!(package_name("---").is_err());
        assert!(package_name("libos").is_err());
    }

    #[test]
    fn manifest_has_its_own_workspace_and_a_quoted_path() {
        let m = manifest("svc", Path::new("/a \"b\"/libos"));
        assert!(m.contains("name = \"svc\""));
        assert!(m.contains(r#"libos = { path = "/a \"b\"/libos" }"#));
        assert!(m.trim_end().ends_with("[workspace]"));
        assert!(m.contains("name = \"svc-ok\""));
        assert!(m.contains("expect = [\"svc: 4 tasks read the table, sum 6\", \"svc: ok\"]"));
    }

    #[test]
    fn main_rs_names_the_crate() {
        let m = main_rs("svc");
        assert!(m.contains("libos::main!(main);"));
        assert!(m.contains("\"svc: ok\""));
        assert!(!m.contains("{name}"));
    }
}
