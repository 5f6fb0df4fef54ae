//! Building apps for the guest: the option groups that `build`, `run` and `test` share
//! (`--release`, `--manifest-path`, `--features`, `--bin`) and [`build_apps`], which resolves app
//! names (in the workspace, or in a crate outside it) and builds them in one cargo call through
//! [`crate::cargo_build`]. Every command that boots an app builds it here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::apps;
use crate::cargo_build::{self, Selection};

#[derive(Debug, Args)]
pub struct BuildOpts {
    /// Build with the release profile (default: dev)
    #[arg(long)]
    pub release: bool,
    /// Cargo.toml of an app crate outside the workspace (one that depends on libos by path); it
    /// builds in its own target directory
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SelectOpts {
    /// Cargo features to enable (passed to cargo as --features; repeatable, or comma-separated)
    #[arg(long, value_name = "FEATURES")]
    pub features: Vec<String>,
    /// The binary to build and boot, for a package with several (passed to cargo as --bin)
    #[arg(long, value_name = "NAME")]
    pub bin: Option<String>,
}

impl SelectOpts {
    pub fn selection(&self) -> Selection {
        Selection {
            features: self.features.clone(),
            bin: self.bin.clone(),
        }
    }
}

/// Builds the named apps (or all of them) in one cargo call; returns (package, ELF) pairs.
pub fn build_apps(
    root: &Path,
    names: &[String],
    opts: &BuildOpts,
) -> Result<Vec<(String, PathBuf)>> {
    build_apps_selected(root, names, opts, &Selection::default())
}

/// [`build_apps`] with `--features` / `--bin`.
pub fn build_apps_selected(
    root: &Path,
    names: &[String],
    opts: &BuildOpts,
    sel: &Selection,
) -> Result<Vec<(String, PathBuf)>> {
    let (dir, manifest, wanted) = match &opts.manifest_path {
        Some(m) => {
            let m = m
                .canonicalize()
                .with_context(|| format!("--manifest-path {}", m.display()))?;
            let meta = apps::load(&m)?;
            let wanted: Vec<(String, String)> = if names.is_empty() {
                let pkg = meta
                    .packages
                    .iter()
                    .find(|p| p.manifest_path == m)
                    .with_context(|| {
                        format!("{} has no [package]; name the app to build", m.display())
                    })?;
                vec![(pkg.name.clone(), pkg.id.clone())]
            } else {
                names
                    .iter()
                    .map(|n| {
                        let pkg =
                            meta.packages
                                .iter()
                                .find(|p| &p.name == n)
                                .with_context(|| {
                                    format!("no package `{n}` in the workspace of {}", m.display())
                                })?;
                        Ok((pkg.name.clone(), pkg.id.clone()))
                    })
                    .collect::<Result<_>>()?
            };
            let dir = m.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, Some(m), wanted)
        }
        None => {
            let meta = apps::load(&root.join("Cargo.toml"))?;
            let all = apps::apps(&meta)?;
            let wanted: Vec<(String, String)> = if names.is_empty() {
                all.iter().map(|a| (a.name.clone(), a.id.clone())).collect()
            } else {
                names
                    .iter()
                    .map(|n| apps::find(&all, n).map(|a| (a.name.clone(), a.id.clone())))
                    .collect::<Result<_>>()?
            };
            if wanted.is_empty() {
                bail!("this workspace has no apps (under apps/ or tests/apps/)");
            }
            (root.to_path_buf(), None, wanted)
        }
    };
    let packages: Vec<String> = wanted.iter().map(|(n, _)| n.clone()).collect();
    if sel.bin.is_some() && packages.len() != 1 {
        bail!(
            "--bin picks a binary of one app; name the app ({} selected: {})",
            packages.len(),
            packages.join(", ")
        );
    }
    let req = cargo_build::BuildRequest {
        dir: &dir,
        manifest_path: manifest.as_deref(),
        packages: &packages,
        release: opts.release,
    };
    let artifacts = cargo_build::build_selected(&req, sel)?;
    let map = cargo_build::executables_by_package(&artifacts, &wanted, sel.bin.as_deref())?;
    Ok(packages
        .into_iter()
        .map(|n| {
            let elf = map[&n].clone();
            (n, elf)
        })
        .collect())
}
