//! Triple-faults on purpose: with an empty IDT, `ud2` cannot be delivered (→ #GP → #DF → reset).
//! QEMU runs with `-no-reboot`, exits 0, and xtask must report a crash (110), never success.
#![no_std]
#![no_main]

libos::main!(main);

fn main() {
    libos::println!("loading an empty IDT, then ud2");
    let idtr = [0u16; 5]; // limit 0, base 0
    #[allow(unsafe_code)]
    // SAFETY: not safe — it destroys exception handling on purpose to force a triple fault.
    unsafe {
        core::arch::asm!("lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn));
    }
}
