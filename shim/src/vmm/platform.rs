//! This host's platform crate, under one name: callers write
//! `platform::create_vm`, never a `cfg`.

#[cfg(target_arch = "x86_64")]
pub use platform_x86_64::*;
