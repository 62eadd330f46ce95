//! Compiles `proto/agent.proto` into Rust messages and a ttrpc client/server
//! with the pure-Rust codegen (no `protoc`).
//!
//! The generated files carry inner attributes (`#![allow(..)]`), which
//! `include!` cannot take; they are stripped here and `src/lib.rs` puts the
//! equivalent outer attributes on the including modules.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize::default())
        .run()
        .expect("failed to generate ttrpc code from proto/agent.proto");
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = Path::new(&out_dir).join(name);
        let text = std::fs::read_to_string(&path).expect("generated file is readable");
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).expect("generated file is writable");
    }
}
