//! CRC-32C (Castagnoli), the checksum of the state container: reflected
//! polynomial `0x82f63b78`, initial value and final XOR all ones (as in
//! iSCSI, ext4 and SSE4.2's `crc32` instruction). Table-driven, with the
//! table computed at compile time.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

/// The CRC of every byte value, for one table lookup per input byte.
const TABLE: [u32; 256] = table();

const fn table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// A CRC-32C computed over data that arrives in pieces.
#[derive(Clone, Copy, Debug)]
pub struct Crc32c(u32);

impl Crc32c {
    /// The CRC of no data so far.
    pub const fn new() -> Self {
        Crc32c(u32::MAX)
    }

    /// Adds `bytes` to the data.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = TABLE[usize::from(self.0 as u8 ^ b)] ^ (self.0 >> 8);
        }
    }

    /// The CRC of all the data added.
    pub const fn finish(self) -> u32 {
        !self.0
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

/// The CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(bytes);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A bit at a time, straight from the definition.
    fn bitwise(bytes: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn known_vectors() {
        // The CRC catalogue's check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 (iSCSI), appendix B.4.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(crc32c(&ascending), 0x46dd_794e);
        let descending: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
        assert_eq!(crc32c(&descending), 0x113f_db5c);
    }

    #[test]
    fn table_entries() {
        assert_eq!(TABLE[0], 0);
        assert_eq!(TABLE[1], 0xf26b_8303);
        assert_eq!(TABLE[128], POLY);
        assert_eq!(TABLE[255], 0xad7d_5351);
    }

    proptest! {
        /// The table matches the bitwise definition, and pieces add up.
        #[test]
        fn matches_bitwise_in_any_pieces(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            cut in any::<prop::sample::Index>(),
        ) {
            prop_assert_eq!(crc32c(&bytes), bitwise(&bytes));
            let (a, b) = bytes.split_at(cut.index(bytes.len() + 1));
            let mut crc = Crc32c::default();
            crc.update(a);
            crc.update(b);
            prop_assert_eq!(crc.finish(), crc32c(&bytes));
        }
    }
}
