//! `cargo xtask bench redirect|token`: benchmarks that need root, run inside
//! network namespaces and cgroups this process creates (and removes).
//!
//! Figures are medians over interleaved batches, so the variants see the same
//! machine conditions; ratios are computed within one run.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use podid_agent::redirect::{Redirect, RedirectOptions};
use podid_tests::{
    bench::{Stats, median},
    privileged::{
        BpffsGuard, CgroupGuard, NetNsGuard, PodNetns, ProcessCgroupGuard, missing_preconditions,
        run_ok,
    },
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const IMDS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
const NODE_ADDR: &str = "10.213.0.1";
const POD_ADDR: &str = "10.213.0.2";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(why) = missing_preconditions() {
        anyhow::bail!("the benchmarks need root, cgroup v2 and BTF: {why}");
    }
    let value = |flag: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("redirect") => redirect(
            value("--connections", 20_000) as u32,
            args.iter().any(|a| a == "--program-stats"),
        ),
        Some("token") => {
            podid_tests::bench::token::run(Duration::from_secs(value("--seconds", 10)))
        }
        Some("connections") => {
            podid_tests::bench::load::connections(value("--count", 10_000) as usize)
        }
        Some("soak") => podid_tests::bench::load::soak(
            Duration::from_secs(value("--minutes", 10) * 60 + value("--seconds", 0)),
            value("--rate", 200),
            Duration::from_secs(value("--sample-seconds", 5).max(1)),
        ),
        _ => anyhow::bail!(
            "usage: podid-bench redirect [--connections N] [--program-stats] | token [--seconds N]\n\
             \x20      | connections [--count N] | soak [--minutes N] [--seconds N] [--rate R] [--sample-seconds N]"
        ),
    }
}

fn connect_close(target: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    // RST on close: no TIME_WAIT, so the run never exhausts ephemeral ports.
    socket.set_linger(Some(Duration::ZERO))?;
    socket.connect(&SockAddr::from(target))
}

/// A listener with a deep backlog, so a burst of connects never overflows it
/// (an overflow drops SYNs and costs a 1 s retransmit, which would swamp the
/// figures).
fn deep_listener(addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Accepts and drops connections on `listener` until `stop` (then one more
/// connection wakes it up).
fn acceptor(listener: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok((stream, _)) = listener.accept() {
                drop(stream);
            }
        }
    })
}

struct Variant<'a> {
    name: &'static str,
    cgroup: &'a Path,
    target: SocketAddr,
    samples: Vec<f64>,
}

/// Kernel-measured cost of our programs (BPF_ENABLE_STATS), per run.
fn program_costs() -> Vec<(String, u64, f64)> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|info| {
            let name = info.name_as_str()?.to_string();
            if !name.starts_with("podid_") || info.run_count() == 0 {
                return None;
            }
            let per_run = info.run_time().as_nanos() as f64 / info.run_count() as f64;
            Some((name, info.run_count(), per_run))
        })
        .collect()
}

fn redirect(connections: u32, program_stats: bool) -> anyhow::Result<()> {
    // Run-time statistics (while this fd is open) cost every program run two
    // clock reads, so they are off unless asked for.
    let _stats = program_stats
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok())
        .flatten();
    let _node_netns = NetNsGuard::new();
    let pod = PodNetns::new(NODE_ADDR, POD_ADDR);
    let bpffs = BpffsGuard::new();
    let plain = CgroupGuard::new("bench-plain");
    let mut hooked = CgroupGuard::new("bench-hooked");
    let hooked_pod = hooked.child("pod");
    let agent: SocketAddrV4 = format!("{NODE_ADDR}:2579").parse()?;

    // The agent's listener, on the node side of the veth.
    let listener = deep_listener(agent)?;
    let stop = Arc::new(AtomicBool::new(false));
    let accept_thread = acceptor(listener, stop.clone());

    // (b) our redirect, on the hooked cgroup only.
    let _redirect = Redirect::install(&RedirectOptions {
        cgroup_root: hooked.path().to_path_buf(),
        pin_root: bpffs.pin_root(),
        imds: IMDS,
        agent,
        exempt_self: false,
        exempt: vec![],
        record_capacity: None,
    })?;
    // (c) aad-pod-identity's rule: DNAT in the node's PREROUTING.
    run_ok(Command::new("iptables").args([
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-d",
        "169.254.169.254",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &agent.to_string(),
    ]));

    let mut variants = [
        Variant {
            name: "a) no hook (direct to the node)",
            cgroup: plain.path(),
            target: SocketAddr::V4(agent),
            samples: Vec::new(),
        },
        Variant {
            name: "b) podid cgroup/connect4 redirect",
            cgroup: &hooked_pod,
            target: SocketAddr::V4(IMDS),
            samples: Vec::new(),
        },
        Variant {
            name: "c) iptables DNAT (aad-pod-identity)",
            cgroup: plain.path(),
            target: SocketAddr::V4(IMDS),
            samples: Vec::new(),
        },
    ];

    const ROUNDS: u32 = 40;
    let per_batch = (connections / ROUNDS).max(50);
    // The client runs on its own thread, in the pod's network namespace.
    let results = std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<()> {
                pod.enter();
                // Warm up every path (ARP, conntrack, caches).
                for variant in &variants {
                    let _cg = ProcessCgroupGuard::enter(variant.cgroup);
                    for _ in 0..200 {
                        connect_close(variant.target)?;
                    }
                }
                for _ in 0..ROUNDS {
                    for variant in variants.iter_mut() {
                        let _cg = ProcessCgroupGuard::enter(variant.cgroup);
                        let started = Instant::now();
                        for _ in 0..per_batch {
                            connect_close(variant.target)?;
                        }
                        let per_connect = started.elapsed().as_secs_f64() / f64::from(per_batch);
                        variant.samples.push(per_connect * 1e6);
                    }
                }
                Ok(())
            })
            .join()
    });
    let costs = program_costs();
    stop.store(true, Ordering::Relaxed);
    let _ = std::net::TcpStream::connect(agent);
    let _ = accept_thread.join();
    let _ = Command::new("iptables")
        .args(["-t", "nat", "-F", "PREROUTING"])
        .output();
    results.map_err(|_| anyhow::anyhow!("client thread panicked"))??;

    println!(
        "\nredirect benchmark: TCP connect+close from a pod netns (veth) to the node, {} rounds × {} connections per variant\n",
        ROUNDS, per_batch
    );
    println!(
        "{:<40} {:>12} {:>12} {:>12}",
        "variant", "median µs", "p10 µs", "p90 µs"
    );
    let mut medians = Vec::new();
    for variant in &variants {
        let stats = Stats::of(&variant.samples);
        println!(
            "{:<40} {:>12.2} {:>12.2} {:>12.2}",
            variant.name, stats.p50, stats.p10, stats.p90
        );
        medians.push(median(&variant.samples));
    }
    let (a, b, c) = (medians[0], medians[1], medians[2]);
    if !costs.is_empty() {
        println!("\nkernel-measured program cost (BPF_ENABLE_STATS):");
        for (name, runs, per_run) in &costs {
            println!("  {name:<16} {runs:>8} runs  {per_run:>8.0} ns/run");
        }
    }
    println!("\nb/a = {:.3}  (target ≤ 1.10)", b / a);
    println!(
        "b/c = {:.3}  (target < 1.00: the redirect is faster than DNAT)",
        b / c
    );
    Ok(())
}
