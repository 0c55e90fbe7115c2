#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! `Config::pin` pins connector threads only when there are at least as many of them as CPUs
//! the process may run on: a process with fewer threads (one passthrough among several on a
//! host) leaves them to the scheduler instead of putting thread 0 on the first CPU, as every
//! other such process would. Read from `/proc/self/task/*/status` (its own test binary, so no
//! other test's connector threads are about).

mod common;

use ckpool_connector::{BackendKind, Config};
use common::Silent;

/// `Cpus_allowed_list` of a status file, as written (`0-1`, `0,2-3`, …).
fn allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .expect("Cpus_allowed_list in a status file")
}

/// How many CPUs a `Cpus_allowed_list` names.
fn count(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// The allowed-CPU list of each live thread named `connector-N`, by N.
fn connector_masks() -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        if let Some(n) = comm.trim().strip_prefix("connector-") {
            out.push((n.parse().unwrap(), allowed(&status)));
        }
    }
    out.sort();
    out
}

fn start(threads: usize) -> ckpool_connector::Connector<()> {
    let cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        threads,
        backend: BackendKind::Epoll,
        pin: true,
        ..Config::default()
    };
    ckpool_connector::start(cfg, |_| Silent).unwrap()
}

#[test]
fn threads_are_pinned_only_when_there_are_as_many_as_cpus() {
    let process = allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let cpus = count(&process);
    assert!(
        ckpool_connector::pins(true, cpus) && !ckpool_connector::pins(false, cpus),
        "as many threads as CPUs pin, and only when asked"
    );

    // As many threads as CPUs: each on one CPU of its own.
    let connector = start(cpus);
    let masks = connector_masks();
    assert_eq!(masks.len(), cpus, "{masks:?}");
    for (t, mask) in &masks {
        assert_eq!(count(mask), 1, "connector-{t} pinned to one CPU: {masks:?}");
    }
    let mut distinct: Vec<&String> = masks.iter().map(|(_, m)| m).collect();
    distinct.dedup();
    assert_eq!(distinct.len(), cpus, "each on a CPU of its own: {masks:?}");
    connector.shutdown();

    if cpus < 2 {
        eprintln!("one CPU: a thread fewer than the CPUs cannot be tried here");
        return;
    }
    // Fewer threads than CPUs: not pinned, the process's whole mask.
    assert!(!ckpool_connector::pins(true, cpus - 1));
    let connector = start(cpus - 1);
    let masks = connector_masks();
    assert_eq!(masks.len(), cpus - 1, "{masks:?}");
    for (t, mask) in &masks {
        assert_eq!(mask, &process, "connector-{t} left unpinned: {masks:?}");
    }
    connector.shutdown();
}
