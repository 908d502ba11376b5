//! Embeds the eBPF object built by `cargo xtask build-ebpf`, when it exists, and
//! generates the CA service's gRPC code from `proto/ca.proto` with protoc. A plain
//! `cargo build` does not rebuild the eBPF object; without one, the daemon reports at
//! start that it has none.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let object = std::env::var_os("INTERCEPTOR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/bpfel-unknown-none/release/interceptor"));
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = std::fs::read(&object).unwrap_or_default();
    std::fs::write(out.join("interceptor.bpf.o"), bytes).expect("OUT_DIR is writable");

    // protoc comes from Debian's protobuf-compiler; scripts/setup.sh installs it.
    if let Err(error) =
        tonic_prost_build::configure().compile_protos(&["proto/ca.proto"], &["proto"])
    {
        panic!(
            "compiling proto/ca.proto failed (is protoc installed? run scripts/setup.sh): {error}"
        );
    }
}
