//! The NIC as smoltcp sees it: a virtio-net device ([`VirtIONetRaw`]) with receive buffers that
//! stay posted to the device and transmit buffers that are reclaimed when the device is done.
//!
//! Receive: `QUEUE` buffers of [`BUF_LEN`] bytes are posted at start; a completed one is copied
//! out into the [`RxToken`] and posted again at once. Transmit: each frame gets its own heap
//! buffer (virtio header + frame), submitted without waiting; completed ones are reclaimed on the
//! next poll. All buffers are [`DmaBuf`]s in the kernel heap: 2 KiB, 2 KiB-aligned, so none
//! crosses a page and the HAL hands the device its physical address (a page-table walk) without
//! ever bouncing it — the kernel heap is not physically contiguous across pages.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::SomeTransport;

use crate::drivers::virtio::StencilHal;

/// Descriptors per virtqueue.
const QUEUE: usize = 64;
/// Bytes per receive buffer: virtio-net header (≤ 12) + a 1514-byte Ethernet frame, rounded up.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame we send or accept (no VLAN tags, no jumbo frames).
const MTU: usize = 1514;

type Raw = VirtIONetRaw<StencilHal, SomeTransport<'static>, QUEUE>;

/// One device buffer: aligned to its size, so it lies inside one 4 KiB page (one frame).
#[repr(C, align(2048))]
struct DmaBuf([u8; BUF_LEN]);

impl DmaBuf {
    fn new() -> Box<DmaBuf> {
        Box::new(DmaBuf([0; BUF_LEN]))
    }
}

pub(crate) struct Nic {
    raw: Raw,
    /// Posted receive buffers, by virtqueue token.
    rx: Vec<Option<Box<DmaBuf>>>,
    /// Frames handed to the device and not yet reclaimed, by token: the buffer and the bytes used.
    tx: Vec<Option<(Box<DmaBuf>, usize)>>,
    tx_in_flight: usize,
    pub(crate) rx_frames: u64,
    pub(crate) tx_frames: u64,
}

impl Nic {
    pub(crate) fn new(transport: SomeTransport<'static>) -> Result<Nic, String> {
        let mut raw = Raw::new(transport).map_err(|e| format!("{e}"))?;
        // Polled: the device need not interrupt (see the module docs of `net`).
        raw.disable_interrupts();
        let mut rx = Vec::with_capacity(QUEUE);
        rx.resize_with(QUEUE, || None);
        let mut tx = Vec::with_capacity(QUEUE);
        tx.resize_with(QUEUE, || None);
        let mut nic = Nic {
            raw,
            rx,
            tx,
            tx_in_flight: 0,
            rx_frames: 0,
            tx_frames: 0,
        };
        for _ in 0..QUEUE {
            nic.post_rx(DmaBuf::new())
                .map_err(|e| format!("posting receive buffers: {e}"))?;
        }
        Ok(nic)
    }

    pub(crate) fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    fn post_rx(&mut self, mut buf: Box<DmaBuf>) -> virtio_drivers::Result<()> {
        // SAFETY: the buffer is kept in `self.rx` at its token and not touched until the device
        // returns it (`receive_complete` in `receive`); it lives in the heap, so moving the Box
        // does not move the bytes.
        let token = unsafe { self.raw.receive_begin(&mut buf.0)? };
        self.rx[usize::from(token)] = Some(buf);
        Ok(())
    }

    /// Takes back transmit buffers the device has finished with.
    pub(crate) fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some((buf, used)) = self.tx[usize::from(token)].take() else {
                log::error!("net: the device completed unknown transmit token {token}");
                return;
            };
            // SAFETY: `buf[..used]` is the slice submitted with `token` (kept untouched in
            // `self.tx`).
            if let Err(e) = unsafe { self.raw.transmit_complete(token, &buf.0[..used]) } {
                log::warn!("net: transmit failed: {e}");
            }
            self.tx_in_flight -= 1;
        }
    }

    fn send(&mut self, frame: Box<DmaBuf>, used: usize) {
        self.reclaim_tx();
        // SAFETY: `frame` is kept in `self.tx` at its token, untouched, until `reclaim_tx` gets
        // it back from the device; its bytes live in the heap, so moving the Box does not move
        // them.
        match unsafe { self.raw.transmit_begin(&frame.0[..used]) } {
            Ok(token) => {
                self.tx[usize::from(token)] = Some((frame, used));
                self.tx_in_flight += 1;
                self.tx_frames += 1;
            }
            Err(e) => log::warn!("net: dropped an outgoing frame: {e}"),
        }
    }
}

/// A received frame, copied out of the device's buffer.
pub(crate) struct RxToken(Vec<u8>);

/// Permission to send one frame.
pub(crate) struct TxToken<'a>(&'a mut Nic);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = DmaBuf::new();
        let Ok(hdr) = self.0.raw.fill_buffer_header(&mut frame.0) else {
            // Unreachable with a 2 KiB buffer; never panic in the network path.
            log::error!("net: no room for the virtio-net header; frame dropped");
            return f(&mut vec![0u8; len]);
        };
        let Some(used) = hdr.checked_add(len).filter(|&u| u <= BUF_LEN) else {
            // smoltcp sends at most the MTU (1514 bytes), which always fits.
            log::error!("net: a {len}-byte frame does not fit a {BUF_LEN}-byte buffer; dropped");
            return f(&mut vec![0u8; len]);
        };
        let r = f(&mut frame.0[hdr..used]);
        self.0.send(frame, used);
        r
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let token = self.raw.poll_receive()?;
        let mut buf = self.rx[usize::from(token)].take()?;
        // SAFETY: `buf` is the buffer posted with `token`.
        let done = unsafe { self.raw.receive_complete(token, &mut buf.0) };
        let frame = match done {
            Ok((hdr, len)) => buf.0.get(hdr..hdr.saturating_add(len)).map(<[u8]>::to_vec),
            Err(e) => {
                log::warn!("net: bad receive completion: {e}");
                None
            }
        };
        if let Err(e) = self.post_rx(buf) {
            log::error!("net: cannot re-post a receive buffer: {e}");
        }
        self.rx_frames += 1;
        Some((RxToken(frame?), TxToken(self)))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        if !self.raw.can_send() {
            self.reclaim_tx();
        }
        self.raw.can_send().then_some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QUEUE / 2);
        caps
    }
}
