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
        Some("redirect") => redirect(value("--connections", 20_000) as u32),
        _ => anyhow::bail!("usage: podid-bench redirect [--connections N]"),
    }
}

fn connect_close(target: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    // RST on close: no TIME_WAIT, so the run never exhausts ephemeral ports.
    socket.set_linger(Some(Duration::ZERO))?;
    socket.connect(&SockAddr::from(target))
}

/// Accepts and drops connections on `listener` until `stop`.
fn acceptor(listener: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => drop(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => {}
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

fn redirect(connections: u32) -> anyhow::Result<()> {
    let _node_netns = NetNsGuard::new();
    let pod = PodNetns::new(NODE_ADDR, POD_ADDR);
    let bpffs = BpffsGuard::new();
    let plain = CgroupGuard::new("bench-plain");
    let mut hooked = CgroupGuard::new("bench-hooked");
    let hooked_pod = hooked.child("pod");
    let agent: SocketAddrV4 = format!("{NODE_ADDR}:2579").parse()?;

    // The agent's listener, on the node side of the veth.
    let listener = TcpListener::bind(agent)?;
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
    stop.store(true, Ordering::Relaxed);
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
    println!("\nb/a = {:.3}  (target ≤ 1.10)", b / a);
    println!(
        "b/c = {:.3}  (target < 1.00: the redirect is faster than DNAT)",
        b / c
    );
    Ok(())
}
