//! Puts `stencil.ld` on the linker search path of every binary that depends on libos, so an app
//! links with `-C link-arg=-Tstencil.ld` and needs no build script of its own.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rerun-if-changed=stencil.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
