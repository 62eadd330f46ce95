//! Messages and the ttrpc client/server of `proto/agent.proto`
//! (package `skiff.agent.v1`), generated at build time.

/// Protocol messages.
#[allow(
    missing_docs,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    rust_2018_idioms,
    unused_qualifications,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The `Agent` service: `AgentClient`, the `Agent` server trait and
/// `create_agent` to register an implementation.
#[allow(
    missing_docs,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    rust_2018_idioms,
    unused_qualifications,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}
