//! The kernel GDT and TSS. The TSS gives double faults their own stack (IST1), so a kernel stack
//! overflow — whose page fault cannot be delivered on the overflowed stack — still gets reported.

use ::x86_64::VirtAddr;
use ::x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use ::x86_64::instructions::tables::load_tss;
use ::x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use ::x86_64::structures::tss::TaskStateSegment;
use spin::Once;

/// IST slot (0-based, as the IDT entry wants it) of the double-fault stack.
pub const DOUBLE_FAULT_IST: u16 = 0;

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(align(16))]
struct IstStack(#[allow(dead_code, reason = "only its address is used")] [u8; IST_STACK_SIZE]);

static mut DOUBLE_FAULT_STACK: IstStack = IstStack([0; IST_STACK_SIZE]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(
    GlobalDescriptorTable,
    SegmentSelector,
    SegmentSelector,
    SegmentSelector,
)> = Once::new();

/// Bounds `[bottom, top)` of the double-fault stack, for backtraces.
pub fn double_fault_stack() -> (u64, u64) {
    let bottom = (&raw const DOUBLE_FAULT_STACK) as u64;
    (bottom, bottom + IST_STACK_SIZE as u64)
}

/// Loads the GDT, reloads the segment registers and loads the TSS.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] =
            VirtAddr::new(double_fault_stack().1);
        tss
    });
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are a 64-bit code segment,
    // a data segment and an available TSS that lives for the rest of the run.
    unsafe {
        CS::set_reg(*code);
        DS::set_reg(*data);
        ES::set_reg(*data);
        SS::set_reg(*data);
        load_tss(*tss_sel);
    }
}
