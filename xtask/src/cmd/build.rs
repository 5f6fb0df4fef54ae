//! `cargo xtask build`: builds apps for `x86_64-unknown-none` and prints the path of each ELF.

use std::path::Path;

use anyhow::Result;
use clap::Args;

use crate::build_apps::{BuildOpts, SelectOpts, build_apps_selected};

#[derive(Debug, Args)]
pub struct BuildCmd {
    /// App package names (default: every app of the workspace, or the --manifest-path crate)
    #[arg(value_name = "APP")]
    apps: Vec<String>,
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    select: SelectOpts,
}

/// Builds the apps in one cargo call and prints one ELF path a line; exit code 0.
pub fn run(root: &Path, cmd: &BuildCmd) -> Result<i32> {
    for (_, elf) in build_apps_selected(root, &cmd.apps, &cmd.build, &cmd.select.selection())? {
        println!("{}", elf.display());
    }
    Ok(0)
}
