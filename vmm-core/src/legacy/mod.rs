//! Legacy devices (placeholder, written next).
