//! TCP: [`TcpListener`] (listen/accept) and [`TcpStream`] (read/write/close).
//!
//! smoltcp has no listen backlog: a listening socket *becomes* the connection when a SYN arrives.
//! A [`TcpListener`] therefore keeps `backlog` listening sockets on its port; [`accept`] hands
//! out one that has connected and puts a fresh listening socket in its place. A connection that
//! arrives while all `backlog` sockets are taken is refused (RST), as a full backlog is on Linux.
//!
//! [`TcpStream::close`] (or dropping the stream) sends the remaining data and a FIN; the socket
//! stays in the stack until the peer has acknowledged everything (or [`CLOSE_TIMEOUT`] passes),
//! then it is removed and its buffers freed.
//!
//! **Ownership.** A [`TcpListener`] and a [`TcpStream`] are handles ([`crate::handle::Owned`])
//! to sockets kept in the kernel: only their owner task may use them (any other task, e.g. a
//! child holding a forked copy, gets [`NetError::Handle`]), the owner's drop closes the socket (a
//! forked copy's drop does nothing), [`crate::handle::Give`] hands one to a child, and when the
//! owner ends — returns, panics, faults or is killed — the kernel closes what it still owns (the
//! peer sees a FIN; a listener's pending connections are reset).
//!
//! [`accept`]: TcpListener::accept

use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpAddress;

use super::{Ipv4Addr, NetError, NetState, block_on, with_net};
use crate::handle::{Give, Owned};

/// Listening sockets a [`TcpListener`] keeps by default.
pub const DEFAULT_BACKLOG: usize = 16;
/// Most listening sockets one [`TcpListener`] may keep (each holds `RX_BUFFER + TX_BUFFER` of
/// kernel heap: 256 take 10 MiB).
pub const MAX_BACKLOG: usize = 256;
/// Receive buffer of each TCP socket.
pub const RX_BUFFER: usize = 8 << 10;
/// Send buffer of each TCP socket.
pub const TX_BUFFER: usize = 32 << 10;
/// How long a closed stream may take to deliver its last data before it is aborted.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

fn new_listening(net: &mut NetState, port: u16) -> SocketHandle {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
    );
    s.listen(port).expect("port is not 0 and the socket is new");
    // Nagle would hold back the last small segment of a response until the ACK of the previous
    // one: with request/response traffic that only adds latency.
    s.set_nagle_enabled(false);
    net.sockets.add(s)
}

/// A TCP port accepting connections.
///
/// A handle: owned by the task that bound it (see the [`net`](crate::net) docs and
/// [`crate::handle`]); only the owner may accept, other tasks get [`NetError::Handle`]. Dropping
/// it in the owner (or the owner's end) frees the port and resets connections not yet accepted.
///
/// Not `Send`: a `task::spawn` closure cannot capture it; hand it over with [`Give`].
///
/// ```compile_fail,E0277
/// let mut l = libos::net::TcpListener::bind(80).expect("bind");
/// libos::task::spawn(&[], move || l.accept().is_ok() as i32); // refused: not `Send`
/// ```
#[derive(Debug)]
pub struct TcpListener {
    port: u16,
    inner: Owned<Listener>,
}

/// A listener's sockets, in the kernel.
#[derive(Debug)]
struct Listener {
    port: u16,
    backlog: Vec<SocketHandle>,
}

impl TcpListener {
    /// Listens on `port` with room for 16 (`DEFAULT_BACKLOG`) connections not yet accepted.
    pub fn bind(port: u16) -> Result<TcpListener, NetError> {
        Self::bind_with_backlog(port, DEFAULT_BACKLOG)
    }

    /// Listens on `port` with room for `backlog` connections not yet accepted (1 to
    /// [`MAX_BACKLOG`]; each is a socket with its buffers in the kernel heap). Port 0 or a
    /// backlog outside that range is [`NetError::InvalidInput`], checked before the network is.
    pub fn bind_with_backlog(port: u16, backlog: usize) -> Result<TcpListener, NetError> {
        let _k = crate::mm::ctx::kernel();
        if port == 0 {
            return Err(NetError::InvalidInput("TCP port 0"));
        }
        if backlog == 0 {
            return Err(NetError::InvalidInput("backlog 0"));
        }
        if backlog > MAX_BACKLOG {
            return Err(NetError::InvalidInput("backlog above MAX_BACKLOG (256)"));
        }
        with_net(|net| {
            if net.tcp_ports.contains(&port) {
                return Err(NetError::AddrInUse { port });
            }
            net.tcp_ports.push(port);
            let backlog = (0..backlog).map(|_| new_listening(net, port)).collect();
            // Registered while the stack is locked (interrupts off): a task killed right after
            // still owns it, so its end frees the port.
            Ok(TcpListener {
                port,
                inner: Owned::new(Listener { port, backlog }),
            })
        })?
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for a connection. [`NetError::Handle`] in a task that does not own the listener.
    pub fn accept(&mut self) -> Result<TcpStream, NetError> {
        let _k = crate::mm::ctx::kernel();
        self.inner
            .try_with(|l| block_on(None, |net| l.take_ready(net).map(Ok)))?
    }

    /// A connection if one is waiting, else `None` at once.
    pub fn try_accept(&mut self) -> Result<Option<TcpStream>, NetError> {
        let _k = crate::mm::ctx::kernel();
        self.inner.try_with(|l| with_net(|net| l.take_ready(net)))?
    }
}

impl crate::handle::sealed::Sealed for TcpListener {}

impl Give for TcpListener {
    fn give_to(&self, task: u64) {
        self.inner.give_to(task);
    }
}

impl Listener {
    /// A connected socket of the backlog (replaced by a fresh listening one), registered as a
    /// stream of the running task while the stack is locked (so a kill right after cannot lose
    /// the socket: the task's end closes it).
    fn take_ready(&mut self, net: &mut NetState) -> Option<TcpStream> {
        // A connection reset before it was accepted leaves its socket Closed: put a fresh
        // listening socket in its place, or the backlog would shrink for good.
        for slot in self.backlog.iter_mut() {
            if net.sockets.get::<tcp::Socket>(*slot).state() == State::Closed {
                net.sockets.remove(*slot);
                *slot = new_listening(net, self.port);
            }
        }
        let i = self.backlog.iter().position(|&h| {
            let s = net.sockets.get::<tcp::Socket>(h);
            // Established, or already past it (the peer sent its request and a FIN).
            !matches!(
                s.state(),
                State::Listen | State::SynReceived | State::Closed
            )
        })?;
        let h = self.backlog[i];
        self.backlog[i] = new_listening(net, self.port);
        net.accepted += 1;
        let peer = net
            .sockets
            .get::<tcp::Socket>(h)
            .remote_endpoint()
            .map(|e| {
                let IpAddress::Ipv4(a) = e.addr;
                (a, e.port)
            });
        Some(TcpStream::new(h, peer))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = with_net(|net| {
            for h in self.backlog.drain(..) {
                // Connections not yet accepted are reset.
                net.sockets.get_mut::<tcp::Socket>(h).abort();
                net.closing.push((h, 0));
            }
            net.tcp_ports.retain(|&p| p != self.port);
        });
    }
}

/// One TCP connection.
///
/// A handle: owned by the task that accepted it (see the [`net`](crate::net) docs and
/// [`crate::handle`]). Only the owner may read, write or close it; any other task (a child
/// holding a forked copy) gets [`NetError::Handle`] (`close` panics there, naming the stream).
/// Dropping it in the owner closes the connection (a forked copy's drop does nothing); when the
/// owner ends, however it ends, the kernel closes it and the peer sees a FIN.
///
/// Not `Send`: a `task::spawn` closure cannot capture it. A child gets one by a give
/// ([`Give`], e.g. `libos::task::spawn_with`).
///
/// ```compile_fail,E0277
/// let mut l = libos::net::TcpListener::bind(80).expect("bind");
/// let mut s = l.accept().expect("accept");
/// libos::task::spawn(&[], move || {
///     s.write_all(b"hi").is_ok() as i32 // refused: `TcpStream` is not `Send`
/// });
/// ```
#[derive(Debug)]
pub struct TcpStream {
    peer: Option<(Ipv4Addr, u16)>,
    inner: Owned<Stream>,
}

/// A connection's socket, in the kernel. Dropping it closes the connection.
#[derive(Debug)]
struct Stream {
    handle: Option<SocketHandle>,
}

impl TcpStream {
    fn new(h: SocketHandle, peer: Option<(Ipv4Addr, u16)>) -> TcpStream {
        TcpStream {
            peer,
            inner: Owned::new(Stream { handle: Some(h) }),
        }
    }

    /// The socket, if the running task owns the stream.
    fn handle(&self) -> Result<SocketHandle, NetError> {
        Ok(self
            .inner
            .try_with(|s| s.handle.expect("a live stream has a socket"))?)
    }

    /// The peer's address and port.
    pub fn peer_addr(&self) -> Option<(Ipv4Addr, u16)> {
        self.peer
    }

    /// Reads what has arrived into `buf`, waiting until at least one byte has. `Ok(0)`: the peer
    /// closed its side (end of stream).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        let _k = crate::mm::ctx::kernel();
        self.read_timeout(buf, None)
    }

    /// As [`read`](Self::read), giving up with [`NetError::TimedOut`] after `timeout`.
    pub fn read_timeout(
        &mut self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, NetError> {
        let _k = crate::mm::ctx::kernel();
        let h = self.handle()?;
        if buf.is_empty() {
            return Ok(0);
        }
        block_on(timeout, |net| {
            let s = net.sockets.get_mut::<tcp::Socket>(h);
            if s.can_recv() {
                return Some(s.recv_slice(buf).map_err(|_| NetError::NotConnected));
            }
            if !s.may_recv() {
                // Nothing buffered and the peer will send no more (FIN, reset or abort).
                return Some(Ok(0));
            }
            None
        })
    }

    /// Queues as much of `data` as fits in the send buffer, waiting until something fits.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, NetError> {
        let _k = crate::mm::ctx::kernel();
        let h = self.handle()?;
        if data.is_empty() {
            return Ok(0);
        }
        block_on(None, |net| {
            let s = net.sockets.get_mut::<tcp::Socket>(h);
            if !s.may_send() {
                return Some(Err(if s.state() == State::Closed {
                    NetError::ConnectionReset
                } else {
                    NetError::NotConnected
                }));
            }
            if s.can_send() {
                return Some(s.send_slice(data).map_err(|_| NetError::NotConnected));
            }
            None
        })
    }

    /// Writes all of `data`.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), NetError> {
        while !data.is_empty() {
            let n = self.write(data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Waits until everything written has been acknowledged by the peer.
    pub fn flush(&mut self) -> Result<(), NetError> {
        let _k = crate::mm::ctx::kernel();
        let h = self.handle()?;
        block_on(None, |net| {
            let s = net.sockets.get::<tcp::Socket>(h);
            if s.send_queue() == 0 {
                Some(Ok(()))
            } else if !s.may_send() && s.state() == State::Closed {
                Some(Err(NetError::ConnectionReset))
            } else {
                None
            }
        })
    }

    /// Closes the connection: what was written is still delivered, then a FIN. Returns at once;
    /// the stack finishes the close in the background. Panics (ending only the running task) in
    /// a task that does not own the stream.
    pub fn close(self) {
        let _k = crate::mm::ctx::kernel();
        self.inner.with(Stream::close);
    }
}

impl crate::handle::sealed::Sealed for TcpStream {}

impl Give for TcpStream {
    fn give_to(&self, task: u64) {
        self.inner.give_to(task);
    }
}

impl Stream {
    fn close(&mut self) {
        let Some(h) = self.handle.take() else { return };
        let _ = with_net(|net| {
            net.sockets.get_mut::<tcp::Socket>(h).close();
            let deadline = super::now().total_micros() + CLOSE_TIMEOUT.as_micros() as i64;
            net.closing.push((h, deadline));
        });
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.close();
    }
}

/// Removes closing sockets that are done (closed, or in TIME-WAIT: everything was delivered and
/// acknowledged) or out of time (aborted: the peer gets a RST).
pub(super) fn retire_closing(net: &mut NetState, now_us: i64) {
    let mut i = 0;
    while i < net.closing.len() {
        let (h, deadline) = net.closing[i];
        let s = net.sockets.get_mut::<tcp::Socket>(h);
        let done = matches!(s.state(), State::Closed | State::TimeWait);
        if done || now_us >= deadline {
            if !done {
                s.abort();
            }
            net.sockets.remove(h);
            net.closing.swap_remove(i);
        } else {
            i += 1;
        }
    }
}
