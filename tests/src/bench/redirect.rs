//! `cargo xtask bench redirect`: what the redirect costs a TCP client.
//!
//! A client in a pod network namespace (behind a veth, as a real pod is)
//! connects and closes, in batches, three ways:
//! - (a) straight to a listener on the node, no hook;
//! - (b) to 169.254.169.254:80 from a cgroup with podid's programs attached,
//!   redirected to the agent's listener;
//! - (c) to 169.254.169.254:80, rewritten by an iptables DNAT rule in the
//!   node's PREROUTING, which is what aad-pod-identity installs;
//! - (d) as (b), in zero-policy mode: from a second pod whose network
//!   namespace has a listener of its own, which the redirect picks by the
//!   namespace's cookie; the connection stays on the pod's loopback.
//!
//! The three run back to back in every round, in a rotating order, so each
//! round compares them under the same machine conditions. The ratios are the
//! medians of the per-round ratios, with a distribution-free 95% interval: on
//! a shared 2-core VM the absolute figures drift by more than the effect being
//! measured, while the paired ratios do not.
//!
//! podid's enforcement programs are attached too: the tc guard on the node's
//! side of the pod's veth (every packet the node sends the pod, in a, b and
//! c alike) and, with `--egress-guard`, `podid_egress` on the hooked cgroup
//! (every packet of (b)'s and (d)'s sockets). `--program-stats` prints what
//! each costs a packet.
//!
//! Behind both listeners an acceptor does what the agent does with every
//! connection: accept it and take its kernel record out of the peer map, so
//! the record maps see production's insert-and-take cycle rather than filling
//! up. (a) and (c) use their own listener port, so their connections can never
//! take a record (b) left.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use podid_agent::redirect::{Redirect, RedirectOptions};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{Stats, median, median_ci95};
use crate::privileged::{
    BpffsGuard, CgroupGuard, NetNsGuard, PodNetns, ProcessCgroupGuard, run_ok,
};

const IMDS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const POD_ADDR: &str = "10.213.0.2";
/// Where (b) is redirected: the agent's listener.
const AGENT: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 2579);
/// Where (a) connects and (c) is rewritten to.
const BASELINE: SocketAddrV4 = SocketAddrV4::new(NODE_ADDR, 2580);
const ROUNDS: u32 = 60;
const WARM_UP: u32 = 200;

/// Options of one run.
#[derive(Debug, Clone, Copy)]
pub struct RedirectBench {
    /// Connections per variant, spread over the rounds.
    pub connections: u32,
    /// Also report the kernel-measured cost of each program.
    pub program_stats: bool,
    /// Also attach the optional `podid_egress` program (`--egress-guard`).
    pub egress_guard: bool,
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

/// Accepts connections until `stop` (then one more connection wakes it up),
/// taking each one's kernel record as the agent does. Returns how many had one.
fn accept_and_take(listener: &TcpListener, redirect: &Redirect, stop: &AtomicBool) -> u64 {
    let mut attributed = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok((stream, peer)) = listener.accept() else {
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        if matches!(redirect.take_peer_record(peer, local), Ok(Some(_))) {
            attributed += 1;
        }
    }
    attributed
}

struct Variant<'a> {
    name: &'static str,
    netns: &'a PodNetns,
    cgroup: &'a Path,
    target: SocketAddr,
    /// µs per connect+close, one per round.
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

/// The iptables rule (c) uses, as arguments after `-A`/`-D`.
fn dnat_rule() -> Vec<String> {
    [
        "PREROUTING",
        "-t",
        "nat",
        "-p",
        "tcp",
        "-d",
        "169.254.169.254",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &BASELINE.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs the benchmark and prints its report.
pub fn run(options: RedirectBench) -> anyhow::Result<()> {
    // Run-time statistics (while this fd is open) cost every program run two
    // clock reads, so they are off unless asked for.
    let _stats = options
        .program_stats
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok())
        .flatten();
    let _node_netns = NetNsGuard::new();
    let pod = PodNetns::new(&NODE_ADDR.to_string(), POD_ADDR);
    let bpffs = BpffsGuard::new();
    let plain = CgroupGuard::new("bench-plain");
    let mut hooked = CgroupGuard::new("bench-hooked");
    let hooked_pod = hooked.child("pod");
    // (d) runs in a cgroup of its own with an install of its own in
    // zero-policy mode, so (b) measures node mode exactly as it ships (no
    // pod listener lookup).
    let mut hooked_zero = CgroupGuard::new("bench-hooked-zero");
    let hooked_zero_pod = hooked_zero.child("pod");
    let zero_bpffs = BpffsGuard::new();

    // (d) a second pod with a listener of its own (zero-policy mode).
    let pod_d = PodNetns::new("10.213.1.1", "10.213.1.2");
    let pod_listener_addr = SocketAddrV4::new(podid_agent::pod_listeners::address(0), AGENT.port());
    let (pod_listener, pod_cookie) = podid_agent::pod_listeners::listen_in(
        std::path::PathBuf::from(format!("/run/netns/{}", pod_d.name())),
        pod_listener_addr,
    )?;
    pod_listener.set_nonblocking(false)?;
    let agent_listener = deep_listener(AGENT)?;
    let baseline_listener = deep_listener(BASELINE)?;
    // (b) our redirect, on the hooked cgroup only. The tc guard goes on the
    // node's side of the pod's veth, where every variant's replies leave
    // the node: what it costs a packet that is not bound for IMDS (all of a
    // node's traffic, on its real interface) shows in --program-stats, and
    // it costs a, b and c alike.
    let redirect = Redirect::install(&RedirectOptions {
        cgroup_root: hooked.path().to_path_buf(),
        pin_root: bpffs.pin_root(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: false,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Named(vec![pod.host_if().to_string()]),
        agent_started_ns: 0,
        egress_guard: options.egress_guard,
        pod_listeners: None,
    })?;
    let zero_policy = Redirect::install(&RedirectOptions {
        cgroup_root: hooked_zero.path().to_path_buf(),
        pin_root: zero_bpffs.pin_root(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: false,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Off,
        agent_started_ns: 0,
        egress_guard: options.egress_guard,
        pod_listeners: Some(podid_agent::redirect::PodListenerRange {
            net: podid_agent::pod_listeners::POD_LISTENER_NET,
            prefix: podid_agent::pod_listeners::POD_LISTENER_PREFIX,
            port: AGENT.port(),
        }),
    })?;
    zero_policy.add_pod_listener(pod_cookie, pod_listener_addr)?;
    // (c) aad-pod-identity's rule. The node netns is this run's own and goes
    // away with it; the rule is still removed explicitly.
    run_ok(Command::new("iptables").arg("-A").args(dnat_rule()));

    let mut variants = [
        Variant {
            name: "a) no hook (direct to the node)",
            netns: &pod,
            cgroup: plain.path(),
            target: SocketAddr::V4(BASELINE),
            samples: Vec::new(),
        },
        Variant {
            name: "b) podid cgroup/connect4 redirect",
            netns: &pod,
            cgroup: &hooked_pod,
            target: SocketAddr::V4(IMDS),
            samples: Vec::new(),
        },
        Variant {
            name: "c) iptables DNAT (aad-pod-identity)",
            netns: &pod,
            cgroup: plain.path(),
            target: SocketAddr::V4(IMDS),
            samples: Vec::new(),
        },
        Variant {
            name: "d) podid redirect, zero-policy mode",
            netns: &pod_d,
            cgroup: &hooked_zero_pod,
            target: SocketAddr::V4(IMDS),
            samples: Vec::new(),
        },
    ];
    let per_batch = (options.connections / ROUNDS).max(50);
    let stop = AtomicBool::new(false);
    let (client, agent_taken, baseline_taken) = std::thread::scope(|scope| {
        let agent_acceptor = scope.spawn(|| accept_and_take(&agent_listener, &redirect, &stop));
        let pod_acceptor = scope.spawn(|| accept_and_take(&pod_listener, &zero_policy, &stop));
        let baseline_acceptor =
            scope.spawn(|| accept_and_take(&baseline_listener, &redirect, &stop));
        // The client runs on its own thread, in the pod's network namespace.
        let client = scope
            .spawn(|| -> anyhow::Result<()> {
                // Warm up every path (ARP, conntrack, caches).
                for variant in &variants {
                    variant.netns.enter();
                    let _cg = ProcessCgroupGuard::enter(variant.cgroup);
                    for _ in 0..WARM_UP {
                        connect_close(variant.target)?;
                    }
                }
                let count = variants.len();
                for round in 0..ROUNDS {
                    for offset in 0..count {
                        let variant = &mut variants[(round as usize + offset) % count];
                        variant.netns.enter();
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
            .join();
        stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(AGENT);
        let _ = std::net::TcpStream::connect(BASELINE);
        // The pod listener is in pod d's namespace: wake it from there.
        std::thread::scope(|wake| {
            wake.spawn(|| {
                pod_d.enter();
                let _ = std::net::TcpStream::connect(pod_listener_addr);
            });
        });
        (
            client,
            agent_acceptor.join().unwrap_or(0) + pod_acceptor.join().unwrap_or(0),
            baseline_acceptor.join().unwrap_or(0),
        )
    });
    let costs = program_costs();
    let counters = redirect.counters()?;
    let _ = Command::new("iptables")
        .arg("-D")
        .args(dnat_rule())
        .output();
    client.map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    anyhow::ensure!(
        baseline_taken == 0,
        "{baseline_taken} connections from the unhooked cgroup found a kernel record"
    );

    println!(
        "\nredirect benchmark: TCP connect+close from a pod netns (veth) to the node, {ROUNDS} rounds × {per_batch} connections per variant, order rotating\n"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>12}",
        "variant", "median µs", "p10 µs", "p90 µs"
    );
    for variant in &variants {
        let stats = Stats::of(&variant.samples);
        println!(
            "{:<40} {:>12.2} {:>12.2} {:>12.2}",
            variant.name, stats.p50, stats.p10, stats.p90
        );
    }
    let [a, b, c, d] = &variants;
    let paired = |x: &Variant, y: &Variant| -> Vec<f64> {
        x.samples
            .iter()
            .zip(&y.samples)
            .map(|(x, y)| x / y)
            .collect()
    };
    let (b_over_a, b_over_c, d_over_b) = (paired(b, a), paired(b, c), paired(d, b));
    let (a_lo, a_hi) = median_ci95(&b_over_a);
    let (c_lo, c_hi) = median_ci95(&b_over_c);
    let (d_lo, d_hi) = median_ci95(&d_over_b);
    println!(
        "\nkernel records: {} redirected, {} recorded; the agent side took {agent_taken} \
         (b and d made {}); the baseline listener took {baseline_taken} (must be 0)",
        counters.redirected,
        counters.recorded,
        2 * (WARM_UP + ROUNDS * per_batch)
    );
    if !costs.is_empty() {
        println!(
            "\nkernel-measured program cost (BPF_ENABLE_STATS, includes the stats' own clock reads):"
        );
        for (name, runs, per_run) in &costs {
            println!("  {name:<16} {runs:>8} runs  {per_run:>8.0} ns/run");
        }
    }
    println!(
        "\nb/a = {:.3}  (95% interval {a_lo:.3}–{a_hi:.3}; ratio of medians {:.3})  target ≤ 1.10",
        median(&b_over_a),
        median(&b.samples) / median(&a.samples)
    );
    println!(
        "b/c = {:.3}  (95% interval {c_lo:.3}–{c_hi:.3}; ratio of medians {:.3})  target < 1.00: the redirect is faster than DNAT",
        median(&b_over_c),
        median(&b.samples) / median(&c.samples)
    );
    println!(
        "d/b = {:.3}  (95% interval {d_lo:.3}–{d_hi:.3}; ratio of medians {:.3})  target ≤ 1.00: zero-policy mode is no slower than node-IP mode",
        median(&d_over_b),
        median(&d.samples) / median(&b.samples)
    );
    Ok(())
}
