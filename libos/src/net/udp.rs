//! UDP: [`UdpSocket`] bound to a local port, sending and receiving datagrams.
//!
//! A [`UdpSocket`] is a handle ([`crate::handle::Owned`]) to a socket kept in the kernel: only
//! its owner task may use it, the owner's drop (or end) closes it, a forked copy is inert, and
//! [`crate::handle::Give`] hands it to a child.

use alloc::vec;
use core::time::Duration;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp::{self, PacketBuffer, PacketMetadata, SendError};
use smoltcp::wire::{IpAddress, IpEndpoint};

use super::{Ipv4Addr, NetError, block_on, with_net};
use crate::handle::{Give, Owned};

/// Datagrams each direction of a socket can hold.
const PACKETS: usize = 32;
/// Payload bytes each direction of a socket can hold.
const BYTES: usize = 16 << 10;

/// A UDP socket bound to a local port.
///
/// A handle, owned by the task that bound it: any other task (one holding a forked copy) gets
/// [`NetError::Handle`]; dropping it in the owner, or the owner's end, closes the socket and frees
/// the port. Not `Send`: a child gets it by a give ([`Give`]).
#[derive(Debug)]
pub struct UdpSocket {
    port: u16,
    inner: Owned<Udp>,
}

/// The socket, in the kernel.
#[derive(Debug)]
struct Udp {
    handle: SocketHandle,
    port: u16,
}

impl UdpSocket {
    /// Binds `port` (not 0).
    pub fn bind(port: u16) -> Result<UdpSocket, NetError> {
        let _k = crate::mm::ctx::kernel();
        if port == 0 {
            return Err(NetError::InvalidInput("UDP port 0"));
        }
        with_net(|net| {
            if net.udp_ports.contains(&port) {
                return Err(NetError::AddrInUse { port });
            }
            let mut s = udp::Socket::new(
                PacketBuffer::new(vec![PacketMetadata::EMPTY; PACKETS], vec![0; BYTES]),
                PacketBuffer::new(vec![PacketMetadata::EMPTY; PACKETS], vec![0; BYTES]),
            );
            s.bind(port)
                .map_err(|_| NetError::InvalidInput("UDP port"))?;
            net.udp_ports.push(port);
            // Registered while the stack is locked: a task killed right after still owns it.
            Ok(UdpSocket {
                port,
                inner: Owned::new(Udp {
                    handle: net.sockets.add(s),
                    port,
                }),
            })
        })?
    }

    /// The socket, if the running task owns it.
    fn handle(&self) -> Result<SocketHandle, NetError> {
        Ok(self.inner.try_with(|u| u.handle)?)
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one datagram to `addr:port`, waiting while the send buffer is full.
    pub fn send_to(&self, data: &[u8], addr: Ipv4Addr, port: u16) -> Result<(), NetError> {
        let _k = crate::mm::ctx::kernel();
        let handle = self.handle()?;
        if port == 0 {
            return Err(NetError::InvalidInput("destination port 0"));
        }
        if data.len() > BYTES {
            return Err(NetError::MessageTooLarge { len: data.len() });
        }
        let to = IpEndpoint::new(IpAddress::Ipv4(addr), port);
        block_on(None, |net| {
            let s = net.sockets.get_mut::<udp::Socket>(handle);
            match s.send_slice(data, to) {
                Ok(()) => Some(Ok(())),
                Err(SendError::BufferFull) => None,
                Err(SendError::Unaddressable) => Some(Err(NetError::InvalidInput(
                    "unaddressable destination (unspecified address, or no route)",
                ))),
            }
        })
    }

    /// Receives one datagram into `buf`, waiting for it. Returns its length and sender. A
    /// datagram longer than `buf` is never truncated: the call answers
    /// [`NetError::MessageTooLarge`] with its length and leaves it queued for a larger buffer
    /// (or for [`discard`](Self::discard)).
    pub fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, Ipv4Addr, u16), NetError> {
        let _k = crate::mm::ctx::kernel();
        self.recv_from_timeout(buf, None)
    }

    /// As [`recv_from`](Self::recv_from), giving up with [`NetError::TimedOut`] after `timeout`.
    pub fn recv_from_timeout(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<(usize, Ipv4Addr, u16), NetError> {
        let _k = crate::mm::ctx::kernel();
        let handle = self.handle()?;
        block_on(timeout, |net| {
            let s = net.sockets.get_mut::<udp::Socket>(handle);
            if !s.can_recv() {
                return None;
            }
            // Peek first so that a datagram longer than `buf` stays queued.
            let (n, from) = {
                let (payload, meta) = s.peek().ok()?;
                let n = payload.len();
                if n > buf.len() {
                    return Some(Err(NetError::MessageTooLarge { len: n }));
                }
                buf[..n].copy_from_slice(payload);
                (n, meta.endpoint)
            };
            let _ = s.recv();
            let IpAddress::Ipv4(a) = from.addr;
            Some(Ok((n, a, from.port)))
        })
    }

    /// Drops the next queued datagram without reading it, e.g. one that
    /// [`recv_from`](Self::recv_from) answered with [`NetError::MessageTooLarge`] and the app
    /// does not want to read with a larger buffer (otherwise one oversized datagram would stay at
    /// the head of the queue). Returns its length and sender, or `None` if nothing is queued;
    /// never waits.
    pub fn discard(&self) -> Result<Option<(usize, Ipv4Addr, u16)>, NetError> {
        let _k = crate::mm::ctx::kernel();
        let handle = self.handle()?;
        with_net(|net| {
            let s = net.sockets.get_mut::<udp::Socket>(handle);
            s.recv().ok().map(|(payload, meta)| {
                let IpAddress::Ipv4(a) = meta.endpoint.addr;
                (payload.len(), a, meta.endpoint.port)
            })
        })
    }
}

impl crate::handle::sealed::Sealed for UdpSocket {}

impl Give for UdpSocket {
    fn give_to(&self, task: u64) {
        self.inner.give_to(task);
    }
}

impl Drop for Udp {
    fn drop(&mut self) {
        let _ = with_net(|net| {
            net.sockets.remove(self.handle);
            net.udp_ports.retain(|&p| p != self.port);
        });
    }
}
