// Build script. The CUDA backend (a later issue) compiles kernels/*.cu here; until then there
// is nothing to build, and the crate builds on any machine with a Rust toolchain.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
