//! What the host hands a guest restored from a VM snapshot so it shares
//! nothing with its template or the other clones, through
//! [`AgentClient::refresh_guest`](crate::agent_client::AgentClient::refresh_guest):
//! fresh randomness from the host's CRNG ([`host_entropy`]) and a new
//! machine id ([`new_machine_id`]). The clock needs nothing here: the
//! caller passes `SystemTime::now()`.
//!
//! Plain functions over `getrandom(2)`; no VM, sandbox or agent knowledge.

use std::fmt::Write;

/// Bytes of host randomness to send in one refresh: 256 bits, what the
/// guest's CRNG needs to count as seeded, twice over.
pub const REFRESH_ENTROPY_BYTES: usize = 64;

/// `len` bytes from the host's CRNG (`getrandom(2)`, blocking only until
/// the host's pool is initialised, which on a running host it is).
pub fn host_entropy(len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes to `rest`,
        // which is valid for writes for the call.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // A signal may cut a large request short; ask for the rest.
        filled += got as usize;
    }
    Ok(buf)
}

/// A fresh machine id: 16 random bytes as 32 lowercase hex chars, with the
/// UUID v4 version and variant bits set as systemd's `sd_id128_randomize`
/// does (so never all zeros, which machine-id(5) forbids).
pub fn new_machine_id() -> std::io::Result<String> {
    let mut bytes = host_entropy(16)?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut id = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        let _ = write!(id, "{byte:02x}");
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_entropy_is_fresh_each_call() {
        let a = host_entropy(REFRESH_ENTROPY_BYTES).unwrap();
        let b = host_entropy(REFRESH_ENTROPY_BYTES).unwrap();
        assert_eq!(a.len(), REFRESH_ENTROPY_BYTES);
        assert_eq!(b.len(), REFRESH_ENTROPY_BYTES);
        assert_ne!(a, b);
        assert!(skiff_agent_proto::REFRESH_ENTROPY_LEN.contains(&REFRESH_ENTROPY_BYTES));
        // Over 256 bytes, where one getrandom call may come back short.
        assert_eq!(host_entropy(4096).unwrap().len(), 4096);
        assert!(host_entropy(0).unwrap().is_empty());
    }

    #[test]
    fn machine_ids_are_32_lowercase_hex_uuid_v4() {
        let a = new_machine_id().unwrap();
        let b = new_machine_id().unwrap();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), skiff_agent_proto::MACHINE_ID_LEN, "{id}");
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{id}"
            );
            assert_eq!(&id[12..13], "4", "{id}");
            assert!("89ab".contains(&id[16..17]), "{id}");
        }
    }
}
