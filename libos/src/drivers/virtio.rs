//! virtio glue: the [`Hal`] that `virtio-drivers` needs (DMA frames, MMIO mappings, address
//! translation) and the probe that finds a virtio-net device.
//!
//! Where devices are:
//! - **microvm**: virtio-mmio transports, 512 bytes each, from `0xfeb0_0000` (QEMU creates 24 of
//!   them; an empty one reads device id 0). Linux learns them from `virtio_mmio.device=` words on
//!   the command line; libos accepts those words (see [`crate::cmdline`]) and probes them first,
//!   then the whole known window.
//! - **q35** (or any PC): a virtio PCI function on bus 0, configuration space through ports
//!   `0xCF8`/`0xCFC`; memory BARs the firmware left unassigned are placed in the 32-bit PCI hole.

use alloc::format;
use alloc::string::String;
use core::ptr::NonNull;

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{BarInfo, Command, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{PciTransport, virtio_device_type};
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use super::pci::PortCam;
use crate::mm::kernel::{frames, map_mmio_page};
use crate::mm::layout::{DIRECT_MAP, KERNEL_BASE, KHEAP, PAGE_SIZE, phys_to_virt};

/// The `virtio-drivers` hardware abstraction over libos memory.
#[derive(Debug)]
pub(crate) struct StencilHal;

/// Physical address of kernel virtual address `va`: arithmetic for the direct map and the image,
/// a page-table walk (through the direct map) for anything else, e.g. the kernel heap or a stack.
///
/// Lower-half addresses are refused (`None`): a task's page there may be a copy-on-write frame
/// that other tasks map too, and a device writing into it would change their memory. `share`
/// therefore bounces such a buffer (the copy back goes through the MMU, which does the
/// copy-on-write); libos itself hands the device only kernel-heap buffers.
fn virt_to_phys(va: u64) -> Option<u64> {
    if va < DIRECT_MAP {
        return None;
    }
    if (DIRECT_MAP..KHEAP).contains(&va) {
        return Some(va - DIRECT_MAP);
    }
    if va >= KERNEL_BASE {
        return Some(va - KERNEL_BASE);
    }
    let mut table = crate::arch::mmu::root_phys();
    for level in (0..4).rev() {
        let index = (va >> (12 + 9 * level)) & 511;
        // SAFETY: `table` is a page table of the active hierarchy (RAM), read through the direct
        // map; we only read one entry.
        let entry = unsafe { ((phys_to_virt(table) as *const u64).add(index as usize)).read() };
        if entry & 1 == 0 {
            return None;
        }
        let addr = entry & 0x000f_ffff_ffff_f000;
        if level == 0 || (level < 3 && entry & 0x80 != 0) {
            let page = 1u64 << (12 + 9 * level);
            return Some((addr & !(page - 1)) + (va & (page - 1)));
        }
        table = addr;
    }
    None
}

/// Physical address of `va..va + len` if it is mapped and physically contiguous (checked page by
/// page: kernel-heap pages are single frames from anywhere in RAM).
fn contiguous_phys(va: u64, len: u64) -> Option<u64> {
    let first = virt_to_phys(va)?;
    let mut page = (va & !(PAGE_SIZE - 1)) + PAGE_SIZE;
    while page < va + len {
        if virt_to_phys(page)? != first + (page - va) {
            return None;
        }
        page += PAGE_SIZE;
    }
    Some(first)
}

// SAFETY: DMA memory comes from the frame allocator (count 1, zeroed, used by nobody else until
// `dma_dealloc`) and is reached through the direct map, which maps all RAM for the whole run;
// MMIO pages are mapped uncached at their direct-map addresses, which no RAM mapping uses; shared
// buffers are translated page-exactly, and one that is not physically contiguous is bounced
// through fresh DMA frames that only this share/unshare pair uses.
unsafe impl Hal for StencilHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(pfn) = frames().alloc_contiguous(pages, 1) else {
            return (0, NonNull::dangling());
        };
        let phys = pfn as u64 * PAGE_SIZE;
        let virt = phys_to_virt(phys) as *mut u8;
        // SAFETY: `pages` fresh frames, reached through the direct map.
        unsafe { core::ptr::write_bytes(virt, 0, pages * PAGE_SIZE as usize) };
        (phys, NonNull::new(virt).expect("direct map is not at 0"))
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let first = (paddr / PAGE_SIZE) as usize;
        for pfn in first..first + pages {
            frames().dec_ref(pfn);
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let mut page = paddr & !(PAGE_SIZE - 1);
        while page < paddr + size as u64 {
            map_mmio_page(page).expect("cannot map a device's MMIO page");
            page += PAGE_SIZE;
        }
        NonNull::new(phys_to_virt(paddr) as *mut u8).expect("direct map is not at 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let va = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len().max(1) as u64;
        if let Some(phys) = contiguous_phys(va, len) {
            return phys;
        }
        // Not physically contiguous (a kernel-heap buffer across a page boundary): bounce it.
        let pages = len.div_ceil(PAGE_SIZE) as usize;
        let (phys, bounce) = Self::dma_alloc(pages, direction);
        assert!(
            phys != 0,
            "out of memory for a {len}-byte DMA bounce buffer"
        );
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller's buffer is valid for `len` bytes; the bounce frames are fresh.
            unsafe {
                core::ptr::copy_nonoverlapping(va as *const u8, bounce.as_ptr(), len as usize)
            };
        }
        phys
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        // Coherent memory, no IOMMU: only a bounced buffer needs work.
        let va = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len().max(1) as u64;
        if contiguous_phys(va, len) == Some(paddr) {
            return;
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: `paddr` is the bounce buffer `share` made for this buffer (in the direct
            // map), and the caller's buffer is valid for `len` bytes.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    phys_to_virt(paddr) as *const u8,
                    va as *mut u8,
                    len as usize,
                )
            };
        }
        let pages = len.div_ceil(PAGE_SIZE) as usize;
        let first = (paddr / PAGE_SIZE) as usize;
        for pfn in first..first + pages {
            frames().dec_ref(pfn);
        }
    }
}

/// Start of QEMU microvm's virtio-mmio window, and its layout.
const MICROVM_MMIO_BASE: u64 = 0xfeb0_0000;
const MICROVM_MMIO_SLOT: u64 = 512;
const MICROVM_MMIO_SLOTS: u64 = 24;
/// "virt", the virtio-mmio magic value.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Where BARs left unassigned by the firmware go (q35's 32-bit PCI hole, above the ECAM).
const PCI_BAR_POOL: u64 = 0xc000_0000;

/// A virtio-net device that was found, not yet initialised.
pub(crate) struct FoundNic {
    pub transport: SomeTransport<'static>,
    /// Where, for messages: "virtio-mmio at 0xfeb00e00" or "PCI 00:02.0".
    pub location: String,
    /// The device reports its link state and it is down.
    pub link_down: bool,
}

fn link_down(t: &mut SomeTransport<'static>) -> bool {
    const F_STATUS: u64 = 1 << 16;
    const LINK_UP: u16 = 1;
    if t.read_device_features() & F_STATUS == 0 {
        return false; // no status field: assume up
    }
    // virtio_net_config: mac[6] then status (u16).
    t.read_config_space::<u16>(6)
        .map(|s| s & LINK_UP == 0)
        .unwrap_or(false)
}

fn probe_mmio(base: u64, size: u64) -> Option<SomeTransport<'static>> {
    let virt = map_mmio_page(base & !(PAGE_SIZE - 1))? + (base & (PAGE_SIZE - 1));
    // SAFETY: the page holding `base` is mapped uncached; reading the magic and device-id
    // registers has no side effect (on a machine without a device there, QEMU reads 0 or ~0).
    let (magic, id) = unsafe {
        (
            (virt as *const u32).read_volatile(),
            ((virt + 8) as *const u32).read_volatile(),
        )
    };
    if magic != MMIO_MAGIC || id != DeviceType::Network as u32 {
        return None;
    }
    if (base & (PAGE_SIZE - 1)) + size > PAGE_SIZE {
        map_mmio_page((base & !(PAGE_SIZE - 1)) + PAGE_SIZE)?;
    }
    let header = NonNull::new(virt as *mut VirtIOHeader)?;
    // SAFETY: `header` is a virtio-mmio register block of `size` bytes (magic and id checked),
    // mapped uncached for the rest of the run and driven only by this transport.
    let t = unsafe { MmioTransport::new(header, size as usize) }.ok()?;
    Some(SomeTransport::Mmio(t))
}

/// Assigns memory BARs the firmware left at 0 and enables decoding and bus mastering.
fn setup_pci_function(root: &mut PciRoot<PortCam>, df: DeviceFunction) {
    let mut next = PCI_BAR_POOL;
    let mut i = 0u8;
    while i < 6 {
        let info = root.bar_info(df, i).ok().flatten();
        let two = info.as_ref().is_some_and(BarInfo::takes_two_entries);
        if let Some(BarInfo::Memory { address, size, .. }) = info
            && address == 0
            && size > 0
        {
            let addr = next.next_multiple_of(size.max(PAGE_SIZE));
            next = addr + size.max(PAGE_SIZE);
            if two {
                root.set_bar_64(df, i, addr);
            } else {
                root.set_bar_32(df, i, addr as u32);
            }
            log::debug!("pci {df}: BAR{i} assigned at {addr:#x} ({size:#x} bytes)");
        }
        i += if two { 2 } else { 1 };
    }
    root.set_command(
        df,
        Command::IO_SPACE | Command::MEMORY_SPACE | Command::BUS_MASTER,
    );
}

fn probe_pci() -> Option<(SomeTransport<'static>, String)> {
    let mut root = PciRoot::new(PortCam);
    let found: Option<DeviceFunction> = root
        .enumerate_bus(0)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Network))
        .map(|(df, _)| df);
    let df = found?;
    setup_pci_function(&mut root, df);
    match PciTransport::new::<StencilHal, _>(&mut root, df) {
        Ok(t) => Some((SomeTransport::Pci(t), format!("PCI {df}"))),
        Err(e) => {
            log::warn!("net: virtio-net at PCI {df} is unusable: {e}");
            None
        }
    }
}

/// Finds the first virtio-net device: the `virtio_mmio.device=` hints, then microvm's
/// virtio-mmio window, then PCI bus 0.
pub(crate) fn find_net(mmio_hints: &[(u64, u64)]) -> Option<FoundNic> {
    let window = (0..MICROVM_MMIO_SLOTS)
        .map(|i| (MICROVM_MMIO_BASE + i * MICROVM_MMIO_SLOT, MICROVM_MMIO_SLOT));
    let mmio = mmio_hints
        .iter()
        .copied()
        .chain(window)
        .find_map(|(base, size)| probe_mmio(base, size).map(|t| (t, base)));
    let (mut transport, location) = match mmio {
        Some((t, base)) => (t, format!("virtio-mmio at {base:#x}")),
        None => probe_pci()?,
    };
    let link_down = link_down(&mut transport);
    Some(FoundNic {
        transport,
        location,
        link_down,
    })
}
