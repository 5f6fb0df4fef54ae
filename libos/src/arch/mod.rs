//! Hardware access. Everything that touches CPU registers, ports or descriptor tables lives here.

pub mod x86_64;
