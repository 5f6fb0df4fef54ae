//! The legacy 8259 PICs: remapped to vectors 32..47 and fully masked.
//!
//! SeaBIOS (q35) leaves the PIT interrupt on vector 8, where it would look like a double fault as
//! soon as interrupts are enabled; remapping and masking first makes `sti` safe.

use ::x86_64::instructions::port::Port;

/// Remaps both PICs to vectors 32..47 and masks every line.
pub fn remap_and_mask() {
    let mut cmd1 = Port::<u8>::new(0x20);
    let mut data1 = Port::<u8>::new(0x21);
    let mut cmd2 = Port::<u8>::new(0xa0);
    let mut data2 = Port::<u8>::new(0xa1);
    // SAFETY: the standard 8259 initialisation sequence on the standard ports; it touches only the
    // PICs' state (on machines without a PIC the writes go nowhere).
    unsafe {
        cmd1.write(0x11); // ICW1: init, expect ICW4
        cmd2.write(0x11);
        data1.write(32); // ICW2: vector offsets
        data2.write(40);
        data1.write(4); // ICW3: slave on IRQ2
        data2.write(2);
        data1.write(1); // ICW4: 8086 mode
        data2.write(1);
        data1.write(0xff); // mask all
        data2.write(0xff);
    }
}
