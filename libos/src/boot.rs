//! The boot sequence, from the PVH entry's first Rust instruction to the app's `main`.
//!
//! 1. console (COM1), GDT/TSS, IDT, PIC masked — faults are reported from here on;
//! 2. TSC calibration starts (PIT channel 0);
//! 3. `hvm_start_info` is validated (else exit 105) and the memory map copied out of low memory;
//!    the command line is measured where the loader left it and checked to be UTF-8 (else 103);
//! 4. kernel options are parsed (`log=`, `share=`) in place; a bad one ends the boot with 103;
//! 5. memory: normalised map → kernel page tables (direct map, W^X image) → frame allocator;
//!    the command line is then copied, whole, onto the heap;
//! 6. the main stack (with a guard page) is mapped and boot continues on it;
//! 7. app arguments are parsed, calibration finishes, `main` runs.
//!
//! The command line has no length limit of its own: it stays where the loader put it (every QEMU
//! loader puts it at 0x20000) until the heap exists. It must end below 1 MiB, memory that neither
//! the kernel page tables nor the frame allocator ever reuse (mm/kernel.rs); one that does not is
//! a boot error naming its address and length, never a silent cut.

use crate::arch::{gdt, pic, traps};
use crate::cmdline;
use crate::memmap::{MapEntry, Range, normalize};
use crate::mm::layout::{EARLY_LIMIT, KERNEL_BASE, phys_to_virt};
use crate::{rt, shutdown};
use alloc::string::String;
use spin::Once;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Size of the main stack.
const MAIN_STACK_SIZE: u64 = 1 << 20;

/// The command line must end (NUL included) below this address: memory that mm never reuses.
const CMDLINE_LIMIT: u64 = 1 << 20;
/// Memory-map entries read; a map with more is a boot error.
const MAX_MAP: usize = 128;

/// What the loader left in low memory: the memory map, copied before anything can reuse it, and
/// where the command line is.
struct BootData {
    /// Physical address of the command line (0: none).
    cmdline_phys: u64,
    /// Its length in bytes, without the NUL; checked to be UTF-8.
    cmdline_len: usize,
    map: [MapEntry; MAX_MAP],
    map_len: usize,
    ram: [Range; MAX_MAP],
    ram_len: usize,
}

static BOOT_DATA: Once<BootData> = Once::new();
/// The command line, copied onto the heap once it exists.
static CMDLINE: Once<&'static str> = Once::new();

fn boot_data() -> &'static BootData {
    BOOT_DATA
        .get()
        .expect("boot data read before it was copied")
}

/// The kernel command line as given to QEMU's `-append`, whole.
pub fn cmdline() -> &'static str {
    CMDLINE.get().copied().unwrap_or("")
}

/// The command line where the loader left it, through the boot mapping.
///
/// # Safety
/// The boot page tables must still be active (before `mm::kernel::init` switches them).
unsafe fn early_cmdline() -> &'static str {
    let d = boot_data();
    match early_ptr::<u8>(d.cmdline_phys, d.cmdline_len as u64) {
        // SAFETY: `copy_start_info` checked that these bytes lie below 1 MiB, which the boot
        // tables map at KERNEL_BASE (the caller guarantees they are still active), and that they
        // are UTF-8; nothing writes that memory during boot.
        Some(p) => unsafe {
            core::str::from_utf8_unchecked(core::slice::from_raw_parts(p, d.cmdline_len))
        },
        None => "",
    }
}

/// Copies the command line onto the heap (called once, right after the kernel heap exists).
fn keep_cmdline() {
    let d = boot_data();
    let line = if d.cmdline_len == 0 {
        ""
    } else {
        let p = phys_to_virt(d.cmdline_phys) as *const u8;
        // SAFETY: the command line lies below 1 MiB in the first 2 MiB of RAM, which the direct
        // map covers (`copy_start_info` checked that RAM starts there) and which neither the
        // page-table builder nor the frame allocator has reused; `copy_start_info` checked that
        // these bytes are UTF-8.
        let s = unsafe {
            core::str::from_utf8_unchecked(core::slice::from_raw_parts(p, d.cmdline_len))
        };
        String::leak(String::from(s))
    };
    CMDLINE.call_once(|| line);
}

/// Maps the local APIC and starts its timer at the scheduling quantum; false when there is no
/// usable APIC (tasks are then scheduled cooperatively).
fn start_preemption_timer() -> bool {
    let Some(phys) = crate::arch::apic::base_phys() else {
        return false;
    };
    let Some(mmio) = crate::mm::kernel::map_mmio_page(phys) else {
        return false;
    };
    // SAFETY: `mmio` maps the APIC's register page uncached for good (`map_mmio_page`).
    let waited = unsafe {
        crate::arch::apic::start_timer(mmio, crate::time::tsc_hz(), crate::task::QUANTUM_US)
    };
    crate::time::add_calibration_wait(waited);
    true
}

/// Logs the one-line boot banner (called just before the app's `main`).
pub(crate) fn banner() {
    let fa = crate::mm::kernel::frames();
    log::info!(
        "Stencil {}: {} MiB RAM, {} MiB free, TSC {}, share={}, boot {} us (+{} us calibration wait)",
        env!("CARGO_PKG_VERSION"),
        ram_ranges().iter().map(|r| r.len()).sum::<u64>() >> 20,
        (fa.free_frames() as u64 * 4096) >> 20,
        crate::time::tsc_calibration(),
        if share_mode() { "on" } else { "off" },
        crate::time::boot_duration().as_micros(),
        crate::time::calibration_wait().as_micros()
    );
}

/// Usable RAM ranges (sorted, page aligned) as the firmware reported them.
pub fn ram_ranges() -> &'static [Range] {
    let d = boot_data();
    &d.ram[..d.ram_len]
}

/// Whether templates are attached by reference (`share=on`, the default) or deep-copied
/// (`share=off`, what fork() does). Set by the kernel command line.
///
/// ```no_run
/// libos::println!("share={}", if libos::share_mode() { "on" } else { "off" });
/// ```
pub fn share_mode() -> bool {
    crate::space::mode() == templates::Mode::Share
}

fn early_ptr<T>(phys: u64, len: u64) -> Option<*const T> {
    (phys != 0 && phys.checked_add(len)? <= EARLY_LIMIT).then(|| (KERNEL_BASE + phys) as *const T)
}

fn boot_fail(code: u32, args: core::fmt::Arguments<'_>) -> ! {
    crate::console::emergency_write(format_args!("stencil: boot failed: {args}\n"));
    crate::shutdown::fatal_exit(code)
}

/// Reads `hvm_start_info` through the boot mapping and copies what we keep.
///
/// # Safety
/// The boot page tables must be active and `start_info` must be what the loader passed in `ebx`.
unsafe fn copy_start_info(start_info: u64, d: &mut BootData) {
    let Some(info) = early_ptr::<u32>(start_info, 56) else {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!("start info at {start_info:#x} is not below 1 GiB"),
        );
    };
    // SAFETY: `info` points at the 56-byte hvm_start_info (version ≥ 1), mapped by the boot tables.
    let word = |i: usize| unsafe { info.add(i).read_volatile() };
    let qword = |i: usize| u64::from(word(i)) | (u64::from(word(i + 1)) << 32);
    if word(0) != PVH_MAGIC {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!(
                "bad hvm_start_info magic {:#x} (not booted through PVH, or the loader overwrote \
                 it: QEMU's SeaBIOS PVH loader does so with a kernel command line over ~4 KiB)",
                word(0)
            ),
        );
    }
    let version = word(1);
    let cmdline_paddr = qword(6);
    let (memmap_paddr, entries) = if version >= 1 {
        (qword(10), word(12) as usize)
    } else {
        (0, 0)
    };
    if entries == 0 {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!("the loader passed no memory map (PVH start info version {version})"),
        );
    }
    if entries > MAX_MAP {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!("the memory map has {entries} entries; libos reads at most {MAX_MAP}"),
        );
    }
    let n = entries;
    let Some(map) = early_ptr::<u8>(memmap_paddr, 24 * n as u64) else {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!("memory map at {memmap_paddr:#x} is not below 1 GiB"),
        );
    };
    for i in 0..n {
        // SAFETY: entry i of the loader's memory map (24 bytes each), below 1 GiB.
        let e = unsafe { map.add(24 * i) };
        // SAFETY: the three fields of entry i, inside the map checked above; unaligned reads
        // because the table is only 8-byte aligned in practice.
        let (addr, size, kind) = unsafe {
            (
                e.cast::<u64>().read_unaligned(),
                e.add(8).cast::<u64>().read_unaligned(),
                e.add(16).cast::<u32>().read_unaligned(),
            )
        };
        d.map[i] = MapEntry { addr, size, kind };
    }
    d.map_len = n;
    d.ram_len = normalize(&d.map[..n], &mut d.ram);
    if d.ram_len == 0 {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!("the memory map ({n} entries) holds no usable RAM"),
        );
    }
    if cmdline_paddr != 0 {
        // SAFETY: the boot tables are active (the caller's contract).
        d.cmdline_len = unsafe { measure_cmdline(cmdline_paddr, &d.ram[..d.ram_len]) };
        d.cmdline_phys = cmdline_paddr;
    }
}

/// Measures the NUL-terminated command line at `phys` and checks that libos can keep it (below
/// 1 MiB, RAM starting in the first 2 MiB so the direct map covers it) and that it is UTF-8.
/// Returns its length without the NUL; anything else ends the boot with a report.
///
/// # Safety
/// The boot page tables must be active.
unsafe fn measure_cmdline(phys: u64, ram: &[Range]) -> usize {
    let room = CMDLINE_LIMIT.saturating_sub(phys);
    let Some(p) = early_ptr::<u8>(phys, room).filter(|_| room > 0) else {
        boot_fail(
            shutdown::EXIT_BAD_CMDLINE,
            format_args!(
                "the kernel command line is at {phys:#x}; libos needs it below {CMDLINE_LIMIT:#x}"
            ),
        );
    };
    // SAFETY: reads bytes phys..phys + room, all below 1 MiB, which the boot tables map.
    let len = (0..room as usize).find(|&i| unsafe { p.add(i).read_volatile() } == 0);
    let Some(len) = len else {
        boot_fail(
            shutdown::EXIT_BAD_CMDLINE,
            format_args!(
                "the kernel command line at {phys:#x} is at least {room} bytes long and does \
                 not end below {CMDLINE_LIMIT:#x}, where libos needs it"
            ),
        );
    };
    if ram.first().is_none_or(|r| r.start >= 2 << 20) {
        boot_fail(
            shutdown::EXIT_BOOT_FAILED,
            format_args!("the memory map has no RAM in the first 2 MiB, where the command line is"),
        );
    }
    // SAFETY: the `len` bytes just measured, below 1 MiB, mapped by the boot tables.
    let bytes = unsafe { core::slice::from_raw_parts(p, len) };
    if let Err(e) = core::str::from_utf8(bytes) {
        boot_fail(
            shutdown::EXIT_BAD_CMDLINE,
            format_args!(
                "the kernel command line ({len} bytes) is not UTF-8: invalid byte at offset {}",
                e.valid_up_to()
            ),
        );
    }
    len
}

/// First Rust code: called by the PVH entry with the start-info address and the entry TSC.
#[unsafe(no_mangle)]
extern "C" fn stencil_boot64(start_info: u64, entry_tsc: u64) -> ! {
    crate::console::init();
    gdt::init();
    traps::init(crate::fault::on_trap);
    pic::remap_and_mask();
    crate::time::start_calibration(entry_tsc);
    BOOT_DATA.call_once(|| {
        let mut d = BootData {
            cmdline_phys: 0,
            cmdline_len: 0,
            map: [MapEntry {
                addr: 0,
                size: 0,
                kind: 0,
            }; MAX_MAP],
            map_len: 0,
            ram: [Range { start: 0, end: 0 }; MAX_MAP],
            ram_len: 0,
        };
        // SAFETY: boot tables active; `start_info` is the loader's `ebx`.
        unsafe { copy_start_info(start_info, &mut d) };
        d
    });
    // SAFETY: the boot tables are still active; `early` is not used after mm::kernel::init.
    let early = unsafe { early_cmdline() };
    let opts = match cmdline::parse_options(early) {
        Ok(o) => o,
        Err(e) => boot_fail(
            shutdown::EXIT_BAD_CMDLINE,
            format_args!("bad kernel command line: {e}\n  command line: {early}"),
        ),
    };
    crate::console::init_logger(opts.log);
    crate::space::set_share_mode(opts.share);
    // SAFETY: called once, with the boot tables active and the normalised map.
    if let Err(e) = unsafe { crate::mm::kernel::init(ram_ranges()) } {
        boot_fail(shutdown::EXIT_OOM, format_args!("{e}"));
    }
    keep_cmdline();
    let stack = match crate::stack::alloc(MAIN_STACK_SIZE) {
        Ok(s) => s,
        Err(e) => boot_fail(
            shutdown::EXIT_OOM,
            format_args!("cannot map the main stack: {e:?}"),
        ),
    };
    let top = stack.top();
    // The main stack lives for the rest of the boot: it is never freed.
    core::mem::forget(stack);
    // SAFETY: `top` is the 16-byte-aligned top of the freshly mapped main stack, which nothing
    // else uses; `continue_on_main_stack` never returns.
    unsafe { crate::arch::cpu::run_on_stack(top, continue_on_main_stack) }
}

extern "C" fn continue_on_main_stack() -> ! {
    match cmdline::parse_args(cmdline()) {
        Ok(args) => rt::set_args(args),
        Err(e) => boot_fail(
            shutdown::EXIT_BAD_CMDLINE,
            format_args!("bad app arguments: {e}\n  command line: {}", cmdline()),
        ),
    }
    crate::time::finish_calibration();
    let preemption = start_preemption_timer();
    crate::task::init(preemption);
    crate::time::mark_main();
    banner();
    rt::run_main()
}
