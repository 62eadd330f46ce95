//! `containerd-shim-skiff-v2`: containerd's runtime `io.containerd.skiff.v2`.
//! See [`shim::task::binary`] for the protocol.

use std::process::ExitCode;

fn main() -> ExitCode {
    if let Some(code) = shim::vmm::jail::main_if_vmm() {
        return code;
    }
    shim::task::binary::main(std::env::args_os().skip(1).collect())
}
