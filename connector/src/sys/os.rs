//! OS helpers shared by every backend: the eventfd waker, listener sockets, RLIMIT_NOFILE, CPU
//! affinity; and receive timestamps, for ckload.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Wakes a connector thread blocked in its backend: an eventfd the backend watches.
pub(crate) struct Waker {
    /// The eventfd (non-blocking), as a `File` for safe `read`/`write`.
    file: File,
}

impl Waker {
    /// Creates a non-blocking eventfd.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the flags are valid constants.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd, is open, and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            file: File::from(owned),
        })
    }

    /// Makes the eventfd readable, waking whoever waits on it.
    pub(crate) fn wake(&self) {
        // EAGAIN means the counter is saturated: the thread is already due to wake.
        if let Err(e) = (&self.file).write(&1u64.to_ne_bytes())
            && e.kind() != io::ErrorKind::WouldBlock
        {
            tracing::error!(error = %e, "eventfd write failed");
        }
    }

    /// Resets the eventfd after it woke a thread.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        // One read resets the counter; EAGAIN means it was already zero.
        let _ = (&self.file).read(&mut buf);
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Creates a non-blocking TCP listener bound to `addr` with `SO_REUSEPORT`, so that each connector
/// thread can bind its own socket to the same address and the kernel spreads connections.
///
/// `TCP_NODELAY` is set on the listener: Linux copies it to every accepted socket, which is how
/// the io_uring backend's direct descriptors (which no `setsockopt` call can reach) get it.
pub(crate) fn listener_socket(addr: SocketAddr, backlog: i32) -> io::Result<(Socket, SocketAddr)> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))?;
    Ok((sock, local))
}

/// A socket of this process for an inherited listening socket `fd` (a duplicate, sharing the
/// kernel socket), made non-blocking with `TCP_NODELAY` (see [`listener_socket`]); with its
/// local address. Fails unless `fd` is a listening TCP socket with an IP address.
pub(crate) fn inherited_listener(fd: &OwnedFd) -> io::Result<(Socket, SocketAddr)> {
    let sock = Socket::from(fd.try_clone()?);
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    if sock.r#type()? != Type::STREAM {
        return Err(invalid("an inherited listener is not a stream socket"));
    }
    if !sock.is_listener()? {
        return Err(invalid("an inherited socket is not listening"));
    }
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| invalid("an inherited listener has no IP address"))?;
    // Shared with whoever else holds the socket (the instance that handed it over).
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    Ok((sock, local))
}

/// Fails with `AddrInUse` when another socket already listens on `addr`. The listeners use
/// `SO_REUSEPORT` (one per thread), which would otherwise let a second process (say, a second
/// ckpool-rs started by mistake) silently share the port and take half the miners. A probe bound
/// without `SO_REUSEPORT` is refused whenever anyone listens there.
pub(crate) fn ensure_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already in use by another process"),
            )
        } else {
            e
        }
    })
}

/// Gives the allocator's free memory back to the kernel: glibc keeps freed heap pages resident
/// (it only trims the top of each arena), so the transient buffers of a broadcast to 100,000
/// connections (completions, outboxes, send lists) would otherwise stay in the RSS for good.
/// A no-op with other C libraries.
pub(crate) fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only walks the allocator's own free lists (under its locks) and
    // `madvise`s whole free pages; it touches no memory in use and takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes glibc serve every allocation of 128 KiB or more with its own mapping, returned to the
/// kernel when freed. glibc otherwise raises that threshold each time such a block is freed (up
/// to 32 MiB), after which the big transient buffers of a broadcast come from the heap and their
/// pages stay resident after they are freed. Setting it once disables that adjustment. Called by
/// [`crate::start`]; a no-op with other C libraries.
pub(crate) fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only changes an allocator setting; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = nofile_limit()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read just above; setrlimit only reads it.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The current `RLIMIT_NOFILE` (the soft limit also caps the size of an io_uring fixed-file
/// table).
pub(crate) fn nofile_limit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Pins the calling thread to the `index`-th CPU (wrapping around) of the CPUs the process may
/// run on; returns that CPU. See [`crate::pin_current_thread`].
pub(crate) fn pin_current_thread(index: usize) -> io::Result<usize> {
    // The main thread's mask (pid = tgid) is the process's set: a thread pinned earlier (this
    // one, or the thread that spawned it) has only one CPU left in its own mask.
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() };
    let allowed = affinity(pid)?;
    if allowed.is_empty() {
        return Err(io::Error::other("the process may run on no CPU"));
    }
    let cpu = allowed
        .get(index % allowed.len())
        .copied()
        .ok_or_else(|| io::Error::other("CPU index out of range"))?;
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from `affinity`, which only reports CPUs below CPU_SETSIZE, so CPU_SET
    // stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid, initialised cpu_set_t of the size passed; pid 0 is the calling
    // thread; the kernel only reads the mask.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cpu)
}

/// How many CPUs the process may run on (the main thread's mask).
pub(crate) fn process_cpus() -> io::Result<usize> {
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() };
    affinity(pid).map(|cpus| cpus.len())
}

/// The CPUs thread `tid` may run on (0: the calling thread), in increasing order.
pub(crate) fn affinity(tid: libc::pid_t) -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed, for the whole call.
    let rc = unsafe { libc::sched_getaffinity(tid, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bits = 8 * size_of::<libc::cpu_set_t>();
    Ok((0..bits)
        // SAFETY: `cpu` is below the number of bits in `set`, so CPU_ISSET reads inside it.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Asks the kernel to stamp what a socket receives with its arrival time (`SO_TIMESTAMPNS`),
/// which `recv_stamped` then returns.
pub(crate) fn enable_rx_timestamps(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket for the call's length (borrowed), and the option value is
    // a live `c_int` whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads what a socket has into `buf` without blocking (`recvmsg` with `MSG_DONTWAIT`): the byte
/// count, and the kernel's arrival time (`CLOCK_REALTIME` ns, `CLOCK_REALTIME`) of the last
/// segment read when the socket stamps them (`enable_rx_timestamps`).
pub(crate) fn recv_stamped(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    // Room for one `SCM_TIMESTAMPNS` (a 16-byte header and a 16-byte timespec) and more,
    // 8-byte aligned as a `cmsghdr` needs.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `msghdr` is plain data for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (covering `buf`, writable for its length) and at `control`
    // (writable for `msg_controllen` bytes), all alive across the call; `fd` is open (borrowed).
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    let Ok(n) = usize::try_from(n) else {
        return Err(io::Error::last_os_error());
    };
    let mut stamp = None;
    // SAFETY: `CMSG_LEN` is arithmetic on its argument.
    let whole = unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::timespec>() as u32) } as usize;
    // SAFETY: `msg` was filled by a successful `recvmsg`: its control fields describe the
    // messages the kernel wrote into `control`, which `CMSG_FIRSTHDR`/`CMSG_NXTHDR` walk within
    // `msg_controllen` bytes.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a header inside `control` (above).
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET
            && h.cmsg_type == libc::SCM_TIMESTAMPNS
            && h.cmsg_len as usize >= whole
        {
            // SAFETY: `c` is a header of this `msg` (above); `CMSG_DATA` is arithmetic on it.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::timespec>();
            // SAFETY: the header says its data holds a whole `timespec`; it may be unaligned.
            let ts = unsafe { std::ptr::read_unaligned(data) };
            stamp = u64::try_from(ts.tv_sec).ok().map(|s| {
                s.saturating_mul(1_000_000_000)
                    .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
            });
        }
        // SAFETY: as for `CMSG_FIRSTHDR`: `c` is a header of this `msg`.
        c = unsafe { libc::CMSG_NXTHDR(&raw const msg, c) };
    }
    Ok((n, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_leaves_one_cpu_in_the_thread_mask() {
        // On a thread of its own, so the test harness's threads keep their masks.
        std::thread::spawn(|| {
            let before = affinity(0).unwrap();
            assert!(!before.is_empty());
            let cpu = pin_current_thread(0).unwrap();
            assert_eq!(affinity(0).unwrap(), vec![cpu]);
            assert_eq!(
                Some(&cpu),
                before.first(),
                "index 0 is the first allowed CPU"
            );
            // Indices wrap around the allowed set; pinning again works from the process's set,
            // not from this thread's (now single-CPU) mask.
            let again = pin_current_thread(before.len()).unwrap();
            assert_eq!(again, cpu);
            if let Some(&second) = before.get(1) {
                assert_eq!(pin_current_thread(1).unwrap(), second);
                assert_eq!(affinity(0).unwrap(), vec![second]);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn received_bytes_carry_their_arrival_time() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        // Loopback delivers at once; the deadline only keeps a broken kernel from hanging us.
        let read = |rx: &TcpStream, buf: &mut [u8]| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match recv_stamped(rx.as_fd(), buf) {
                    Ok(r) => return r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "nothing to read");
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        // Nothing yet: a non-blocking read says so.
        let e = recv_stamped(rx.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // Unstamped until asked.
        tx.write_all(b"one\n").unwrap();
        let n = read(&rx, &mut buf);
        assert_eq!(n, (4, None));
        enable_rx_timestamps(rx.as_fd()).unwrap();
        let real = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        };
        // The first socket on the machine to ask turns the kernel's stamping on from a work
        // item, a moment later: lines read before that carry no stamp (CI saw one). Each line
        // is read whole before the next is written.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let before = real();
            tx.write_all(b"two\n").unwrap();
            let (n, stamp) = read(&rx, &mut buf);
            let after = real();
            assert_eq!(&buf[..n], b"two\n");
            if let Some(stamp) = stamp {
                assert!(
                    (before..=after).contains(&stamp),
                    "{before} <= {stamp} <= {after}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no stamp 10 s after asking for them"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The end of the stream reads as 0 bytes.
        drop(tx);
        let n = read(&rx, &mut buf).0;
        assert_eq!(n, 0);
    }
}
