//! The boot sequence, from the PVH entry's first Rust instruction to the app's `main`.
//!
//! 1. console (COM1), GDT/TSS, IDT, PIC masked — faults are reported from here on;
//! 2. TSC calibration starts (PIT channel 0);
//! 3. `hvm_start_info` is validated; command line and memory map are copied out of low memory;
//! 4. kernel options are parsed (`log=`, `share=`); a bad one ends the boot with exit code 103;
//! 5. memory: normalised map → kernel page tables (direct map, W^X image) → frame allocator;
//! 6. the main stack (with a guard page) is mapped and boot continues on it;
//! 7. app arguments are parsed (they need the heap), calibration finishes, `main` runs.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::x86_64::{gdt, pic, traps};
use crate::cmdline;
use crate::memmap::{MapEntry, Range, normalize};
use crate::mm::layout::{EARLY_LIMIT, KERNEL_BASE};
use crate::rt;
use spin::Once;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Size of the main stack.
const MAIN_STACK_SIZE: u64 = 1 << 20;

const MAX_CMDLINE: usize = 4096;
const MAX_MAP: usize = 128;

/// Copies of what the loader left in low memory, taken before anything can reuse it.
struct BootData {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    map: [MapEntry; MAX_MAP],
    map_len: usize,
    ram: [Range; MAX_MAP],
    ram_len: usize,
}

static BOOT_DATA: Once<BootData> = Once::new();
static SHARE: AtomicBool = AtomicBool::new(true);

fn boot_data() -> &'static BootData {
    BOOT_DATA
        .get()
        .expect("boot data read before it was copied")
}

/// The kernel command line as given to QEMU's `-append`.
pub fn cmdline() -> &'static str {
    let d = boot_data();
    core::str::from_utf8(&d.cmdline[..d.cmdline_len]).unwrap_or("")
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
    SHARE.load(Ordering::Relaxed)
}

fn early_ptr<T>(phys: u64, len: u64) -> Option<*const T> {
    (phys != 0 && phys.checked_add(len)? <= EARLY_LIMIT).then(|| (KERNEL_BASE + phys) as *const T)
}

fn boot_fail(code: u32, args: core::fmt::Arguments<'_>) -> ! {
    crate::console::emergency_write(format_args!("stencil: boot failed: {args}\n"));
    rt::fatal_exit(code)
}

/// Reads `hvm_start_info` through the boot mapping and copies what we keep.
///
/// # Safety
/// The boot page tables must be active and `start_info` must be what the loader passed in `ebx`.
unsafe fn copy_start_info(start_info: u64, d: &mut BootData) {
    let Some(info) = early_ptr::<u32>(start_info, 56) else {
        boot_fail(
            rt::EXIT_OOM,
            format_args!("start info at {start_info:#x} is not below 1 GiB"),
        );
    };
    // SAFETY: `info` points at the 56-byte hvm_start_info (version ≥ 1), mapped by the boot tables.
    let word = |i: usize| unsafe { info.add(i).read_volatile() };
    let qword = |i: usize| u64::from(word(i)) | (u64::from(word(i + 1)) << 32);
    if word(0) != PVH_MAGIC {
        boot_fail(
            rt::EXIT_OOM,
            format_args!(
                "bad hvm_start_info magic {:#x} (not booted through PVH?)",
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
    if let Some(p) = early_ptr::<u8>(cmdline_paddr, 1) {
        for i in 0..MAX_CMDLINE {
            // SAFETY: the loader's NUL-terminated command line, below 1 GiB; read until the NUL.
            let b = unsafe { p.add(i).read_volatile() };
            if b == 0 {
                break;
            }
            d.cmdline[i] = b;
            d.cmdline_len = i + 1;
        }
    }
    if entries == 0 {
        boot_fail(
            rt::EXIT_OOM,
            format_args!("the loader passed no memory map (PVH start info version {version})"),
        );
    }
    let n = entries.min(MAX_MAP);
    let Some(map) = early_ptr::<u8>(memmap_paddr, 24 * n as u64) else {
        boot_fail(
            rt::EXIT_OOM,
            format_args!("memory map at {memmap_paddr:#x} is not below 1 GiB"),
        );
    };
    for i in 0..n {
        // SAFETY: entry i of the loader's memory map (24 bytes each), below 1 GiB.
        let e = unsafe { map.add(24 * i) };
        // SAFETY: as above; unaligned reads because the table is only 8-byte aligned in practice.
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
}

/// First Rust code: called by the PVH entry with the start-info address and the entry TSC.
#[unsafe(no_mangle)]
extern "C" fn stencil_boot64(start_info: u64, entry_tsc: u64) -> ! {
    crate::console::init();
    gdt::init();
    traps::init();
    pic::remap_and_mask();
    crate::time::start_calibration(entry_tsc);
    BOOT_DATA.call_once(|| {
        let mut d = BootData {
            cmdline: [0; MAX_CMDLINE],
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
    let opts = match cmdline::parse_options(cmdline()) {
        Ok(o) => o,
        Err(e) => boot_fail(
            rt::EXIT_BAD_CMDLINE,
            format_args!(
                "bad kernel command line: {e}\n  command line: {}",
                cmdline()
            ),
        ),
    };
    crate::console::init_logger(opts.log);
    SHARE.store(opts.share, Ordering::Relaxed);
    // SAFETY: called once, with the boot tables active and the normalised map.
    if let Err(e) = unsafe { crate::mm::kernel::init(ram_ranges()) } {
        boot_fail(rt::EXIT_OOM, format_args!("{e}"));
    }
    let stack = match crate::stack::alloc(MAIN_STACK_SIZE) {
        Ok(s) => s,
        Err(e) => boot_fail(
            rt::EXIT_OOM,
            format_args!("cannot map the main stack: {e:?}"),
        ),
    };
    // SAFETY: switches to the freshly mapped main stack (16-byte aligned top) and calls a function
    // that never returns, so nothing on the old stack is used again.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {cont}",
            "ud2",
            top = in(reg) stack.top(),
            cont = sym continue_on_main_stack,
            options(noreturn)
        )
    }
}

extern "C" fn continue_on_main_stack() -> ! {
    match cmdline::parse_args(cmdline()) {
        Ok(args) => rt::set_args(args),
        Err(e) => boot_fail(
            rt::EXIT_BAD_CMDLINE,
            format_args!("bad app arguments: {e}\n  command line: {}", cmdline()),
        ),
    }
    crate::time::finish_calibration();
    rt::run_main()
}
