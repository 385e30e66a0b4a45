//! The gateway: a user-mode network for one guest. QEMU's NIC is a
//! `-netdev stream` whose other end is this; the guest's Ethernet frames
//! arrive here, a TCP/IP stack of our own (`smoltcp`) terminates them, and
//! each TCP connection the policy allows is carried on a host socket the
//! gateway opens itself. Nothing else leaves: no route, no bridge, no
//! address translation, so a guest reaches exactly what [`EgressPolicy`]
//! allows, whoever runs it (no root needed).
//!
//! What the guest sees is what QEMU's slirp showed it: it is 10.0.2.15/24,
//! the gateway 10.0.2.2, the DNS server 10.0.2.3. A connection to any
//! address starts with a SYN; the gateway asks the policy before it answers,
//! and a refused destination gets a TCP reset at once. UDP reaches only the
//! DNS server; ICMP only the gateway's own addresses; IPv6 nothing.
//!
//! Bounded: frames (64 KiB), bytes read per round, connections per guest
//! ([`MAX_CONNECTIONS`]), lookups in flight, bytes queued toward QEMU; every
//! socket buffer is fixed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read as _, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

use crate::dns::{self, Answer, QueryKind};
use crate::policy::EgressPolicy;
use crate::NetError;

/// The guest's address, as QEMU's slirp gives it.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway's address (the guest's default route).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server's address.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// TCP connections one guest may hold open at once; more get a reset.
pub const MAX_CONNECTIONS: usize = 256;
/// DNS lookups in flight at once; more get `SERVFAIL`.
const MAX_LOOKUPS: usize = 16;
/// Largest frame accepted from QEMU.
const MAX_FRAME: usize = 65_536;
/// Bytes queued toward QEMU before new frames are dropped (TCP resends).
const MAX_OUT: usize = 4 << 20;
/// Per-connection buffers on the guest side.
const TCP_BUFFER: usize = 64 * 1024;
/// A host connection that has not completed within this is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes read from QEMU in one round before the queued frames are handled.
const MAX_READ_PER_ROUND: usize = 1 << 20;
/// Resolved names remembered for domain rules.
const MAX_REMEMBERED: usize = 4096;

const QEMU: Token = Token(0);
const WAKE: Token = Token(1);
const FIRST_CONN: usize = 2;

/// Waits for QEMU on `listener` (at most `accept_within`), then serves it
/// until it hangs up. Returns `Ok` when QEMU went away (the VM ended).
pub fn serve_listener(
    listener: UnixListener,
    policy: EgressPolicy,
    accept_within: Duration,
) -> Result<(), NetError> {
    listener.set_nonblocking(true).map_err(NetError::Io)?;
    let deadline = Instant::now() + accept_within;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(NetError::NoQemu(accept_within));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(NetError::Io(e)),
        }
    };
    drop(listener);
    serve(stream, policy)
}

/// Serves one QEMU `-netdev stream` connection until QEMU hangs up.
pub fn serve(stream: UnixStream, policy: EgressPolicy) -> Result<(), NetError> {
    Gateway::new(stream, policy)?.run()
}

/// What one read of QEMU's stream found.
enum Read {
    Hangup,
    Drained,
    More,
}

/// Frames between smoltcp and QEMU.
#[derive(Default)]
struct Frames {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

impl Device for Frames {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _now: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        // The guest's virtio-net computes real checksums; check them.
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

/// What a guest frame is, as far as the gateway cares.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// A TCP SYN opening a connection to `dst`.
    Syn { src_port: u16, dst: SocketAddr },
    /// Anything smoltcp should see (ARP, TCP segments, DNS, pings to us).
    Pass,
    /// Dropped unseen: IPv6, UDP other than DNS, ICMP to other hosts.
    Drop,
}

/// Classifies a frame from the guest. Pure; any bytes.
fn classify(frame: &[u8]) -> Frame {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Frame::Drop;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => return Frame::Pass,
        EthernetProtocol::Ipv4 => {}
        _ => return Frame::Drop,
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return Frame::Drop;
    };
    let dst: Ipv4Addr = ip.dst_addr();
    let ours = dst == GATEWAY || dst == DNS;
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                return Frame::Drop;
            };
            if tcp.syn() && !tcp.ack() {
                Frame::Syn {
                    src_port: tcp.src_port(),
                    dst: SocketAddr::new(IpAddr::V4(dst), tcp.dst_port()),
                }
            } else {
                Frame::Pass
            }
        }
        IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
            Ok(udp) if dst == DNS && udp.dst_port() == 53 => Frame::Pass,
            _ => Frame::Drop,
        },
        IpProtocol::Icmp if ours => Frame::Pass,
        _ => Frame::Drop,
    }
}

/// One guest connection carried on a host socket.
struct Conn {
    handle: SocketHandle,
    key: (u16, SocketAddr),
    host: mio::net::TcpStream,
    connected: bool,
    started: Instant,
    /// Guest bytes the host socket has not taken yet.
    to_host: Vec<u8>,
    host_write_closed: bool,
    host_eof: bool,
}

/// Names the guest resolved, by address, oldest forgotten first.
#[derive(Default)]
struct Remembered {
    by_addr: HashMap<IpAddr, Vec<String>>,
    order: VecDeque<IpAddr>,
}

impl Remembered {
    fn note(&mut self, ip: IpAddr, name: &str) {
        let names = self.by_addr.entry(ip).or_default();
        if names.iter().any(|n| n == name) {
            return;
        }
        if names.len() < 16 {
            names.push(name.to_string());
        }
        self.order.push_back(ip);
        while self.order.len() > MAX_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                if !self.order.contains(&old) {
                    self.by_addr.remove(&old);
                }
            }
        }
    }

    fn names(&self, ip: IpAddr) -> &[String] {
        self.by_addr.get(&ip).map(|v| v.as_slice()).unwrap_or(&[])
    }
}

/// A finished lookup, waiting to be answered.
struct Lookup {
    client: smoltcp::wire::IpEndpoint,
    query: Vec<u8>,
    name: String,
    kind: QueryKind,
    result: io::Result<Vec<IpAddr>>,
}

/// The host's own addresses, refreshed now and then.
struct HostAddrs {
    addrs: Vec<IpAddr>,
    read_at: Instant,
}

impl HostAddrs {
    fn read() -> HostAddrs {
        let addrs = if_addrs::get_if_addrs()
            .map(|v| v.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        HostAddrs {
            addrs,
            read_at: Instant::now(),
        }
    }

    fn current(&mut self) -> &[IpAddr] {
        if self.read_at.elapsed() > Duration::from_secs(2) {
            *self = HostAddrs::read();
        }
        &self.addrs
    }
}

struct Gateway {
    qemu: mio::net::UnixStream,
    poll: Poll,
    waker: Arc<Waker>,
    policy: EgressPolicy,
    iface: Interface,
    frames: Frames,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    conns: HashMap<Token, Conn>,
    keys: HashMap<(u16, SocketAddr), Token>,
    next_token: usize,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    remembered: Remembered,
    host: HostAddrs,
    lookups_tx: mpsc::Sender<Lookup>,
    lookups_rx: mpsc::Receiver<Lookup>,
    in_flight: usize,
    epoch: Instant,
}

impl Gateway {
    fn new(stream: UnixStream, policy: EgressPolicy) -> Result<Gateway, NetError> {
        stream.set_nonblocking(true).map_err(NetError::Io)?;
        let mut qemu = mio::net::UnixStream::from_std(stream);
        let poll = Poll::new().map_err(NetError::Io)?;
        poll.registry()
            .register(&mut qemu, QEMU, Interest::READABLE | Interest::WRITABLE)
            .map_err(NetError::Io)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(NetError::Io)?);
        let mut frames = Frames::default();
        let mac = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most seed.len() bytes into seed.
        unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        config.random_seed = u64::from_le_bytes(seed);
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut frames, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY), 24));
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(DNS), 24));
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY)
            .map_err(|_| NetError::Setup("no room for the default route".into()))?;
        // Accept packets to any address: every destination is terminated
        // here (and judged before a SYN is answered).
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let mut dns_socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 16 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 32 * 1024]),
        );
        dns_socket
            .bind(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(DNS)),
                port: 53,
            })
            .map_err(|e| NetError::Setup(format!("binding the DNS socket: {e}")))?;
        let dns = sockets.add(dns_socket);
        let (lookups_tx, lookups_rx) = mpsc::channel();
        Ok(Gateway {
            qemu,
            poll,
            waker,
            policy,
            iface,
            frames,
            sockets,
            dns,
            conns: HashMap::new(),
            keys: HashMap::new(),
            next_token: FIRST_CONN,
            inbuf: Vec::with_capacity(MAX_FRAME + 4),
            outbuf: Vec::new(),
            remembered: Remembered::default(),
            host: HostAddrs::read(),
            lookups_tx,
            lookups_rx,
            in_flight: 0,
            epoch,
        })
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_millis(self.epoch.elapsed().as_millis() as i64)
    }

    fn run(mut self) -> Result<(), NetError> {
        let mut events = Events::with_capacity(256);
        let mut more = false;
        loop {
            let now = self.now();
            let delay = if more {
                // QEMU has sent more than one round takes: no waiting (the
                // readiness was not drained, so no event would come).
                Duration::ZERO
            } else {
                self.iface
                    .poll_delay(now, &self.sockets)
                    .map(|d| Duration::from_micros(d.total_micros()))
                    .unwrap_or(Duration::from_millis(500))
                    .min(Duration::from_millis(500))
            };
            match self.poll.poll(&mut events, Some(delay)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetError::Io(e)),
            }
            more = match self.read_qemu()? {
                Read::Hangup => return Ok(()),
                Read::Drained => false,
                Read::More => true,
            };
            self.answer_lookups();
            self.step()?;
        }
    }

    /// Reads what QEMU sent, at most [`MAX_READ_PER_ROUND`] bytes, so that
    /// a guest flooding its NIC cannot grow the frame queue without bound.
    fn read_qemu(&mut self) -> Result<Read, NetError> {
        let mut buf = [0u8; 64 * 1024];
        let mut taken = 0;
        loop {
            if taken >= MAX_READ_PER_ROUND {
                return Ok(Read::More);
            }
            match self.qemu.read(&mut buf) {
                Ok(0) => return Ok(Read::Hangup),
                Ok(n) => {
                    taken += n;
                    self.inbuf.extend_from_slice(&buf[..n]);
                    self.take_frames()?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Read::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Read::Hangup),
                Err(e) => return Err(NetError::Io(e)),
            }
        }
    }

    /// Splits `inbuf` into frames (4-byte big-endian length, then the frame).
    fn take_frames(&mut self) -> Result<(), NetError> {
        let mut at = 0;
        while self.inbuf.len() - at >= 4 {
            let len =
                u32::from_be_bytes(self.inbuf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(NetError::Protocol(format!(
                    "QEMU sent a frame of {len} bytes (at most {MAX_FRAME})"
                )));
            }
            if self.inbuf.len() - at - 4 < len {
                break;
            }
            let frame = self.inbuf[at + 4..at + 4 + len].to_vec();
            at += 4 + len;
            self.admit(frame);
        }
        self.inbuf.drain(..at);
        Ok(())
    }

    /// Decides what to do with one guest frame before smoltcp sees it.
    fn admit(&mut self, frame: Vec<u8>) {
        match classify(&frame) {
            Frame::Drop => return,
            Frame::Pass => {}
            Frame::Syn { src_port, dst } => {
                if !self.keys.contains_key(&(src_port, dst)) {
                    self.open(src_port, dst);
                }
            }
        }
        self.frames.rx.push_back(frame);
    }

    /// A guest SYN to `dst`: when the policy allows, a listening socket
    /// takes the SYN and a host connection starts; otherwise nothing listens
    /// and smoltcp answers with a reset.
    fn open(&mut self, src_port: u16, dst: SocketAddr) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let names = self.remembered.names(dst.ip()).to_vec();
        let verdict = self.policy.decide(dst.ip(), &names, self.host.current());
        if !verdict.allowed() {
            return;
        }
        let Ok(mut host) = mio::net::TcpStream::connect(dst) else {
            return;
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        if self
            .poll
            .registry()
            .register(&mut host, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return;
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        let IpAddr::V4(v4) = dst.ip() else { return };
        if socket
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(v4)),
                port: dst.port(),
            })
            .is_err()
        {
            return;
        }
        let handle = self.sockets.add(socket);
        let key = (src_port, dst);
        self.keys.insert(key, token);
        self.conns.insert(
            token,
            Conn {
                handle,
                key,
                host,
                connected: false,
                started: Instant::now(),
                to_host: Vec::new(),
                host_write_closed: false,
                host_eof: false,
            },
        );
    }

    /// One round: smoltcp in, connections, DNS, smoltcp out, frames to QEMU.
    fn step(&mut self) -> Result<(), NetError> {
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        self.serve_dns();
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            self.pump(t);
        }
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        self.write_qemu()
    }

    fn write_qemu(&mut self) -> Result<(), NetError> {
        while let Some(f) = self.frames.tx.pop_front() {
            if self.outbuf.len() + f.len() + 4 > MAX_OUT {
                continue; // the guest's TCP resends
            }
            self.outbuf
                .extend_from_slice(&(f.len() as u32).to_be_bytes());
            self.outbuf.extend_from_slice(&f);
        }
        while !self.outbuf.is_empty() {
            match self.qemu.write(&self.outbuf) {
                Ok(0) => return Err(NetError::Protocol("QEMU stopped reading".into())),
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NetError::Io(e)),
            }
        }
        Ok(())
    }

    /// Moves bytes both ways on one connection and closes it when done.
    fn pump(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        let mut aborted = false;
        if !conn.connected {
            match conn.host.take_error() {
                Ok(Some(_)) | Err(_) => {
                    socket.abort();
                    aborted = true;
                }
                Ok(None) => match conn.host.peer_addr() {
                    Ok(_) => conn.connected = true,
                    Err(_) if conn.started.elapsed() > CONNECT_TIMEOUT => {
                        socket.abort();
                        aborted = true;
                    }
                    Err(_) => {}
                },
            }
        }
        if conn.connected && !aborted {
            // Guest to host.
            let mut buf = [0u8; 16 * 1024];
            loop {
                if !conn.to_host.is_empty() {
                    match conn.host.write(&conn.to_host) {
                        Ok(n) => {
                            conn.to_host.drain(..n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            socket.abort();
                            aborted = true;
                            break;
                        }
                    }
                    if !conn.to_host.is_empty() {
                        break;
                    }
                }
                if !socket.can_recv() {
                    break;
                }
                match socket.recv_slice(&mut buf) {
                    Ok(n) if n > 0 => conn.to_host.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if !aborted
                && !socket.may_recv()
                && conn.to_host.is_empty()
                && !conn.host_write_closed
                && socket.state() != tcp::State::SynReceived
                && socket.state() != tcp::State::Listen
            {
                let _ = conn.host.shutdown(std::net::Shutdown::Write);
                conn.host_write_closed = true;
            }
            // Host to guest, as much as the guest's window takes.
            while !aborted && !conn.host_eof && socket.can_send() {
                let room = (socket.send_capacity() - socket.send_queue()).min(buf.len());
                if room == 0 {
                    break;
                }
                match conn.host.read(&mut buf[..room]) {
                    Ok(0) => {
                        conn.host_eof = true;
                        socket.close();
                    }
                    Ok(n) => {
                        let _ = socket.send_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        socket.abort();
                        aborted = true;
                    }
                }
            }
        }
        // An aborted socket stays until the next poll has sent its reset.
        let done = match socket.state() {
            tcp::State::Closed => !aborted,
            tcp::State::TimeWait => true,
            tcp::State::Listen => conn.started.elapsed() > CONNECT_TIMEOUT,
            _ => false,
        };
        if done {
            self.close(token);
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(mut conn) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut conn.host);
            self.keys.remove(&conn.key);
            self.sockets.remove(conn.handle);
        }
    }

    /// Reads queries from the DNS socket; answers at once what needs no
    /// lookup, starts a lookup for the rest.
    fn serve_dns(&mut self) {
        let mut buf = [0u8; 1500];
        loop {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            let Ok((n, meta)) = socket.recv_slice(&mut buf) else {
                break;
            };
            let bytes = buf[..n].to_vec();
            let Some(query) = dns::parse_query(&bytes) else {
                continue;
            };
            // AAAA is looked up like A, so that both answers agree on
            // whether the name exists (it never gets IPv6 addresses).
            let answer = match query.kind {
                QueryKind::Other => Some(Answer::NotImplemented),
                _ if !self.policy.may_resolve(&query.name) => Some(Answer::Refused),
                _ if self.in_flight >= MAX_LOOKUPS => Some(Answer::ServerFailure),
                QueryKind::A | QueryKind::Aaaa => None,
            };
            match answer {
                Some(a) => self.send_dns(meta.endpoint, &bytes, &a),
                None => {
                    self.in_flight += 1;
                    let tx = self.lookups_tx.clone();
                    let waker = self.waker.clone();
                    let name = query.name.clone();
                    let kind = query.kind;
                    let client = meta.endpoint;
                    std::thread::spawn(move || {
                        let result = (name.as_str(), 0)
                            .to_socket_addrs()
                            .map(|it| it.map(|a| a.ip()).collect());
                        let _ = tx.send(Lookup {
                            client,
                            query: bytes,
                            name,
                            kind,
                            result,
                        });
                        let _ = waker.wake();
                    });
                }
            }
        }
    }

    fn answer_lookups(&mut self) {
        while let Ok(l) = self.lookups_rx.try_recv() {
            self.in_flight = self.in_flight.saturating_sub(1);
            let answer = match l.result {
                Err(_) => Answer::NoSuchName,
                Ok(ips) => {
                    let host = self.host.current().to_vec();
                    let mut v4 = Vec::new();
                    for ip in ips {
                        if let IpAddr::V4(a) = ip {
                            if !v4.contains(&a) && self.policy.may_answer(&l.name, ip, &host) {
                                v4.push(a);
                                self.remembered.note(ip, &l.name);
                            }
                        }
                    }
                    if v4.is_empty() {
                        Answer::NoSuchName
                    } else if l.kind == QueryKind::Aaaa {
                        Answer::Addresses(vec![])
                    } else {
                        Answer::Addresses(v4)
                    }
                }
            };
            self.send_dns(l.client, &l.query, &answer);
        }
    }

    fn send_dns(&mut self, to: smoltcp::wire::IpEndpoint, query: &[u8], answer: &Answer) {
        if let Some(reply) = dns::reply(query, answer) {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            let _ = socket.send_slice(&reply, to);
        }
    }
}

/// Binds the gateway's socket at `path` so that it is listening before the
/// path appears (bound under a temporary name, then renamed): a QEMU started
/// once the path exists always finds it ready.
pub fn bind(path: &std::path::Path) -> Result<UnixListener, NetError> {
    let tmp = path.with_extension("binding");
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(NetError::Io)?;
    // QEMU may connect after dropping to its own user; the directory that
    // holds the socket is what keeps others out.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).map_err(NetError::Io)?;
    std::fs::rename(&tmp, path).map_err(NetError::Io)?;
    Ok(listener)
}

/// Guest-side socket address of the gateway's DNS server, for tests.
pub fn dns_address() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(DNS), 53)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};

    fn tcp_frame(dst: Ipv4Addr, port: u16, control: TcpControl, ack: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: port,
            control,
            seq_number: TcpSeqNumber(1),
            ack_number: ack.then_some(TcpSeqNumber(5)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: GUEST,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; 14 + ip.buffer_len() + tcp.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut buf);
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.emit(&mut ipp, &ChecksumCapabilities::default());
        let mut tcpp = TcpPacket::new_unchecked(ipp.payload_mut());
        tcp.emit(
            &mut tcpp,
            &IpAddress::Ipv4(GUEST),
            &IpAddress::Ipv4(dst),
            &ChecksumCapabilities::default(),
        );
        buf
    }

    #[test]
    fn syns_are_judged_and_other_traffic_sorted() {
        let dst = Ipv4Addr::new(93, 184, 216, 34);
        assert_eq!(
            classify(&tcp_frame(dst, 443, TcpControl::Syn, false)),
            Frame::Syn {
                src_port: 40000,
                dst: "93.184.216.34:443".parse().unwrap()
            }
        );
        assert_eq!(
            classify(&tcp_frame(dst, 443, TcpControl::None, true)),
            Frame::Pass
        );
        assert_eq!(classify(&[0u8; 10]), Frame::Drop);
        let mut v6 = tcp_frame(dst, 443, TcpControl::Syn, false);
        EthernetFrame::new_unchecked(&mut v6).set_ethertype(EthernetProtocol::Ipv6);
        assert_eq!(classify(&v6), Frame::Drop);
        // Garbage of every length never panics.
        let f = tcp_frame(dst, 80, TcpControl::Syn, false);
        for n in 0..f.len() {
            let _ = classify(&f[..n]);
        }
    }

    #[test]
    fn remembered_names_are_bounded() {
        let mut r = Remembered::default();
        for i in 0..(MAX_REMEMBERED as u32 + 100) {
            r.note(IpAddr::V4(Ipv4Addr::from(i)), "x.test");
        }
        assert!(r.by_addr.len() <= MAX_REMEMBERED);
        assert_eq!(r.names(IpAddr::V4(Ipv4Addr::from(4000u32))), ["x.test"]);
        assert!(r.names(IpAddr::V4(Ipv4Addr::from(1u32))).is_empty());
    }
}
