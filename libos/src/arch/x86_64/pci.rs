//! PCI configuration mechanism #1: the address/data port pair `0xCF8`/`0xCFC`.

use ::x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Reads the configuration dword selected by `address` (enable bit, bus, device, function,
/// register). Interrupts are off meanwhile, so the address/data pair is not split.
pub fn config_read(address: u32) -> u32 {
    let mut addr = Port::<u32>::new(CONFIG_ADDRESS);
    let mut data = Port::<u32>::new(CONFIG_DATA);
    super::irq::without(|_| {
        // SAFETY: the standard configuration-mechanism ports (all ones where there is no PCI);
        // selecting and reading a dword of configuration space has no other side effect.
        unsafe {
            addr.write(address);
            data.read()
        }
    })
}

/// Writes `value` to the configuration dword selected by `address`.
///
/// # Safety
/// The register must belong to a device the caller drives, and the write must leave that device
/// in a state the rest of the system expects (e.g. a BAR the caller then maps).
pub unsafe fn config_write(address: u32, value: u32) {
    let mut addr = Port::<u32>::new(CONFIG_ADDRESS);
    let mut data = Port::<u32>::new(CONFIG_DATA);
    super::irq::without(|_| {
        // SAFETY: the configuration-mechanism ports; the caller vouches for the register.
        unsafe {
            addr.write(address);
            data.write(value);
        }
    })
}
