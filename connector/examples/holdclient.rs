//! Opens many idle TCP connections from one source address and holds them, printing progress:
//! the client half of connection-holding experiments with the `hold` example.
//!
//! ```text
//! cargo run --release -p ckpool-connector --example holdclient -- \
//!     --connect 127.0.0.1:23334 --source 127.0.0.2 --count 15000 --hold 60 --ping
//! ```
//!
//! Options: `--connect ADDR` (default 127.0.0.1:23334), `--source IP` (default 127.0.0.1; any of
//! 127/8 works on loopback, and each source address has its own ~28k ephemeral ports),
//! `--count N` (default 1000; keep it under this process's descriptor limit, which it raises to
//! the hard limit), `--hold SECS` (default 30), `--ping` (once all are open, send one line on each
//! and wait for one line back), `--ping-delay SECS` (wait this long between opening them all and
//! the ping, default 0), `--every SECS` (progress interval while holding, default 5),
//! `--first-port P` (default 20000).
//!
//! Each socket is bound to the source address with an explicit local port, counting up from
//! `--first-port` and skipping ports in use: binding with port 0 makes the kernel search its
//! ephemeral range at `bind` time, which gets slow (seconds) past ~14k sockets per address.
//! Every connect and read has a timeout, and the process exits after `--hold`.

use std::error::Error;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    connect: SocketAddr,
    source: IpAddr,
    count: usize,
    hold: Duration,
    ping: bool,
    ping_delay: Duration,
    every: Duration,
    first_port: u16,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        connect: "127.0.0.1:23334".parse()?,
        source: "127.0.0.1".parse()?,
        count: 1000,
        hold: Duration::from_secs(30),
        ping: false,
        ping_delay: Duration::ZERO,
        every: Duration::from_secs(5),
        first_port: 20_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--connect" => args.connect = value()?.parse()?,
            "--source" => args.source = value()?.parse()?,
            "--count" => args.count = value()?.parse()?,
            "--hold" => args.hold = Duration::from_secs(value()?.parse()?),
            "--ping" => args.ping = true,
            "--ping-delay" => args.ping_delay = Duration::from_secs(value()?.parse()?),
            "--every" => args.every = Duration::from_secs(value()?.parse::<u64>()?.max(1)),
            "--first-port" => args.first_port = value()?.parse()?,
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let nofile = ckpool_connector::raise_nofile_limit()?;
    println!(
        "holdclient pid={} source={} target={} count={} nofile={nofile}",
        std::process::id(),
        args.source,
        args.connect,
        args.count
    );
    let started = Instant::now();
    let mut conns = Vec::with_capacity(args.count);
    let mut failed = 0usize;
    let mut port = args.first_port;
    for i in 0..args.count {
        match connect(args.source, &mut port, args.connect) {
            Ok(stream) => conns.push(stream),
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("connect {i} failed: {e}");
                }
            }
        }
        if (i + 1) % 5000 == 0 {
            println!(
                "connected {} ({failed} failed) in {:.2}s",
                conns.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "connected {} ({failed} failed) in {:.2}s",
        conns.len(),
        started.elapsed().as_secs_f64()
    );

    if args.ping {
        std::thread::sleep(args.ping_delay);
        let answered = ping_all(&mut conns);
        println!("ping: {answered} of {} answered", conns.len());
    }

    let end = Instant::now() + args.hold;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep(args.every.min(end - now));
        // A connection the server closed reads end of stream at once; idle ones would block.
        let closed = conns.iter().filter(|s| is_closed(s)).count();
        println!(
            "held {} (closed by the server: {closed}) at {:.0}s",
            conns.len() - closed,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Connects from `source`, bound to the first free local port from `*port` on (advanced past it).
fn connect(source: IpAddr, port: &mut u16, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    loop {
        let local = SocketAddr::new(source, *port);
        *port = port
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("no local port left"))?;
        match sock.bind(&local.into()) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    }
    sock.connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
    let stream = TcpStream::from(sock);
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends one line on every connection, then reads one line back from each; returns how many
/// answered.
fn ping_all(conns: &mut [TcpStream]) -> usize {
    for s in conns.iter_mut() {
        let _ = s.write_all(b"{\"id\":1,\"method\":\"mining.ping\",\"params\":[]}\n");
    }
    let mut answered = 0;
    let mut buf = [0u8; 256];
    for s in conns.iter_mut() {
        if s.set_read_timeout(Some(READ_TIMEOUT)).is_err() {
            continue;
        }
        let mut got = Vec::new();
        while !got.contains(&b'\n') {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
        if got.contains(&b'\n') {
            answered += 1;
        }
    }
    answered
}

fn is_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}
