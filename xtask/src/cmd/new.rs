//! `cargo xtask new`: creates a service crate outside the workspace that depends on libos by
//! path (the files come from [`crate::new_crate`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::new_crate;

#[derive(Debug, Args)]
pub struct NewCmd {
    /// Directory to create (must not exist, or be empty)
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Package name [default: from the directory name]
    #[arg(long)]
    name: Option<String>,
}

/// Creates the crate and prints how to build, boot and test it; exit code 0.
pub fn run(root: &Path, cmd: &NewCmd) -> Result<i32> {
    let manifest = new_crate::create(root, &cmd.path, cmd.name.as_deref())?;
    println!("created {}", manifest.display());
    println!(
        "build and boot it: cargo xtask run --manifest-path {}",
        manifest.display()
    );
    println!(
        "run its test case: cargo xtask test --manifest-path {}",
        manifest.display()
    );
    Ok(0)
}
