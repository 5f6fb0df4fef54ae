//! PCI configuration space through the legacy port-I/O mechanism (ports `0xCF8`/`0xCFC`), which
//! every PC chipset QEMU emulates (q35, i440fx) supports. On machines without PCI (microvm) the
//! ports read all ones, so a scan finds nothing.

use ::x86_64::instructions::port::Port;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

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
        let mut addr = Port::<u32>::new(CONFIG_ADDRESS);
        let mut data = Port::<u32>::new(CONFIG_DATA);
        // SAFETY: the standard configuration-mechanism ports; a read of a dword of configuration
        // space has no side effect. Interrupts are off so the address/data pair is not split.
        ::x86_64::instructions::interrupts::without_interrupts(|| unsafe {
            addr.write(address(df, offset));
            data.read()
        })
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, value: u32) {
        let mut addr = Port::<u32>::new(CONFIG_ADDRESS);
        let mut data = Port::<u32>::new(CONFIG_DATA);
        // SAFETY: as in `read_word`; the caller (the virtio-drivers PCI code or our BAR setup)
        // writes registers of the one device it drives.
        ::x86_64::instructions::interrupts::without_interrupts(|| unsafe {
            addr.write(address(df, offset));
            data.write(value);
        })
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}
