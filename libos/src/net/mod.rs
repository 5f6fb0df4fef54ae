//! Networking: a virtio-net NIC, the smoltcp TCP/IP stack, and a small socket API for apps.
//!
//! ```no_run
//! use libos::net::{self, TcpListener};
//! let info = net::init().expect("network");
//! libos::println!("listening on {}:80", info.address);
//! let mut listener = TcpListener::bind(80).expect("bind");
//! let mut stream = listener.accept().expect("accept");
//! let mut buf = [0u8; 512];
//! let n = stream.read(&mut buf).expect("read");
//! stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello\n").expect("write");
//! stream.close();
//! ```
//!
//! **Polling, not interrupts.** One global stack (`NetState` behind an `IrqMutex`) owns the
//! NIC, the smoltcp interface and every socket. Each socket call polls the interface (moves frames
//! between the NIC and the sockets) before and after it looks at its socket; a call that would
//! block yields the CPU ([`crate::task::yield_now`]) and tries again, so the other tasks — which
//! poll too — keep the stack moving. A task that has nothing else to do can call [`poll`]. Under
//! QEMU's TCG this costs some host CPU while the guest waits, and buys simplicity: no IRQ routing
//! (IO-APIC on microvm, INTx/MSI-X on q35), no wake-up lists. See `docs/net.md`.
//!
//! **Tasks.** The stack lives in the kernel heap and statics, which every task's address space
//! shares (the kernel half). An app holds only handles ([`crate::handle::Owned`]): a socket
//! belongs to the task that made it, which alone may use it; a task spawned from a fork of its
//! memory holds an inert copy (using it is [`NetError::Handle`], dropping it does nothing) until
//! the socket is given to it ([`crate::handle::Give`], e.g. with `libos::task::spawn_with`).
//! When a task ends, however it ends, the kernel closes every socket it still owns.

mod device;
mod tcp;
mod udp;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};

pub use core::net::Ipv4Addr;
pub use tcp::{MAX_BACKLOG, TcpListener, TcpStream};
pub use udp::UdpSocket;

use crate::arch::irq::IrqMutex;
use device::Nic;

/// How long [`init`] waits for a DHCP lease before giving up.
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, for every call of the network API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// No virtio-net device was found (QEMU was started without a NIC).
    NoDevice,
    /// The NIC reports its link as down.
    LinkDown {
        /// Where the NIC is, e.g. "virtio-mmio at 0xfeb00e00".
        nic: String,
    },
    /// The NIC was found but could not be initialised.
    DeviceInit {
        /// Where the NIC is.
        nic: String,
        /// The driver's reason.
        reason: String,
    },
    /// No DHCP server answered in time.
    DhcpTimeout {
        /// How long we waited.
        waited: Duration,
    },
    /// The network was used before [`init`] succeeded.
    NotInitialized,
    /// [`init`] was called twice.
    AlreadyInitialized,
    /// Another socket of this kind already uses the port.
    AddrInUse {
        /// The port.
        port: u16,
    },
    /// Port 0 or another argument the call cannot take.
    InvalidInput(&'static str),
    /// The connection is closed for this direction (the peer reset it, or it was closed).
    NotConnected,
    /// The peer reset the connection.
    ConnectionReset,
    /// The call did not complete within its timeout.
    TimedOut,
    /// The datagram does not fit the socket's buffer (`send_to`) or the caller's (`recv_from`:
    /// it stays queued).
    MessageTooLarge {
        /// Its size.
        len: usize,
    },
    /// The running task may not use this socket: it does not own it (a forked copy of the
    /// handle, or a socket given to another task), or it is gone.
    Handle(crate::handle::HandleError),
}

impl From<crate::handle::HandleError> for NetError {
    fn from(e: crate::handle::HandleError) -> NetError {
        NetError::Handle(e)
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NoDevice => write!(
                f,
                "no network device: no virtio-net NIC on virtio-mmio or PCI (start QEMU with a \
                 NIC, e.g. `cargo xtask run APP --port 8080:80`)"
            ),
            NetError::LinkDown { nic } => write!(f, "network link is down on the NIC ({nic})"),
            NetError::DeviceInit { nic, reason } => {
                write!(f, "cannot initialise the NIC ({nic}): {reason}")
            }
            NetError::DhcpTimeout { waited } => write!(
                f,
                "no DHCP lease after {} s (no DHCP server on the link?)",
                waited.as_secs()
            ),
            NetError::NotInitialized => write!(f, "network used before net::init()"),
            NetError::AlreadyInitialized => write!(f, "net::init() called twice"),
            NetError::AddrInUse { port } => write!(f, "port {port} is already in use"),
            NetError::InvalidInput(what) => write!(f, "invalid argument: {what}"),
            NetError::NotConnected => write!(f, "not connected (the connection is closed)"),
            NetError::ConnectionReset => write!(f, "connection reset by peer"),
            NetError::TimedOut => write!(f, "timed out"),
            NetError::MessageTooLarge { len } => {
                write!(f, "datagram of {len} bytes does not fit the buffer")
            }
            NetError::Handle(e) => write!(f, "cannot use this socket: {e}"),
        }
    }
}

/// How the interface got its address, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInfo {
    /// The NIC's location ("virtio-mmio at 0x…" or "PCI 00:02.0").
    pub nic: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// The interface's IPv4 address.
    pub address: Ipv4Addr,
    /// Prefix length of the local network.
    pub prefix_len: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// True when the address came from DHCP.
    pub dhcp: bool,
}

impl fmt::Display for NetInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mac;
        write!(
            f,
            "{}/{} via {} ({}), MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {}",
            self.address,
            self.prefix_len,
            self.gateway
                .map_or_else(|| String::from("no gateway"), |g| format!("gateway {g}")),
            if self.dhcp { "DHCP" } else { "static" },
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            self.nic
        )
    }
}

/// Counters of the stack, for status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames received from the NIC.
    pub rx_frames: u64,
    /// Frames handed to the NIC.
    pub tx_frames: u64,
    /// Sockets currently in the stack (listening, connected, closing, UDP).
    pub sockets: usize,
    /// TCP connections accepted since boot.
    pub accepted: u64,
}

/// Everything the stack owns. One instance, behind [`NET`].
pub(crate) struct NetState {
    iface: Interface,
    dev: Nic,
    sockets: SocketSet<'static>,
    /// Ports with a [`TcpListener`].
    tcp_ports: Vec<u16>,
    /// Ports with a [`UdpSocket`].
    udp_ports: Vec<u16>,
    /// Closed streams still sending their last data / FIN: (socket, give-up time in µs).
    closing: Vec<(SocketHandle, i64)>,
    accepted: u64,
    info: NetInfo,
}

static NET: IrqMutex<Option<NetState>> = IrqMutex::new(None);

fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(crate::time::uptime().as_micros() as i64)
}

impl NetState {
    /// Moves frames between the NIC and the sockets until nothing changes, then retires closed
    /// streams.
    fn poll(&mut self) {
        let t = now();
        // Bounded: each round handles a batch of frames; a flood must not starve the caller.
        for _ in 0..8 {
            let r = self.iface.poll(t, &mut self.dev, &mut self.sockets);
            if r == smoltcp::iface::PollResult::None {
                break;
            }
        }
        self.dev.reclaim_tx();
        tcp::retire_closing(self, t.total_micros());
    }
}

/// Runs `f` on the stack after polling it. [`NetError::NotInitialized`] before [`init`].
pub(crate) fn with_net<R>(f: impl FnOnce(&mut NetState) -> R) -> Result<R, NetError> {
    let mut guard = NET.lock();
    let net = guard.as_mut().ok_or(NetError::NotInitialized)?;
    net.poll();
    let r = f(net);
    net.poll();
    Ok(r)
}

/// Moves frames between the NIC and the sockets. Socket calls do this themselves; an idle task
/// can call it to keep connections moving. Does nothing before [`init`].
pub fn poll() {
    let _k = crate::mm::ctx::kernel();
    if let Some(net) = NET.lock().as_mut() {
        net.poll();
    }
}

/// The interface's configuration (after [`init`]).
pub fn info() -> Option<NetInfo> {
    let _k = crate::mm::ctx::kernel();
    NET.lock().as_ref().map(|n| n.info.clone())
}

/// Counters of the stack (zero before [`init`]).
pub fn stats() -> NetStats {
    let _k = crate::mm::ctx::kernel();
    NET.lock()
        .as_ref()
        .map_or_else(NetStats::default, |n| NetStats {
            rx_frames: n.dev.rx_frames,
            tx_frames: n.dev.tx_frames,
            sockets: n.sockets.iter().count(),
            accepted: n.accepted,
        })
}

/// Brings the network up: finds the NIC, then gets an address by DHCP (waiting up to
/// [`DHCP_TIMEOUT`]). QEMU's user networking hands out 10.0.2.15/24 with gateway 10.0.2.2.
pub fn init() -> Result<NetInfo, NetError> {
    let _k = crate::mm::ctx::kernel();
    let mut state = bring_up()?;
    let mut dhcp = dhcpv4::Socket::new();
    // Ask quickly: QEMU's DHCP server answers at once; the default first retry is 10 s.
    let mut retry = dhcpv4::RetryConfig::default();
    retry.discover_timeout = smoltcp::time::Duration::from_millis(500);
    retry.initial_request_timeout = smoltcp::time::Duration::from_millis(500);
    dhcp.set_retry_config(retry);
    let handle = state.sockets.add(dhcp);
    let start = crate::time::uptime();
    let config = loop {
        state.poll();
        if let Some(dhcpv4::Event::Configured(c)) =
            state.sockets.get_mut::<dhcpv4::Socket>(handle).poll()
        {
            break (c.address, c.router);
        }
        if crate::time::uptime() - start > DHCP_TIMEOUT {
            return Err(NetError::DhcpTimeout {
                waited: DHCP_TIMEOUT,
            });
        }
        crate::task::yield_now();
    };
    // The lease from QEMU's server lasts a day; the app's run is shorter. Drop the DHCP socket
    // so it stops polling (renewal is not handled).
    state.sockets.remove(handle);
    configure(&mut state, config.0, config.1, true);
    finish(state)
}

/// Brings the network up with a fixed address (no DHCP), e.g. `10.0.2.15/24` via `10.0.2.2` on
/// QEMU's user networking.
pub fn init_static(
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<NetInfo, NetError> {
    let _k = crate::mm::ctx::kernel();
    if prefix_len > 32 {
        return Err(NetError::InvalidInput("prefix length above 32"));
    }
    let mut state = bring_up()?;
    configure(
        &mut state,
        Ipv4Cidr::new(address, prefix_len),
        gateway,
        false,
    );
    finish(state)
}

fn finish(state: NetState) -> Result<NetInfo, NetError> {
    let info = state.info.clone();
    let mut guard = NET.lock();
    if guard.is_some() {
        return Err(NetError::AlreadyInitialized);
    }
    *guard = Some(state);
    log::info!("net: {info}");
    Ok(info)
}

fn configure(state: &mut NetState, cidr: Ipv4Cidr, gateway: Option<Ipv4Addr>, dhcp: bool) {
    state.iface.update_ip_addrs(|addrs| {
        addrs.clear();
        addrs
            .push(IpCidr::Ipv4(cidr))
            .expect("one address fits the interface");
    });
    state.iface.routes_mut().remove_default_ipv4_route();
    if let Some(gw) = gateway {
        state
            .iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .expect("the route table has room for the default route");
    }
    state.info.address = cidr.address();
    state.info.prefix_len = cidr.prefix_len();
    state.info.gateway = gateway;
    state.info.dhcp = dhcp;
}

fn bring_up() -> Result<NetState, NetError> {
    if NET.lock().is_some() {
        return Err(NetError::AlreadyInitialized);
    }
    let hints: Vec<(u64, u64)> = crate::cmdline::virtio_mmio_devices(crate::kernel_cmdline())
        .map(|d| (d.base, d.size))
        .collect();
    let found = crate::drivers::virtio::find_net(&hints).ok_or(NetError::NoDevice)?;
    let nic = found.location.clone();
    if found.link_down {
        return Err(NetError::LinkDown { nic });
    }
    let mut dev = Nic::new(found.transport).map_err(|reason| NetError::DeviceInit {
        nic: nic.clone(),
        reason,
    })?;
    let mac = dev.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = crate::arch::cpu::rdtsc();
    let iface = Interface::new(config, &mut dev, now());
    Ok(NetState {
        iface,
        dev,
        sockets: SocketSet::new(Vec::new()),
        tcp_ports: Vec::new(),
        udp_ports: Vec::new(),
        closing: Vec::new(),
        accepted: 0,
        info: NetInfo {
            nic,
            mac,
            address: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            gateway: None,
            dhcp: false,
        },
    })
}

/// Polls, and if `f` says the caller must wait, yields and tries again — until `f` returns
/// `Some` or `timeout` passes.
pub(crate) fn block_on<R>(
    timeout: Option<Duration>,
    mut f: impl FnMut(&mut NetState) -> Option<Result<R, NetError>>,
) -> Result<R, NetError> {
    let start = crate::time::uptime();
    loop {
        if let Some(r) = with_net(&mut f)? {
            return r;
        }
        // `Duration::MAX` (or any timeout past the TSC's range) waits forever.
        if timeout.is_some_and(|t| crate::time::uptime().saturating_sub(start) >= t) {
            return Err(NetError::TimedOut);
        }
        crate::task::yield_now();
    }
}
