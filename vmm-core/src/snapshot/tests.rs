//! Tests of the container, with small stand-in states; the device states
//! have their own tests beside their devices, and the whole device set is
//! tested at the end.

use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// A stand-in state of one `u32`, in serial sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Word(u32);

impl Persist for Word {
    const MAX_LEN: usize = 4;
    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        w.u32(self.0)
    }
    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        r.u32().map(Word)
    }
}

impl DeviceState for Word {
    const KIND: SectionKind = SectionKind::Serial;
}

/// A stand-in state of up to 16 bytes, length first, in block sections.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Blob(Vec<u8>);

impl Persist for Blob {
    const MAX_LEN: usize = 17;
    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        w.u8(self.0.len() as u8)?;
        w.bytes(&self.0)
    }
    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let n = r.u8()?;
        if n > 16 {
            return Err(StateError::InvalidValue {
                field: "blob length",
                value: u64::from(n),
            });
        }
        Ok(Blob(r.bytes(usize::from(n))?.to_vec()))
    }
}

impl DeviceState for Blob {
    const KIND: SectionKind = SectionKind::Block;
}

/// A container around `payload`, with a correct header and checksum.
fn seal(payload: &[u8]) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = Crc32c::new();
    crc.update(&head);
    crc.update(payload);
    head.extend_from_slice(&crc.finish().to_le_bytes());
    head.extend_from_slice(payload);
    head
}

/// A raw section.
fn section(kind: u16, index: u16, body: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&kind.to_le_bytes());
    s.extend_from_slice(&index.to_le_bytes());
    s.extend_from_slice(&(body.len() as u32).to_le_bytes());
    s.extend_from_slice(body);
    s
}

/// A container with serial 0 and 1 and block 7.
fn sample() -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut w = StateWriter::new(&mut buf).unwrap();
    w.add(0, &Word(0x1122_3344)).unwrap();
    w.add(7, &Blob(b"abc".to_vec())).unwrap();
    w.add(1, &Word(5)).unwrap();
    let len = w.finish().unwrap();
    buf.truncate(len);
    buf
}

#[test]
fn layout_is_fixed() {
    let bytes = sample();
    let mut payload = section(4, 0, &0x1122_3344u32.to_le_bytes());
    payload.extend(section(3, 7, b"\x03abc"));
    payload.extend(section(4, 1, &5u32.to_le_bytes()));
    assert_eq!(bytes, seal(&payload));
    assert_eq!(&bytes[..8], b"SKIFFDEV");
    assert_eq!(bytes[8..12], [1, 0, 0, 0]);
    assert_eq!(bytes.len(), HEADER_LEN + 3 * SECTION_HEADER_LEN + 4 + 4 + 4);
}

#[test]
fn sections_round_trip() {
    let bytes = sample();
    let r = StateReader::new(&bytes).unwrap();
    assert_eq!(r.load::<Word>(0).unwrap(), Word(0x1122_3344));
    assert_eq!(r.load::<Word>(1).unwrap(), Word(5));
    assert_eq!(r.load::<Blob>(7).unwrap(), Blob(b"abc".to_vec()));
    let order: Vec<_> = r.sections().map(|s| (s.kind, s.index)).collect();
    assert_eq!(
        order,
        [
            (SectionKind::Serial, 0),
            (SectionKind::Block, 7),
            (SectionKind::Serial, 1)
        ]
    );
    assert_eq!(r.section(SectionKind::Block, 7), Some(&b"\x03abc"[..]));
    assert_eq!(r.section(SectionKind::Block, 0), None);
    assert_eq!(
        r.load::<Blob>(0),
        Err(StateError::MissingSection {
            kind: SectionKind::Block,
            index: 0
        })
    );
    assert_eq!(
        r.load::<Word>(2),
        Err(StateError::MissingSection {
            kind: SectionKind::Serial,
            index: 2
        })
    );
}

#[test]
fn empty_container() {
    let mut buf = [0u8; HEADER_LEN];
    let len = StateWriter::new(&mut buf).unwrap().finish().unwrap();
    assert_eq!(len, HEADER_LEN);
    assert_eq!(buf.to_vec(), seal(&[]));
    assert_eq!(StateReader::new(&buf).unwrap().sections().count(), 0);
}

#[test]
fn section_kinds_are_numbered() {
    for (kind, raw) in [
        (SectionKind::MmioTransport, 1),
        (SectionKind::Vsock, 2),
        (SectionKind::Block, 3),
        (SectionKind::Serial, 4),
        (SectionKind::I8042, 5),
    ] {
        assert_eq!(kind.raw(), raw);
        assert_eq!(SectionKind::try_from(raw), Ok(kind));
    }
    for raw in [0, 6, u16::MAX] {
        assert_eq!(
            SectionKind::try_from(raw),
            Err(StateError::UnknownSection { kind: raw })
        );
    }
}

#[test]
fn writer_refuses_duplicates() {
    let mut buf = [0u8; 128];
    let mut w = StateWriter::new(&mut buf).unwrap();
    w.add(3, &Word(1)).unwrap();
    w.add(3, &Blob(vec![])).unwrap();
    assert_eq!(
        w.add(3, &Word(2)),
        Err(StateError::DuplicateSection {
            kind: SectionKind::Serial,
            index: 3
        })
    );
    let len = w.finish().unwrap();
    let r = StateReader::new(&buf[..len]).unwrap();
    assert_eq!(r.load::<Word>(3).unwrap(), Word(1));
}

#[test]
fn small_buffers_fail_and_keep_what_was_written() {
    let mut tiny = [0u8; HEADER_LEN - 1];
    assert_eq!(
        StateWriter::new(&mut tiny).unwrap_err(),
        StateError::BufferTooSmall {
            needed: HEADER_LEN,
            available: HEADER_LEN - 1
        }
    );
    // Room for one word section, and a little more.
    let mut buf = [0u8; HEADER_LEN + SECTION_HEADER_LEN + 4 + SECTION_HEADER_LEN + 2];
    let mut w = StateWriter::new(&mut buf).unwrap();
    w.add(0, &Word(9)).unwrap();
    assert_eq!(
        w.add(1, &Word(10)),
        Err(StateError::BufferTooSmall {
            needed: 44,
            available: 42
        })
    );
    assert!(matches!(
        w.add(0, &Blob(vec![1; 16])),
        Err(StateError::BufferTooSmall { .. })
    ));
    let len = w.finish().unwrap();
    let r = StateReader::new(&buf[..len]).unwrap();
    assert_eq!(r.sections().count(), 1);
    assert_eq!(r.load::<Word>(0).unwrap(), Word(9));

    let mut out = [0u8; 3];
    assert!(matches!(
        Word(1).save(&mut out),
        Err(StateError::BufferTooSmall { .. })
    ));
}

#[test]
fn persist_save_and_load_take_exact_lengths() {
    let mut out = [0u8; 8];
    assert_eq!(Word(7).save(&mut out), Ok(4));
    assert_eq!(Word::load(&out[..4]), Ok(Word(7)));
    assert_eq!(
        Word::load(&out[..5]),
        Err(StateError::TrailingBytes { extra: 1 })
    );
    assert_eq!(
        Word::load(&out[..3]),
        Err(StateError::TooShort {
            needed: 4,
            available: 3
        })
    );
}

#[test]
fn truncation_is_too_short() {
    let bytes = sample();
    for len in 0..bytes.len() {
        let err = StateReader::new(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err, StateError::TooShort { .. }),
            "cut at {len}: {err:?}"
        );
    }
    assert_eq!(
        StateReader::new(&bytes[..HEADER_LEN + 3]).unwrap_err(),
        StateError::TooShort {
            needed: bytes.len(),
            available: HEADER_LEN + 3
        }
    );
}

#[test]
fn header_errors() {
    let bytes = sample();
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        StateReader::new(&long).unwrap_err(),
        StateError::TrailingBytes { extra: 1 }
    );

    let mut magic = bytes.clone();
    magic[0] = b's';
    assert_eq!(StateReader::new(&magic).unwrap_err(), StateError::BadMagic);

    let mut version = bytes.clone();
    version[8] = 2;
    assert_eq!(
        StateReader::new(&version).unwrap_err(),
        StateError::UnsupportedVersion { version: 2 }
    );

    let mut crc = bytes.clone();
    crc[16] ^= 1;
    let stored = u32::from_le_bytes(crc[16..20].try_into().unwrap());
    assert_eq!(
        StateReader::new(&crc).unwrap_err(),
        StateError::ChecksumMismatch {
            stored,
            computed: stored ^ 1
        }
    );
}

#[test]
fn every_flipped_bit_is_caught() {
    let bytes = sample();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            let err = StateReader::new(&bad).unwrap_err();
            let expected = match i {
                0..8 => matches!(err, StateError::BadMagic),
                8..12 => matches!(err, StateError::UnsupportedVersion { .. }),
                12..16 => matches!(
                    err,
                    StateError::TooShort { .. } | StateError::TrailingBytes { .. }
                ),
                _ => matches!(err, StateError::ChecksumMismatch { .. }),
            };
            assert!(expected, "byte {i} bit {bit}: {err:?}");
        }
    }
}

#[test]
fn malformed_sections_with_good_checksums() {
    let word = 1u32.to_le_bytes();
    let unknown = seal(&section(99, 0, &word));
    assert_eq!(
        StateReader::new(&unknown).unwrap_err(),
        StateError::UnknownSection { kind: 99 }
    );

    let mut twice = section(4, 2, &word);
    twice.extend(section(3, 2, b"\0"));
    twice.extend(section(4, 2, &word));
    assert_eq!(
        StateReader::new(&seal(&twice)).unwrap_err(),
        StateError::DuplicateSection {
            kind: SectionKind::Serial,
            index: 2
        }
    );

    // A section longer than what is left of the payload.
    let mut long = section(4, 0, &word);
    long[4] = 5;
    assert_eq!(
        StateReader::new(&seal(&long)).unwrap_err(),
        StateError::TooShort {
            needed: 5,
            available: 4
        }
    );
    // A section header cut short.
    assert!(matches!(
        StateReader::new(&seal(&section(4, 0, &word)[..6])).unwrap_err(),
        StateError::TooShort { .. }
    ));
    // A section length near u32::MAX.
    let mut huge = section(4, 0, &word);
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        StateReader::new(&seal(&huge)).unwrap_err(),
        StateError::TooShort { .. }
    ));

    // Well-formed container, but a state with bytes to spare or missing.
    let mut spare = section(4, 0, &word);
    spare.extend(section(3, 0, b"\x01ab"));
    let r = seal(&spare);
    let reader = StateReader::new(&r).unwrap();
    assert_eq!(
        reader.load::<Blob>(0),
        Err(StateError::TrailingBytes { extra: 1 })
    );
    let short = seal(&section(4, 0, &word[..3]));
    assert!(matches!(
        StateReader::new(&short).unwrap().load::<Word>(0),
        Err(StateError::TooShort { .. })
    ));
    let invalid = seal(&section(3, 0, b"\x20"));
    assert_eq!(
        StateReader::new(&invalid).unwrap().load::<Blob>(0),
        Err(StateError::InvalidValue {
            field: "blob length",
            value: 0x20
        })
    );
}

#[test]
fn errors_read_as_sentences() {
    use std::string::ToString;
    assert_eq!(
        StateError::ChecksumMismatch {
            stored: 1,
            computed: 0xabcd
        }
        .to_string(),
        "device state checksum 0x00000001 does not match the content (0x0000abcd)"
    );
    assert_eq!(
        StateError::DuplicateSection {
            kind: SectionKind::Vsock,
            index: 1
        }
        .to_string(),
        "device state section Vsock 1 appears twice"
    );
    assert_eq!(
        StateError::Mismatch {
            field: "device type",
            saved: 2,
            device: 19
        }
        .to_string(),
        "saved device type 0x2 does not match the device's 0x13"
    );
}

/// Any byte string, or any payload behind a good header.
fn container_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        proptest::collection::vec(any::<u8>(), 0..120).prop_map(|p| seal(&p)),
        // Plausible sections: known kinds, small lengths, bodies that may
        // or may not match.
        proptest::collection::vec(
            (
                0u16..7,
                0u16..3,
                proptest::collection::vec(any::<u8>(), 0..20)
            ),
            0..6
        )
        .prop_map(|sections| {
            let payload: Vec<u8> = sections
                .iter()
                .flat_map(|(kind, index, body)| section(*kind, *index, body))
                .collect();
            seal(&payload)
        }),
    ]
}

proptest! {
    /// Reading never panics, and what it accepts it hands out whole.
    #[test]
    fn reading_arbitrary_bytes_never_panics(bytes in container_bytes()) {
        if let Ok(r) = StateReader::new(&bytes) {
            let total: usize = r.sections().map(|s| SECTION_HEADER_LEN + s.bytes.len()).sum();
            prop_assert_eq!(HEADER_LEN + total, bytes.len());
            for s in r.sections() {
                prop_assert_eq!(r.section(s.kind, s.index), Some(s.bytes));
            }
            let _ = r.load::<Word>(0);
            let _ = r.load::<Blob>(1);
        }
    }

    /// Whatever is written reads back, section by section.
    #[test]
    fn written_containers_read_back(
        words in proptest::collection::btree_map(any::<u16>(), any::<u32>(), 0..8),
        blobs in proptest::collection::btree_map(
            any::<u16>(), proptest::collection::vec(any::<u8>(), 0..=16), 0..8),
    ) {
        let mut buf = vec![
            0u8;
            HEADER_LEN
                + words.len() * (SECTION_HEADER_LEN + Word::MAX_LEN)
                + blobs.len() * (SECTION_HEADER_LEN + Blob::MAX_LEN)
        ];
        let mut w = StateWriter::new(&mut buf).unwrap();
        for (&i, &v) in &words {
            w.add(i, &Word(v)).unwrap();
        }
        for (&i, v) in &blobs {
            w.add(i, &Blob(v.clone())).unwrap();
        }
        let len = w.finish().unwrap();
        let r = StateReader::new(&buf[..len]).unwrap();
        prop_assert_eq!(r.sections().count(), words.len() + blobs.len());
        for (&i, &v) in &words {
            prop_assert_eq!(r.load::<Word>(i).unwrap(), Word(v));
        }
        for (&i, v) in &blobs {
            prop_assert_eq!(r.load::<Blob>(i).unwrap(), Blob(v.clone()));
        }
    }
}

/// The whole device set of a VM, as the VMM will save and restore it.
mod device_set {
    use super::*;
    use crate::devices::blk::{BackendError, Block, BlockBackend, BlockState};
    use crate::devices::vsock::{
        ConnKey, HostEvent, Recv, Vsock, VsockBackend, VsockBackendError, VsockState,
    };
    use crate::irq::CountingIrq;
    use crate::legacy::{I8042State, ResetSink, Serial, SerialSink, SerialState, I8042};
    use crate::memory::{GuestAddress, SliceMemory};
    use crate::mmio::{
        MmioTransport, MmioTransportState, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_OFFSET,
    };

    struct NoHost;

    impl VsockBackend for NoHost {
        fn buf_alloc(&self) -> u32 {
            4096
        }
        fn connect(&mut self, _: ConnKey) -> Result<(), VsockBackendError> {
            Err(VsockBackendError::Refused)
        }
        fn connected(&mut self, _: ConnKey) {}
        fn send(&mut self, _: ConnKey, _: &[u8]) -> Result<(), VsockBackendError> {
            Err(VsockBackendError::Broken)
        }
        fn unsent(&self, _: ConnKey) -> u32 {
            0
        }
        fn recv(&mut self, _: ConnKey, _: &mut [u8]) -> Result<Recv, VsockBackendError> {
            Ok(Recv::Eof)
        }
        fn shutdown(&mut self, _: ConnKey, _: u32) {}
        fn close(&mut self, _: ConnKey) {}
        fn next_event(&mut self) -> Option<HostEvent> {
            None
        }
    }

    struct Zeros(u64);

    impl BlockBackend for Zeros {
        fn capacity(&self) -> u64 {
            self.0
        }
        fn read_at(&mut self, _: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> Result<(), BackendError> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    struct Console;

    impl SerialSink for Console {
        fn write_byte(&mut self, _: u8) {}
    }

    struct NoReset;

    impl ResetSink for NoReset {
        fn reset(&mut self) {}
    }

    type VsockTransport = MmioTransport<Vsock<NoHost, 4>, CountingIrq, 3>;
    type BlockTransport = MmioTransport<Block<Zeros>, CountingIrq, 1>;

    /// Room for every state at its longest.
    const SET_LEN: usize = HEADER_LEN
        + 2 * SECTION_HEADER_LEN
        + MmioTransportState::<3>::MAX_LEN
        + VsockState::MAX_LEN
        + 4 * SECTION_HEADER_LEN
        + 2 * MmioTransportState::<1>::MAX_LEN
        + 2 * BlockState::MAX_LEN
        + 2 * SECTION_HEADER_LEN
        + SerialState::MAX_LEN
        + I8042State::MAX_LEN;

    #[test]
    fn save_and_restore_a_whole_vm() {
        let mut bytes = vec![0u8; 0x1000];
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut vsock: VsockTransport =
            MmioTransport::new(Vsock::new(3, NoHost).unwrap(), CountingIrq::default()).unwrap();
        let step = (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u32;
        vsock
            .write(&mem, STATUS_OFFSET, &step.to_le_bytes())
            .unwrap();
        let disks: [BlockTransport; 2] = [1, 2].map(|i| {
            let disk = Block::new(Zeros(i * 4096), i == 2, b"disk");
            MmioTransport::new(disk, CountingIrq::default()).unwrap()
        });
        let irq = CountingIrq::default();
        let mut serial = Serial::new(&irq, Console);
        serial.enqueue_raw_bytes(b"login: ").unwrap();
        let mut i8042 = I8042::new(NoReset);
        i8042.write(4, &[0xaa]);

        let mut buf = [0u8; SET_LEN];
        let mut w = StateWriter::new(&mut buf).unwrap();
        w.add(0, &vsock.state()).unwrap();
        w.add(0, &vsock.device().state()).unwrap();
        for (i, disk) in disks.iter().enumerate() {
            w.add(i as u16 + 1, &disk.state()).unwrap();
            w.add(i as u16, &disk.device().state()).unwrap();
        }
        w.add(0, &serial.state()).unwrap();
        w.add(0, &i8042.state()).unwrap();
        let len = w.finish().unwrap();
        assert!(len < SET_LEN, "{len} of {SET_LEN}");

        let r = StateReader::new(&buf[..len]).unwrap();
        assert_eq!(r.sections().count(), 8);
        let vs: MmioTransportState<3> = r.load(0).unwrap();
        let dev = Vsock::from_state(&r.load(0).unwrap(), NoHost).unwrap();
        let restored: VsockTransport =
            MmioTransport::from_state(dev, CountingIrq::default(), &vs, &mem).unwrap();
        assert_eq!(restored.state(), vsock.state());
        assert_eq!(restored.device().state(), vsock.device().state());
        // In place, into devices built over fresh backends: the same, or
        // for another guest CID a mismatch that changes nothing.
        let saved: VsockState = r.load(0).unwrap();
        let mut in_place: VsockTransport =
            MmioTransport::new(Vsock::new(3, NoHost).unwrap(), CountingIrq::default()).unwrap();
        in_place.restore(&vs, &mem).unwrap();
        in_place.device_mut().restore(&saved).unwrap();
        assert_eq!(in_place.state(), vsock.state());
        assert_eq!(in_place.device().state(), vsock.device().state());
        let mut other: VsockTransport =
            MmioTransport::new(Vsock::new(4, NoHost).unwrap(), CountingIrq::default()).unwrap();
        assert!(matches!(
            other.device_mut().restore(&saved),
            Err(StateError::Mismatch {
                field: "guest CID",
                saved: 3,
                device: 4
            })
        ));
        assert_eq!(other.device().guest_cid(), 4);
        for (i, disk) in disks.iter().enumerate() {
            let ts: MmioTransportState<1> = r.load(i as u16 + 1).unwrap();
            let bs: BlockState = r.load(i as u16).unwrap();
            let dev = Block::from_state(&bs, Zeros(bs.capacity_sectors * 512)).unwrap();
            let restored: BlockTransport =
                MmioTransport::from_state(dev, CountingIrq::default(), &ts, &mem).unwrap();
            assert_eq!(restored.state(), disk.state());
            assert_eq!(restored.device().state(), disk.device().state());
        }
        let irq2 = CountingIrq::default();
        let s = Serial::from_state(&r.load(0).unwrap(), &irq2, Console);
        assert_eq!(s.state(), serial.state());
        let k = I8042::from_state(&r.load(0).unwrap(), NoReset);
        assert_eq!(k.state(), i8042.state());

        // Sections of one kind hold that kind: a disk's transport state is
        // no vsock transport state.
        assert!(matches!(
            r.load::<MmioTransportState<3>>(1),
            Ok(MmioTransportState { device_type: 2, .. })
        ));
        let disk_ts: MmioTransportState<3> = r.load(1).unwrap();
        let dev = Vsock::new(3, NoHost).unwrap();
        assert!(matches!(
            VsockTransport::from_state(dev, CountingIrq::default(), &disk_ts, &mem),
            Err(StateError::Mismatch {
                field: "device type",
                ..
            })
        ));
    }
}
