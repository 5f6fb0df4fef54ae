//! Device drivers. Today: one virtio-net NIC, found on virtio-mmio (microvm) or PCI (q35), driven
//! by the `virtio-drivers` crate through [`virtio::StencilHal`]. The NIC is polled (no
//! interrupts): see `docs/net.md`.

pub(crate) mod pci;
pub(crate) mod virtio;
