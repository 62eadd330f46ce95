//! Address-range bus (placeholder, written next).
