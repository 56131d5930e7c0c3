//! Batched datagram syscalls: `recvmmsg(2)`/`sendmmsg(2)` over one receive buffer allocated
//! once per worker, and a per-packet `recvfrom(2)`/`sendto(2)` fallback used when the kernel
//! (or a seccomp filter) answers ENOSYS, or when asked for. Linux only.
//!
//! This is the crate's only unsafe code. Every call hands the kernel pointers into arrays owned
//! by [`BatchIo`], which are rebuilt before each call and outlive it.

#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr;

/// Datagrams per syscall (quinn's `BATCH_SIZE`).
pub(crate) const BATCH: usize = 32;
/// Bytes per receive slot: above any Ethernet-MTU RTP packet. Larger datagrams are truncated
/// by the kernel, flagged, and dropped rather than forwarded cut short.
pub(crate) const SLOT: usize = 2048;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecvMeta {
    /// Bytes stored in the slot (at most [`SLOT`]).
    pub(crate) len: usize,
    /// Source address, IPv4-mapped IPv6 addresses given as IPv4; `None` for an address family
    /// we do not know (never seen on a UDP socket).
    pub(crate) src: Option<SocketAddr>,
    /// The datagram was larger than the slot.
    pub(crate) truncated: bool,
}

/// One datagram to send: the bytes of a receive slot, to `dst`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transmit {
    pub(crate) slot: usize,
    pub(crate) dst: SocketAddr,
}

fn zeroed_box<T: Copy>(n: usize) -> Box<[T]> {
    // SAFETY: only instantiated with libc's plain C structs (mmsghdr, iovec, sockaddr_storage),
    // for which all-zero bytes are a valid value (null pointers, zero lengths, AF_UNSPEC).
    let zero: T = unsafe { mem::zeroed() };
    vec![zero; n].into_boxed_slice()
}

/// Headers, iovecs and address storage for one batch.
struct Headers {
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
}

impl Headers {
    fn new() -> Self {
        Self {
            hdrs: zeroed_box(BATCH),
            iovs: zeroed_box(BATCH),
            names: zeroed_box(BATCH),
        }
    }

    /// Points header `i` at its own iovec (`base`, `len`) and its own address storage.
    fn set(&mut self, i: usize, base: *mut u8, len: usize, namelen: libc::socklen_t) {
        self.iovs[i] = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        let name = self.names.as_mut_ptr().wrapping_add(i);
        let iov = self.iovs.as_mut_ptr().wrapping_add(i);
        let h = &mut self.hdrs[i];
        h.msg_hdr.msg_name = name.cast();
        h.msg_hdr.msg_namelen = namelen;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = ptr::null_mut();
        h.msg_hdr.msg_controllen = 0;
        h.msg_hdr.msg_flags = 0;
        h.msg_len = 0;
    }
}

const STORAGE_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// The per-worker batch: `BATCH × SLOT` bytes of receive buffer, allocated once, and the
/// metadata of the last receive. Payloads are sent straight from the slots they arrived in.
pub(crate) struct BatchIo {
    buf: Box<[u8]>,
    meta: [RecvMeta; BATCH],
    recv: Headers,
    send: Headers,
    batched: bool,
}

impl BatchIo {
    /// `batched = false` selects the per-packet fallback from the start.
    pub(crate) fn new(batched: bool) -> Self {
        let mut io = Self {
            buf: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            meta: [RecvMeta {
                len: 0,
                src: None,
                truncated: false,
            }; BATCH],
            recv: Headers::new(),
            send: Headers::new(),
            batched,
        };
        // The receive headers point at fixed slots and addresses: set once. The boxed arrays
        // never move, whatever happens to `io`; the kernel only writes msg_len, msg_flags and
        // msg_namelen back, and recv_mmsg restores msg_namelen of the headers it used.
        let base = io.buf.as_mut_ptr();
        for i in 0..BATCH {
            io.recv
                .set(i, base.wrapping_add(i * SLOT), SLOT, STORAGE_LEN);
        }
        io
    }

    /// Whether recvmmsg/sendmmsg are in use.
    #[cfg(test)]
    pub(crate) fn batched(&self) -> bool {
        self.batched
    }

    /// Metadata of datagram `i` of the last receive.
    pub(crate) fn meta(&self, i: usize) -> RecvMeta {
        self.meta[i]
    }

    /// Bytes of datagram `i` of the last receive.
    pub(crate) fn payload(&self, i: usize) -> &[u8] {
        let m = &self.meta[i];
        &self.buf[i * SLOT..i * SLOT + m.len]
    }

    /// Receives up to [`BATCH`] datagrams from a non-blocking socket. `WouldBlock` when none.
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let fd = fd.as_raw_fd();
        if self.batched {
            match self.recv_mmsg(fd) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    tracing::warn!("recvmmsg unavailable (ENOSYS): one recvfrom per datagram");
                    self.batched = false;
                }
                r => return r,
            }
        }
        self.recv_each(fd)
    }

    fn recv_mmsg(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: `hdrs` holds BATCH headers set in `new`: header i points at iovec i, which
        // covers slot i of `buf` (SLOT bytes, in bounds), and at sockaddr_storage i with
        // msg_namelen = its size (restored below after each call); there is no control buffer.
        // The kernel writes at most that many bytes through each pointer, plus msg_len,
        // msg_namelen and msg_flags. All of it is owned by `self`, borrowed mutably for the
        // call. A null timeout is allowed. The raw syscall skips libc's cancellation-point
        // bookkeeping (this thread is never cancelled).
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvmmsg,
                fd,
                self.recv.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0 as libc::c_int,
                ptr::null_mut::<libc::timespec>(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            let h = &mut self.recv.hdrs[i];
            self.meta[i] = RecvMeta {
                len: (h.msg_len as usize).min(SLOT),
                src: from_sockaddr(&self.recv.names[i], h.msg_hdr.msg_namelen),
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
            h.msg_hdr.msg_namelen = STORAGE_LEN;
        }
        Ok(n)
    }

    fn recv_each(&mut self, fd: RawFd) -> io::Result<usize> {
        let base = self.buf.as_mut_ptr();
        for i in 0..BATCH {
            let mut namelen = STORAGE_LEN;
            let name: *mut libc::sockaddr_storage = &mut self.recv.names[i];
            // SAFETY: the buffer is slot i of `buf` (SLOT bytes, in bounds); `name` points at a
            // sockaddr_storage and `namelen` holds its size. With MSG_TRUNC the kernel still
            // writes at most SLOT bytes but returns the datagram's real length.
            let r = unsafe {
                libc::recvfrom(
                    fd,
                    base.wrapping_add(i * SLOT).cast(),
                    SLOT,
                    libc::MSG_TRUNC,
                    name.cast(),
                    &mut namelen,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                // The first call reports WouldBlock (so tokio clears readiness) or the error;
                // later ones end the batch, and a lasting error shows on the next call.
                return if i == 0 { Err(e) } else { Ok(i) };
            }
            let full = r as usize;
            self.meta[i] = RecvMeta {
                len: full.min(SLOT),
                src: from_sockaddr(&self.recv.names[i], namelen),
                truncated: full > SLOT,
            };
        }
        Ok(BATCH)
    }

    /// Sends datagrams from the receive slots. Returns how many went out, starting from the
    /// first; an error only if the first one failed (like sendmmsg itself). `v6_socket`: the
    /// socket is AF_INET6, so IPv4 destinations are written IPv4-mapped.
    pub(crate) fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        items: &[Transmit],
        v6_socket: bool,
    ) -> io::Result<usize> {
        let fd = fd.as_raw_fd();
        let items = &items[..items.len().min(BATCH)];
        if items.iter().any(|t| t.slot >= BATCH) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        if self.batched {
            match self.send_mmsg(fd, items, v6_socket) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    tracing::warn!("sendmmsg unavailable (ENOSYS): one sendto per datagram");
                    self.batched = false;
                }
                r => return r,
            }
        }
        self.send_each(fd, items, v6_socket)
    }

    fn send_mmsg(&mut self, fd: RawFd, items: &[Transmit], v6: bool) -> io::Result<usize> {
        let base = self.buf.as_mut_ptr();
        for (k, t) in items.iter().enumerate() {
            let namelen = to_sockaddr(t.dst, v6, &mut self.send.names[k]);
            let len = self.meta[t.slot].len;
            self.send
                .set(k, base.wrapping_add(t.slot * SLOT), len, namelen);
        }
        // SAFETY: the first items.len() (<= BATCH) headers were just set: each points at its
        // own iovec covering `len` <= SLOT bytes of one slot of `buf`, and its own initialised
        // address of `namelen` bytes; no control buffer. The kernel only reads through them
        // (and writes msg_len). All of it is owned by `self`, borrowed mutably for the call.
        // A raw syscall, as for recvmmsg.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendmmsg,
                fd,
                self.send.hdrs.as_mut_ptr(),
                items.len() as libc::c_uint,
                0 as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send_each(&mut self, fd: RawFd, items: &[Transmit], v6: bool) -> io::Result<usize> {
        for (k, t) in items.iter().enumerate() {
            let namelen = to_sockaddr(t.dst, v6, &mut self.send.names[0]);
            let payload = self.payload(t.slot);
            let name: *const libc::sockaddr_storage = &self.send.names[0];
            // SAFETY: `payload` is an in-bounds slice of `buf`; `name` points at an initialised
            // address of `namelen` bytes. The kernel only reads them.
            let r = unsafe {
                libc::sendto(
                    fd,
                    payload.as_ptr().cast(),
                    payload.len(),
                    0,
                    name.cast(),
                    namelen,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return if k == 0 { Err(e) } else { Ok(k) };
            }
        }
        Ok(items.len())
    }
}

/// Reads an address the kernel wrote.
fn from_sockaddr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in and it is complete; sockaddr_storage is
            // large and aligned enough for every sockaddr type.
            let a = unsafe { &*ptr::from_ref(s).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*ptr::from_ref(s).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; SDP has them as IPv4.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

/// Writes `addr` for a socket of the given family; returns the address length.
fn to_sockaddr(
    addr: SocketAddr,
    v6_socket: bool,
    out: &mut libc::sockaddr_storage,
) -> libc::socklen_t {
    let v6 = match addr {
        SocketAddr::V4(a) if !v6_socket => {
            // SAFETY: all-zero is a valid sockaddr_in.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            unsafe { ptr::from_mut(out).cast::<libc::sockaddr_in>().write(sin) };
            return mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        SocketAddr::V6(a) => a,
    };
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = v6.port().to_be();
    sin6.sin6_addr.s6_addr = v6.ip().octets();
    sin6.sin6_flowinfo = v6.flowinfo();
    sin6.sin6_scope_id = v6.scope_id();
    // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
    unsafe { ptr::from_mut(out).cast::<libc::sockaddr_in6>().write(sin6) };
    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
}

/// Up to this many ready descriptors per `epoll_wait`.
pub(crate) const EVENTS: usize = 256;

/// A worker's own epoll instance over its media sockets and its wakeup eventfd,
/// level-triggered, each registered with a token as the event data (a socket's port). The
/// worker thread blocks in it directly: one `epoll_wait` per wakeup serves every socket that has
/// data, as rtpengine's poller threads and the harness' C forwarder do.
pub(crate) struct Epoll {
    fd: std::os::fd::OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: no pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
        })
    }

    /// Watches `fd` for input; ready events carry `token`.
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event for the call.
        let r = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: for ever, 0: not at all) for ready descriptors and puts
    /// their tokens in `out` (cleared first).
    pub(crate) fn wait(&mut self, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        // SAFETY: `events` holds EVENTS initialised entries that the kernel may overwrite.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENTS as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        out.extend(self.events[..n as usize].iter().map(|ev| ev.u64));
        Ok(())
    }
}

/// A non-blocking eventfd: the control thread's doorbell for a worker blocked in
/// [`Epoll::wait`].
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: std::os::fd::OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Makes the descriptor readable until [`EventFd::clear`]. Cannot fail short of a counter
    /// overflow (2^64 - 2 rings without a clear), which would leave it readable anyway.
    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, as eventfd requires.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                ptr::from_ref(&one).cast(),
                mem::size_of::<u64>(),
            );
        }
    }

    /// Resets the counter: not readable until the next ring. True when it had been rung.
    pub(crate) fn clear(&self) -> bool {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64, as eventfd requires; EAGAIN (not rung) is
        // the only expected failure and means there is nothing to clear.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                ptr::from_mut(&mut n).cast(),
                mem::size_of::<u64>(),
            )
        };
        r == mem::size_of::<u64>() as isize
    }
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit and returns
/// `(soft before, soft now)`. The relay holds two sockets per stream and the signalling side
/// one per TCP peer; the default soft limit (often 1024) would refuse clients long before the
/// configured limits do.
pub(crate) fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read above; the kernel only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// The C allocator's view of the heap, summed over its arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct HeapInfo {
    /// Bytes the allocator holds from the system for small allocations (all arenas).
    pub(crate) arena: usize,
    /// Of those, bytes in free chunks: held, not in use.
    pub(crate) free: usize,
    /// Bytes in large allocations mapped one by one (returned on free).
    pub(crate) mmapped: usize,
}

/// What glibc's `mallinfo2(3)` reports (`None` with another C library). It walks the free
/// lists of every arena under its lock: call it every few seconds, not per packet.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn heap_info() -> Option<HeapInfo> {
    // SAFETY: mallinfo2 takes no pointer and returns a plain struct by value.
    let m = unsafe { libc::mallinfo2() };
    Some(HeapInfo {
        arena: m.arena,
        free: m.fordblks,
        mmapped: m.hblkhd,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn heap_info() -> Option<HeapInfo> {
    None
}

/// Gives the whole free pages inside every arena back to the system (glibc's
/// `malloc_trim(0)`: `MADV_DONTNEED` on them, not only the top of the heap). Returns whether
/// any memory was released; `false` with another C library.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn heap_trim() -> bool {
    // SAFETY: malloc_trim takes a size and touches only the allocator's own state, under
    // the arenas' locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn heap_trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    fn sock() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// Receives until `n` datagrams have come (the kernel delivers loopback datagrams
    /// synchronously, but poll a bounded number of times rather than assume it).
    fn recv_n(io: &mut BatchIo, s: &UdpSocket, n: usize) -> Vec<(Vec<u8>, RecvMeta)> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            match io.recv(s.as_fd()) {
                Ok(k) => {
                    for i in 0..k {
                        got.push((io.payload(i).to_vec(), io.meta(i)));
                    }
                    if got.len() >= n {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    fn batch_roundtrip(batched: bool) {
        let mut io = BatchIo::new(batched);
        let rx = sock();
        let tx = sock();
        assert_eq!(
            io.recv(rx.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        for i in 0..40u8 {
            tx.send_to(&[i; 100], rx.local_addr().unwrap()).unwrap();
        }
        tx.send_to(&[7u8; 3000], rx.local_addr().unwrap()).unwrap();
        let got = recv_n(&mut io, &rx, 41);
        assert_eq!(got.len(), 41);
        for (i, (p, m)) in got.iter().take(40).enumerate() {
            assert_eq!(p, &vec![i as u8; 100]);
            assert_eq!(m.src, Some(tx.local_addr().unwrap()));
            assert!(!m.truncated);
        }
        let (p, m) = &got[40];
        assert!(m.truncated, "3000 bytes do not fit a 2048-byte slot");
        assert_eq!(p.len(), SLOT);

        // Send slots 0 and 1 of a fresh receive to two destinations in one call.
        let (a, b) = (sock(), sock());
        tx.send_to(b"first", rx.local_addr().unwrap()).unwrap();
        tx.send_to(b"second", rx.local_addr().unwrap()).unwrap();
        assert_eq!(recv_n(&mut io, &rx, 2).len(), 2);
        let items = [
            Transmit {
                slot: 0,
                dst: a.local_addr().unwrap(),
            },
            Transmit {
                slot: 1,
                dst: b.local_addr().unwrap(),
            },
        ];
        assert_eq!(io.send(rx.as_fd(), &items, false).unwrap(), 2);
        let mut io2 = BatchIo::new(batched);
        let got = recv_n(&mut io2, &a, 1);
        assert_eq!(got[0].0, b"first");
        assert_eq!(got[0].1.src, Some(rx.local_addr().unwrap()));
        assert_eq!(recv_n(&mut io2, &b, 1)[0].0, b"second");
        assert_eq!(io.batched(), batched);
    }

    #[test]
    fn mmsg_roundtrip_with_truncation() {
        batch_roundtrip(true);
    }

    #[test]
    fn per_packet_fallback_roundtrip_with_truncation() {
        batch_roundtrip(false);
    }

    #[test]
    fn dual_stack_socket_reports_and_reaches_ipv4_peers() {
        let Ok(v6) = UdpSocket::bind("[::]:0") else {
            return; // no IPv6 on this host
        };
        v6.set_nonblocking(true).unwrap();
        let port = v6.local_addr().unwrap().port();
        let peer = sock();
        if peer.send_to(b"x", ("127.0.0.1", port)).is_err() {
            return; // IPV6_V6ONLY host default
        }
        let mut io = BatchIo::new(true);
        let got = recv_n(&mut io, &v6, 1);
        if got.is_empty() {
            return;
        }
        assert_eq!(got[0].1.src, Some(peer.local_addr().unwrap()));
        let items = [Transmit {
            slot: 0,
            dst: peer.local_addr().unwrap(),
        }];
        assert_eq!(io.send(v6.as_fd(), &items, true).unwrap(), 1);
        assert_eq!(recv_n(&mut BatchIo::new(true), &peer, 1)[0].0, b"x");
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_heap_is_counted_and_trimmed() {
        // Many small blocks (below the mmap threshold, so in an arena), every other one freed
        // (the survivors pin the arena's top: only a trim of the middle gives pages back).
        let mut blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 1000]).collect();
        let before = heap_info().unwrap();
        let mut keep = Vec::new();
        for (i, b) in blocks.drain(..).enumerate() {
            if i % 8 == 0 {
                keep.push(b);
            }
        }
        let after = heap_info().unwrap();
        assert!(
            after.free >= before.free + 10_000_000,
            "freed blocks are free arena bytes: {before:?} -> {after:?}"
        );
        assert!(heap_trim(), "whole free pages were given back");
        drop(keep);
    }

    #[test]
    fn sockaddr_roundtrip() {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
        for a in ["192.0.2.1:5004", "[2001:db8::1]:6000"] {
            let a: SocketAddr = a.parse().unwrap();
            let len = to_sockaddr(a, a.is_ipv6(), &mut st);
            assert_eq!(from_sockaddr(&st, len), Some(a));
        }
        let a: SocketAddr = "192.0.2.1:5004".parse().unwrap();
        let len = to_sockaddr(a, true, &mut st);
        assert_eq!(libc::c_int::from(st.ss_family), libc::AF_INET6);
        assert_eq!(from_sockaddr(&st, len), Some(a), "mapped back to IPv4");
        assert_eq!(from_sockaddr(&st, 4), None, "short address");
    }
}
