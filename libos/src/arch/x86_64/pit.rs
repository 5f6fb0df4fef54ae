//! PIT channel 0 as a reference clock for calibrating the TSC.
//!
//! Channel 0 is set to mode 0 counting down from 0xffff at 1.193182 MHz; the latched count tells
//! how many PIT ticks (at `crate::calibrate::PIT_HZ`) have passed, modulo 2^16: the counter wraps every 54.9 ms, and
//! [`crate::calibrate`] counts the wraps. Works on microvm and q35, TCG and KVM.

use ::x86_64::instructions::port::Port;

/// Starts channel 0 counting down from 0xffff.
pub fn start() {
    let mut cmd = Port::<u8>::new(0x43);
    let mut ch0 = Port::<u8>::new(0x40);
    // SAFETY: programs PIT channel 0 (mode 0, lo/hi byte, binary); nothing else uses the PIT.
    unsafe {
        cmd.write(0x30);
        ch0.write(0xff);
        ch0.write(0xff);
    }
}

/// PIT ticks since [`start`], modulo 2^16 (the counter wraps after 0).
pub fn elapsed_ticks() -> u16 {
    let mut cmd = Port::<u8>::new(0x43);
    let mut ch0 = Port::<u8>::new(0x40);
    // SAFETY: latch-and-read of channel 0's count; reads have no other side effect.
    let count = unsafe {
        cmd.write(0x00);
        let lo = ch0.read() as u16;
        let hi = ch0.read() as u16;
        lo | (hi << 8)
    };
    0xffff_u16.wrapping_sub(count)
}
