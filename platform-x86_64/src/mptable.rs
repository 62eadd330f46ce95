//! MP table (Intel MultiProcessor Specification 1.4), so a guest without
//! ACPI finds more than one vCPU and the IOAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
/// Most vCPUs whose entries fit between the EBDA start and 640 KiB.
pub const MAX_CPUS: u8 = 32;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the table's space below the BIOS area.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// The table did not fit in guest memory.
    #[error("cannot write the MP table into guest memory")]
    GuestMemory,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs,
/// to be placed at `at`. Returns the bytes.
pub fn build(cpus: u8, at: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus; // APIC ids 0..cpus are the vCPUs.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![MP_PROCESSOR, id, APIC_VERSION];
        e.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        e.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        e.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        entries.extend(e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend([MP_BUS, 0]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irqtype, irqflag(2), srcbus, srcbusirq, dstapic, dstirq
        entries.extend([MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend([MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const MPF_SIZE: usize = 16;
    const MPC_HEADER_SIZE: usize = 44;
    let mpc_addr = at + MPF_SIZE as u64;
    let mut mpc = Vec::with_capacity(MPC_HEADER_SIZE + entries.len());
    mpc.extend(MPC_SIGNATURE);
    mpc.extend(((MPC_HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    mpc.push(4); // spec revision 1.4
    mpc.push(0); // checksum, below
    mpc.extend(b"SKIFF   "); // OEM id
    mpc.extend(b"000000000000"); // product id
    mpc.extend(0u32.to_le_bytes()); // OEM table pointer
    mpc.extend(0u16.to_le_bytes()); // OEM table size
    mpc.extend(count.to_le_bytes());
    mpc.extend((APIC_START as u32).to_le_bytes());
    mpc.extend(0u16.to_le_bytes()); // extended table length
    mpc.push(0); // extended table checksum
    mpc.push(0); // reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_SIZE);
    mpc.extend(entries);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend(MPF_SIGNATURE);
    mpf.extend((mpc_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision
    mpf.push(0); // checksum, below
    mpf.extend([0u8; 5]); // feature bytes: a configuration table is present
    mpf[10] = checksum(&mpf);

    mpf.extend(mpc);
    Ok(mpf)
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|_| MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_counts() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[0..4], MPF_SIGNATURE);
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let mpc = &t[16..];
        assert_eq!(&mpc[0..4], MPC_SIGNATURE);
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(mpc.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([mpc[34], mpc[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // The table must fit below the BIOS area.
        assert!(EBDA_START + t.len() as u64 <= 0xa0000);
        assert!(matches!(build(0, 0), Err(MptableError::TooManyCpus(0))));
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
        assert!(EBDA_START + build(MAX_CPUS, EBDA_START).unwrap().len() as u64 <= 0xa0000);
    }
}
