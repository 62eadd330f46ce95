//! Kernel loading (ELF `vmlinux` with or without the PVH note, bzImage),
//! initrd placement, command line, and the boot parameters each protocol
//! needs (the zero page, or PVH's `hvm_start_info`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point from a bzImage's protected-mode start.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// Linux's default `initrd_addr_max` for kernels that don't state one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What to boot.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    /// ELF `vmlinux` (PVH entry used when present) or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, `rbx` = `hvm_start_info`.
    Pvh,
    /// 16-bit real mode at `entry` (CS = 0); for tiny hand-assembled guests.
    RealMode,
}

/// The result of loading a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// Guest physical entry point.
    pub entry: u64,
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// First address after the kernel image.
    pub kernel_end: u64,
    /// Where the initrd went: `(address, size)`.
    pub initrd: Option<(u64, u64)>,
}

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {}", path.display())]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF image nor a bzImage.
    #[error("kernel {} is neither an ELF vmlinux nor a bzImage", path.display())]
    UnknownKernelFormat {
        /// The file.
        path: PathBuf,
    },
    /// The kernel is an ELF or bzImage but could not be loaded.
    #[error("cannot load kernel {}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// The loader's complaint.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd file could not be opened or read.
    #[error("cannot read initrd {}", path.display())]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory ({available} bytes free after the kernel)")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Room available.
        available: u64,
    },
    /// The command line is too long or contains a NUL.
    #[error("invalid kernel command line ({len} bytes, at most {max})")]
    Cmdline {
        /// Length given.
        len: usize,
        /// Maximum accepted.
        max: usize,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot parameters into guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestMemory {
        /// What was written.
        what: &'static str,
    },
}

/// Loads the kernel (and initrd and command line) into `mem` and writes the
/// boot parameters for the protocol the kernel supports (PVH preferred).
pub fn load_kernel(mem: &GuestMemoryMmap, spec: &KernelSpec) -> Result<BootInfo, BootError> {
    let kfile = |source| BootError::KernelFile {
        path: spec.kernel.clone(),
        source,
    };
    let mut kernel = File::open(&spec.kernel).map_err(kfile)?;
    let mut magic = [0u8; 4];
    let n = kernel.read(&mut magic).map_err(kfile)?;
    kernel.seek(SeekFrom::Start(0)).map_err(kfile)?;
    let is_elf = n == 4 && magic == *b"\x7fELF";

    let load_err = |source| BootError::Load {
        path: spec.kernel.clone(),
        source,
    };
    let result: KernelLoaderResult = if is_elf {
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?
    } else {
        match BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => r,
            Err(linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::InvalidBzImage,
            )) => {
                return Err(BootError::UnknownKernelFormat {
                    path: spec.kernel.clone(),
                })
            }
            Err(e) => return Err(load_err(e)),
        }
    };

    let cmdline = build_cmdline(&spec.cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|_| {
        BootError::GuestMemory {
            what: "the command line",
        }
    })?;

    let initrd_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd = match &spec.initrd {
        Some(path) => Some(load_initrd(mem, path, result.kernel_end, initrd_max)?),
        None => None,
    };

    let (entry, protocol) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if is_elf => (entry.0, BootProtocol::Pvh),
        _ if is_elf => (result.kernel_load.0, BootProtocol::Linux64),
        _ => (
            result.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET,
            BootProtocol::Linux64,
        ),
    };
    let info = BootInfo {
        entry,
        protocol,
        kernel_end: result.kernel_end,
        initrd,
    };
    let cmdline_size = spec.cmdline.len() + 1;
    match protocol {
        BootProtocol::Pvh => write_pvh_start_info(mem, &info)?,
        _ => write_zero_page(mem, &info, result.setup_header, cmdline_size)?,
    }
    Ok(info)
}

fn build_cmdline(s: &str) -> Result<Cmdline, BootError> {
    let bad = BootError::Cmdline {
        len: s.len(),
        max: CMDLINE_MAX_SIZE - 1,
    };
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|_| BootError::Cmdline {
        len: 0,
        max: CMDLINE_MAX_SIZE - 1,
    })?;
    if !s.trim().is_empty() {
        c.insert_str(s).map_err(|_| bad)?;
    }
    Ok(c)
}

/// Places the initrd page-aligned as high as possible in low memory, above
/// the kernel and below `addr_max`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let ierr = |source| BootError::InitrdFile {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(ierr)?;
    let size = f.metadata().map_err(ierr)?.len();
    let low_end = low_mem_end(mem).min(addr_max.saturating_add(1));
    let kernel_end = (kernel_end + 0xfff) & !0xfff;
    let available = low_end.saturating_sub(kernel_end);
    if size > available {
        return Err(BootError::InitrdTooLarge { size, available });
    }
    let addr = (low_end - size) & !0xfff;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, available })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|_| BootError::GuestMemory { what: "the initrd" })?;
    Ok((addr, size))
}

/// End of the RAM region that starts at 0 (below the MMIO gap).
fn low_mem_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().0 == 0)
        .map(|r| r.len())
        .unwrap_or(0)
        .min(MMIO_GAP_START)
}

/// The e820 map: `(start, size, type)`.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let (start, len) = (r.start_addr().0, r.len());
        if start == 0 {
            if len > HIMEM_START {
                map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
            }
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_size: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    for (i, (addr, size, ty)) in map.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *ty;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, ty)| hvm_memmap_table_entry {
            addr,
            size,
            type_: ty,
            reserved: 0,
        })
        .collect();
    let memmap_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(memmap_addr));
    if let Some((addr, size)) = info.initrd {
        let module = linux_loader::loader::elf::start_info::hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        let modlist =
            memmap_addr + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        params.set_sections(&map, GuestAddress(memmap_addr));
        params.set_modules(&[module], GuestAddress(modlist));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::BootParams)?;
    // The configurator checks that everything fits; make sure the structure
    // really landed where the vCPU will look.
    let magic: u32 = mem
        .read_obj(GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::GuestMemory { what: "start_info" })?;
    debug_assert_eq!(magic, XEN_HVM_START_MAGIC);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::memory::create_guest_memory;

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("skiff-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let spec = KernelSpec {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let e = load_kernel(&mem, &spec).unwrap_err();
        assert!(matches!(e, BootError::KernelFile { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let spec = KernelSpec {
            kernel: tmpfile("garbage", &[0x42; 8192]),
            initrd: None,
            cmdline: String::new(),
        };
        let e = load_kernel(&mem, &spec).unwrap_err();
        assert!(matches!(e, BootError::UnknownKernelFormat { .. }), "{e}");
        // A truncated ELF header.
        let spec = KernelSpec {
            kernel: tmpfile("trunc.elf", b"\x7fELF\x02\x01\x01"),
            ..spec
        };
        let e = load_kernel(&mem, &spec).unwrap_err();
        assert!(matches!(e, BootError::Load { .. }), "{e}");
    }

    #[test]
    fn e820_reserves_the_bios_area() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn initrd_that_does_not_fit_is_rejected() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let big = tmpfile("big.initrd", &vec![0u8; 20 << 20]);
        let e = load_initrd(&mem, &big, 2 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        let small = tmpfile("small.initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&mem, &small, 2 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 16 << 20);
        let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 7);
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        assert!(matches!(
            build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE)),
            Err(BootError::Cmdline { .. })
        ));
        assert!(build_cmdline("console=ttyS0 panic=-1").is_ok());
    }
}
