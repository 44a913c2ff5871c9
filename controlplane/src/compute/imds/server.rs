//! One instance's server: a smoltcp interface on its TUN device, a pool of TCP sockets on
//! port 80, and the request/response logic of [`super::http`] and [`super::paths`].
//!
//! The loop reads every packet the device has (bounded), feeds them to smoltcp one at a time
//! (topping up the listening sockets in between, so a burst of SYNs finds listeners), lets each
//! connection make progress, transmits, and sleeps until the device is readable, smoltcp's
//! next timer, a connection's deadline, or the metadata sender going away.

use std::{
    collections::VecDeque,
    io,
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use smoltcp::{
    iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet},
    phy::{self, DeviceCapabilities, Medium},
    socket::tcp,
    time::Instant as SmolInstant,
    wire::{HardwareAddress, IpCidr},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use super::{
    IMDS_ADDR, InstanceMetadata,
    http::{self, HttpResponse, MAX_REQUEST, Parse},
    paths::{TokenStore, answer},
};

/// The device's MTU (the kernel's default for a TUN device).
const MTU: usize = 1500;

/// The most packets read from the device per round, and the most queued for it.
const MAX_BURST: usize = 256;

/// Listening sockets kept ready while there is room: a burst of this many SYNs in one packet
/// round is always accepted.
const SPARE_LISTENERS: usize = 4;

/// The most sockets (connections plus listeners): SYNs beyond are reset. Bounds an instance's
/// memory: each socket has [`RX_BUFFER`] + [`TX_BUFFER`] bytes plus its request buffer.
pub(super) const MAX_SOCKETS: usize = 32;

/// A connection's whole life, from the SYN to the close: past it, the connection is aborted.
pub(super) const CONN_DEADLINE: Duration = Duration::from_secs(10);

const RX_BUFFER: usize = 4096;
const TX_BUFFER: usize = 16 * 1024;

/// The device as smoltcp sees it: two in-memory queues, filled from and flushed to the TUN fd
/// by the loop (so smoltcp never blocks and the I/O stays in one place).
#[derive(Debug, Default)]
pub(super) struct Queues {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
}

pub(super) struct RxToken(Vec<u8>);
pub(super) struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        (self.tx.len() < MAX_BURST).then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.push(packet);
        r
    }
}

/// A connection in progress on a socket.
#[derive(Debug)]
struct Conn {
    /// When it was first seen established (or syn-received): its deadline starts there.
    started: Instant,
    /// The request bytes so far (at most [`MAX_REQUEST`] + one read).
    request: Vec<u8>,
    /// The response and how much of it is queued, once the request is answered.
    response: Option<(Vec<u8>, usize)>,
}

#[derive(Debug)]
struct Slot {
    handle: SocketHandle,
    conn: Option<Conn>,
}

/// The smoltcp side of one instance's server: everything but the fd. Separate from the I/O so
/// that it can be driven by another smoltcp interface in unit tests.
pub(super) struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<Slot>,
    tokens: TokenStore,
    epoch: Instant,
    pub dev: Queues,
}

impl Stack {
    pub fn new(now: Instant) -> Stack {
        let mut dev = Queues::default();
        let mut config = Config::new(HardwareAddress::Ip);
        // The seed of initial sequence numbers and ephemeral choices.
        config.random_seed = getrandom::u64().unwrap_or(0x5eed);
        let mut iface = Interface::new(config, &mut dev, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // One address in a fresh interface: cannot be full.
            let _ = addrs.push(IpCidr::new(IMDS_ADDR.into(), 32));
        });
        // Replies go back out of the device whatever their destination: with Medium::Ip
        // there is no next hop to resolve, but smoltcp wants a route.
        let _ = iface.routes_mut().add_default_ipv4_route(IMDS_ADDR);
        let mut stack = Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            slots: Vec::new(),
            tokens: TokenStore::new(),
            epoch: now,
            dev,
        };
        stack.top_up();
        stack
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// Processes the queued input, runs the connections, queues the output.
    pub fn poll(&mut self, meta: &InstanceMetadata, now: Instant) {
        let t = self.smol_now(now);
        loop {
            match self
                .iface
                .poll_ingress_single(t, &mut self.dev, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => self.top_up(),
            }
        }
        self.serve(meta, now);
        self.iface.poll_egress(t, &mut self.dev, &mut self.sockets);
        // After egress: a connection in TIME-WAIT has sent its last ACK.
        self.recycle();
        self.top_up();
        self.iface.poll_egress(t, &mut self.dev, &mut self.sockets);
    }

    /// How long until [`Stack::poll`] must run again without input (smoltcp's timers, the
    /// connections' deadlines).
    pub fn delay(&mut self, now: Instant) -> Duration {
        let t = self.smol_now(now);
        let smol = self
            .iface
            .poll_delay(t, &self.sockets)
            .map_or(Duration::MAX, |d| Duration::from_micros(d.total_micros()));
        let deadline = self
            .slots
            .iter()
            .filter_map(|s| s.conn.as_ref())
            .map(|c| (c.started + CONN_DEADLINE).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::MAX);
        smol.min(deadline)
    }

    /// Adds listening sockets until [`SPARE_LISTENERS`] are listening or there are
    /// [`MAX_SOCKETS`]; removes listeners beyond the spares.
    fn top_up(&mut self) {
        let mut listening: Vec<usize> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if self.sockets.get::<tcp::Socket>(slot.handle).is_listening() {
                listening.push(i);
            }
        }
        while listening.len() > SPARE_LISTENERS {
            let i = listening.pop().unwrap_or_default();
            let slot = self.slots.swap_remove(i);
            self.sockets.remove(slot.handle);
        }
        for _ in listening.len()..SPARE_LISTENERS {
            if self.slots.len() >= MAX_SOCKETS {
                break;
            }
            let handle = self.sockets.add(listener());
            self.slots.push(Slot { handle, conn: None });
        }
    }

    /// Replaces the sockets whose connection is over (closed, aborted, in TIME-WAIT) by fresh
    /// listeners. TIME-WAIT is cut short: the server closes first, and waiting smoltcp's 10 s
    /// there would hold a socket per request.
    fn recycle(&mut self) {
        for slot in &mut self.slots {
            let state = self.sockets.get::<tcp::Socket>(slot.handle).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                self.sockets.remove(slot.handle);
                slot.handle = self.sockets.add(listener());
                slot.conn = None;
            }
        }
    }

    /// Lets each connection progress: read the request, answer it, send the answer, close.
    fn serve(&mut self, meta: &InstanceMetadata, now: Instant) {
        let mut chunk = [0u8; 2048];
        for slot in &mut self.slots {
            let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if matches!(
                socket.state(),
                tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait
            ) {
                continue;
            }
            let conn = slot.conn.get_or_insert_with(|| Conn {
                started: now,
                request: Vec::new(),
                response: None,
            });
            if now.saturating_duration_since(conn.started) >= CONN_DEADLINE {
                tracing::debug!("imds: connection past its deadline, aborted");
                socket.abort();
                continue;
            }
            if socket.state() == tcp::State::SynReceived {
                continue;
            }
            if conn.response.is_none() {
                while socket.can_recv() && conn.request.len() <= MAX_REQUEST {
                    match socket.recv_slice(&mut chunk) {
                        Ok(n) => conn.request.extend_from_slice(&chunk[..n]),
                        Err(_) => break,
                    }
                }
                let response = match http::parse(&conn.request) {
                    Parse::Complete(req) => Some(answer(
                        meta,
                        &req.method,
                        &req.target,
                        &req.headers,
                        &mut self.tokens,
                        now,
                    )),
                    Parse::Bad(why) => {
                        tracing::debug!(why, "imds: bad request");
                        Some(HttpResponse::error(400))
                    }
                    // The client stopped sending before a whole request.
                    Parse::Incomplete if !socket.may_recv() => {
                        if conn.request.is_empty() {
                            socket.close();
                            None
                        } else {
                            Some(HttpResponse::error(400))
                        }
                    }
                    Parse::Incomplete => None,
                };
                if let Some(response) = response {
                    conn.response = Some((response.to_bytes(), 0));
                    conn.request = Vec::new();
                }
            } else {
                // Whatever follows the request is ignored (one request per connection).
                while socket.can_recv() {
                    if socket.recv(|data| (data.len(), ())).is_err() {
                        break;
                    }
                }
            }
            if let Some((bytes, sent)) = &mut conn.response
                && *sent < bytes.len()
            {
                while socket.can_send() && *sent < bytes.len() {
                    match socket.send_slice(&bytes[*sent..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => *sent += n,
                    }
                }
                if *sent == bytes.len() {
                    socket.close();
                }
            }
        }
    }
}

/// A fresh socket listening on port 80.
fn listener() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
    );
    // Retransmissions to a client that has gone give up after this.
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(5)));
    socket.set_nagle_enabled(false);
    // A fresh socket is closed: listening cannot fail.
    let _ = socket.listen(80);
    socket
}

/// Serves one instance until its device goes away (a read or write fails with anything but
/// EAGAIN, e.g. the namespace or the device was deleted) or the metadata sender is dropped.
pub(super) async fn run(
    fd: OwnedFd,
    mut meta: watch::Receiver<Arc<InstanceMetadata>>,
) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor that the `AsyncFd` owns: it stays open, and
    // `OwnedFd::as_raw_fd` keeps returning it, until the `AsyncFd` is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::ERROR) }
        .map_err(|e| e.into_parts().1)?;
    let mut stack = Stack::new(Instant::now());
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        let current = Arc::clone(&meta.borrow());
        stack.poll(&current, now);
        for packet in stack.dev.tx.drain(..) {
            match nix::unistd::write(fd.get_ref(), &packet) {
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                // The packet is lost; TCP retransmits.
                Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::ENOMEM) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let delay = stack.delay(now);
        tokio::select! {
            // ERROR too: a detached TUN fd (device deleted) polls as EPOLLERR only, and the
            // read that follows fails (EBADFD), ending the server.
            ready = fd.ready(Interest::READABLE | Interest::ERROR) => {
                let mut guard = ready?;
                while stack.dev.rx.len() < MAX_BURST {
                    match guard.try_io(|fd| {
                        nix::unistd::read(fd.get_ref(), &mut buf).map_err(io::Error::from)
                    }) {
                        Ok(Ok(0)) => return Err(io::Error::other("the TUN device closed")),
                        Ok(Ok(n)) => stack.dev.rx.push_back(buf[..n].to_vec()),
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => break,
                    }
                }
            }
            () = tokio::time::sleep(delay.min(Duration::from_secs(3600))) => {}
            changed = meta.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smoltcp::wire::IpAddress;

    use super::*;

    fn meta() -> InstanceMetadata {
        InstanceMetadata {
            instance_id: "i-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            account_id: "123456789012".into(),
            local_ipv4: Ipv4Addr::new(10, 0, 1, 4),
            mac: "02:00:0a:00:01:04".into(),
            hostname: "ip-10-0-1-4".into(),
            security_groups: vec!["default".into()],
            security_group_ids: vec!["sg-1".into()],
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.1.0/24".into(),
            vpc_id: "vpc-1".into(),
            vpc_cidr: "10.0.0.0/16".into(),
            availability_zone: "local-1a".into(),
            host_id: "host-1".into(),
            launch_time: "2025-01-02T03:04:05Z".into(),
            user_data: Some(vec![b'u'; 40_000]),
        }
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 4);

    /// A smoltcp client "instance" wired to the server's queues.
    struct Client {
        iface: Interface,
        sockets: SocketSet<'static>,
        dev: Queues,
        /// Each socket's request, sent once established.
        pending: Vec<(SocketHandle, Vec<u8>)>,
    }

    impl Client {
        fn new() -> Client {
            let mut dev = Queues::default();
            let mut iface = Interface::new(
                Config::new(HardwareAddress::Ip),
                &mut dev,
                SmolInstant::ZERO,
            );
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(CLIENT.into(), 24)).unwrap();
            });
            iface.routes_mut().add_default_ipv4_route(CLIENT).unwrap();
            Client {
                iface,
                sockets: SocketSet::new(Vec::new()),
                dev,
                pending: Vec::new(),
            }
        }

        fn connect(&mut self, port: u16, request: &[u8]) -> SocketHandle {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 65536]),
                tcp::SocketBuffer::new(vec![0; 65536]),
            );
            s.connect(self.iface.context(), (IpAddress::from(IMDS_ADDR), 80), port)
                .unwrap();
            let handle = self.sockets.add(s);
            self.pending.push((handle, request.to_vec()));
            handle
        }

        fn poll(&mut self, t: SmolInstant) {
            self.iface.poll(t, &mut self.dev, &mut self.sockets);
            let sockets = &mut self.sockets;
            self.pending.retain(|(h, request)| {
                let s = sockets.get_mut::<tcp::Socket>(*h);
                if s.may_send() {
                    assert_eq!(s.send_slice(request), Ok(request.len()));
                    false
                } else {
                    true
                }
            });
            self.iface.poll(t, &mut self.dev, &mut self.sockets);
        }
    }

    /// Runs both stacks until nothing moves; returns what each client socket received.
    fn exchange(server: &mut Stack, client: &mut Client, handles: &[SocketHandle]) -> Vec<Vec<u8>> {
        let m = meta();
        let start = Instant::now();
        let mut got = vec![Vec::new(); handles.len()];
        for step in 0..2000u64 {
            let now = start + Duration::from_millis(step);
            let t = SmolInstant::from_millis(i64::try_from(step).unwrap());
            client.poll(t);
            server.dev.rx.extend(client.dev.tx.drain(..));
            server.poll(&m, now);
            client.dev.rx.extend(server.dev.tx.drain(..));
            client.poll(t);
            for (h, out) in handles.iter().zip(&mut got) {
                let s = client.sockets.get_mut::<tcp::Socket>(*h);
                while s.can_recv() {
                    s.recv(|d| {
                        out.extend_from_slice(d);
                        (d.len(), ())
                    })
                    .unwrap();
                }
                if !s.may_recv() && s.is_open() {
                    s.close();
                }
            }
            let done = handles.iter().all(|h| {
                let s = client.sockets.get::<tcp::Socket>(*h);
                !s.is_open() || s.state() == tcp::State::TimeWait
            });
            if done {
                return got;
            }
        }
        panic!("no convergence: {got:?}");
    }

    #[test]
    fn answers_concurrent_connections_over_smoltcp() {
        let mut server = Stack::new(Instant::now());
        let mut client = Client::new();
        let mut handles = Vec::new();
        for i in 0..12u16 {
            handles.push(client.connect(
                40000 + i,
                b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n",
            ));
        }
        let big = client.connect(41000, b"GET /latest/user-data HTTP/1.0\r\n\r\n");
        let bad = client.connect(41001, b"BAD\r\n\r\n");
        handles.push(big);
        handles.push(bad);
        let got = exchange(&mut server, &mut client, &handles);
        for g in &got[..12] {
            let text = String::from_utf8_lossy(g);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.ends_with("\r\n\r\ni-0123456789abcdef0"), "{text}");
        }
        assert!(
            got[12].ends_with(&[b'u'; 40_000]),
            "user data, larger than the tx buffer"
        );
        assert!(got[13].starts_with(b"HTTP/1.1 400 "));
        // Everything was recycled: only listeners remain.
        assert_eq!(server.slots.iter().filter(|s| s.conn.is_some()).count(), 0);
        assert!(server.slots.len() <= MAX_SOCKETS);
    }

    #[test]
    fn slow_clients_hit_the_deadline() {
        let mut server = Stack::new(Instant::now());
        let mut client = Client::new();
        let h = client.connect(40000, b"GET /latest/meta-data/ HTTP/1.1\r\n");
        let start = Instant::now();
        for step in 0..50u64 {
            let t = SmolInstant::from_millis(i64::try_from(step).unwrap());
            client.poll(t);
            server.dev.rx.extend(client.dev.tx.drain(..));
            server.poll(&meta(), start + Duration::from_millis(step));
            client.dev.rx.extend(server.dev.tx.drain(..));
        }
        assert_eq!(server.slots.iter().filter(|s| s.conn.is_some()).count(), 1);
        assert!(server.delay(start) <= CONN_DEADLINE);
        server.poll(&meta(), start + CONN_DEADLINE + Duration::from_secs(1));
        assert_eq!(server.slots.iter().filter(|s| s.conn.is_some()).count(), 0);
        let t = SmolInstant::from_millis(60);
        client.dev.rx.extend(server.dev.tx.drain(..));
        client.poll(t);
        assert!(!client.sockets.get::<tcp::Socket>(h).is_open(), "reset");
    }
}
