//! One module per subcommand of `cargo xtask`. Each owns its `clap::Args` struct and a `run`
//! that `main.rs` dispatches to; the shared machinery (building apps, the QEMU command, cargo
//! plumbing, the test harness) lives in the crate's modules below these, which never name a
//! command module. No command module uses another.

pub mod bench;
pub mod build;
pub mod httpbench;
pub mod new;
pub mod run;
pub mod test;
