//! PCI configuration space through the legacy port-I/O mechanism (ports `0xCF8`/`0xCFC`), which
//! every PC chipset QEMU emulates (q35, i440fx) supports. On machines without PCI (microvm) the
//! ports read all ones, so a scan finds nothing.

use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

/// Port-I/O configuration access ("configuration mechanism #1").
#[derive(Debug)]
pub(crate) struct PortCam;

fn address(df: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(df.bus) << 16)
        | (u32::from(df.device) << 11)
        | (u32::from(df.function) << 8)
        | u32::from(offset & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        crate::arch::pci::config_read(address(df, offset))
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, value: u32) {
        // SAFETY: the caller (the virtio-drivers PCI code or our BAR setup) writes registers of
        // the one device it drives.
        unsafe { crate::arch::pci::config_write(address(df, offset), value) }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}
