//! A node's network as a CNI lays it out, in network namespaces the test
//! creates:
//!
//! ```text
//!  pod netns i                 node netns (the test thread's)                 wire netns
//!  eth0 10.244.0.10+i /32  ── caliN (no IP, proxy_arp) ── routing ── imdsN ── wireN
//!  default via 169.254.1.1     10.244.0.x/32 dev caliN       192.168.169.1/30     192.168.169.2/30
//!                              node IP 10.240.0.4 (on lo)                         169.254.169.254 on lo
//!                              169.254.169.254 via wire                           (the IMDS emulator)
//! ```
//!
//! Pods reach the node IP (where the agent listens) through their veth and
//! the node's routing, as with Calico (a /32 per pod, the host side
//! answering ARP for the 169.254.1.1 gateway, `DefaultEndpointToHostAction`
//! applying to that traffic). IMDS sits beyond the node, as on Azure: a
//! packet only gets there if the node forwards or sends it through the
//! interface that routes 169.254.169.254. Every namespace and link is
//! removed on drop.

use std::{
    fs, io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

use crate::privileged::run_ok;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The node's IP, where the agent listens.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 4);
/// The gateway pods route through (answered by the node's proxy ARP).
const POD_GATEWAY: &str = "169.254.1.1";

fn unique() -> String {
    format!(
        "{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

fn write_sysctl(path: &str, value: &str) {
    // /proc/sys/net resolves the network namespace of the writing thread.
    let full = format!("/proc/sys/net/{path}");
    fs::write(&full, value).unwrap_or_else(|e| panic!("write {full}: {e}"));
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    fn new(label: &str) -> Self {
        let name = format!("podid-{label}-{}", unique());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        Self { name }
    }

    /// Its name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path (`/run/netns/<name>`), for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `ip <args>` inside it.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name, "ip"])
                .args(args),
        )
    }

    /// Runs `program args` inside it and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
        )
    }

    /// Runs `body` with the calling thread inside this namespace, then
    /// returns it to where it was.
    pub fn enter_while<T>(&self, body: impl FnOnce() -> T) -> T {
        let original: OwnedFd = fs::File::open("/proc/thread-self/ns/net")
            .expect("open own netns")
            .into();
        let target = fs::File::open(self.path()).expect("open netns");
        // SAFETY: valid netns fds; affects only this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
        struct Back(OwnedFd);
        impl Drop for Back {
            fn drop(&mut self) {
                // SAFETY: the original netns fd.
                unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
            }
        }
        let _back = Back(original);
        body()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One pod: its network namespace and addresses.
pub struct Pod {
    /// The pod's network namespace.
    pub netns: NamedNetns,
    /// Its IP.
    pub ip: Ipv4Addr,
    /// The host side of its veth (in the node namespace).
    pub host_if: String,
}

impl Pod {
    /// The MAC address of an interface, read with `ip -j link`.
    fn mac(json: &str) -> String {
        let parsed: Value = serde_json::from_str(json.trim()).unwrap_or(Value::Null);
        parsed[0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The pod side's MAC.
    pub fn mac_inside(&self) -> String {
        Self::mac(&self.netns.ip(&["-j", "link", "show", "eth0"]))
    }

    /// The host side's MAC (the pod's next hop on the wire).
    pub fn mac_host_side(&self) -> String {
        Self::mac(&run_ok(Command::new("ip").args([
            "-j",
            "link",
            "show",
            &self.host_if,
        ])))
    }
}

/// The wire beyond the node, where IMDS lives.
pub struct Wire {
    /// Its network namespace.
    pub netns: NamedNetns,
    /// The node side of the link (the interface that routes IMDS).
    pub node_if: String,
}

/// The whole layout. Create it from the thread whose network namespace is
/// the node's (a [`crate::privileged::NetNsGuard`]).
pub struct PodNetwork {
    /// The pods, in creation order.
    pub pods: Vec<Pod>,
    /// The wire.
    pub wire: Wire,
}

impl PodNetwork {
    /// Builds the node side, the wire and `pods` pods.
    pub fn new(pods: usize) -> Self {
        write_sysctl("ipv4/ip_forward", "1");
        write_sysctl("ipv4/conf/all/rp_filter", "0");
        write_sysctl("ipv4/conf/default/rp_filter", "0");
        let id = unique();
        // The node's IP, local to the node namespace (this kernel may have
        // no dummy interfaces; a local address on lo routes the same).
        run_ok(Command::new("ip").args(["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]));

        let wire_ns = NamedNetns::new("wire");
        let node_if = format!("imds{id}");
        let wire_if = format!("wire{id}");
        run_ok(Command::new("ip").args([
            "link", "add", &node_if, "type", "veth", "peer", "name", &wire_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &wire_if, "netns", wire_ns.name()]));
        run_ok(Command::new("ip").args(["addr", "add", "192.168.169.1/30", "dev", &node_if]));
        run_ok(Command::new("ip").args(["link", "set", &node_if, "up"]));
        wire_ns.ip(&["link", "set", "lo", "up"]);
        wire_ns.ip(&["addr", "add", "192.168.169.2/30", "dev", &wire_if]);
        wire_ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        wire_ns.ip(&["link", "set", &wire_if, "up"]);
        wire_ns.ip(&["route", "add", "default", "via", "192.168.169.1"]);
        run_ok(Command::new("ip").args([
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            "192.168.169.2",
            "dev",
            &node_if,
        ]));
        // The node's default route leaves through the wire, as through eth0
        // on a VM. Proxy ARP for the pods' gateway needs it: the host side of
        // a pod's veth answers only for addresses it routes elsewhere.
        run_ok(Command::new("ip").args(["route", "add", "default", "via", "192.168.169.2"]));
        // Everything that reaches the wire from the node's pods is counted
        // here, whatever it is: the proof that nothing got past the node.
        wire_ns.exec(
            "nft",
            &[
                "add table inet wire; add chain inet wire input { type filter hook input priority 0; }; add rule inet wire input ip saddr 10.244.0.0/16 counter; add rule inet wire input ip saddr 192.168.169.1 ip daddr 169.254.169.254 tcp dport 80 counter",
            ],
        );
        let wire = Wire {
            netns: wire_ns,
            node_if,
        };

        let mut network = Self {
            pods: Vec::new(),
            wire,
        };
        for _ in 0..pods {
            network.add_pod();
        }
        network
    }

    /// Adds a pod: a namespace, a veth, a /32 and the routes a CNI sets.
    pub fn add_pod(&mut self) -> &Pod {
        let index = self.pods.len();
        let ip = Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 244, 0, 10)) + u32::try_from(index).expect("pod count"),
        );
        let netns = NamedNetns::new("pod");
        let host_if = format!("cali{}", unique());
        let peer = format!("tmp{}", unique());
        run_ok(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &peer, "netns", netns.name()]));
        run_ok(Command::new("ip").args(["link", "set", &host_if, "up"]));
        write_sysctl(&format!("ipv4/conf/{host_if}/proxy_arp"), "1");
        write_sysctl(&format!("ipv4/conf/{host_if}/rp_filter"), "0");
        run_ok(Command::new("ip").args(["route", "add", &format!("{ip}/32"), "dev", &host_if]));
        netns.ip(&["link", "set", "lo", "up"]);
        netns.ip(&["link", "set", &peer, "name", "eth0"]);
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"]);
        netns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"]);
        self.pods.push(Pod { netns, ip, host_if });
        self.pods.last().expect("just pushed")
    }

    /// Packets that reached the wire from pods (any) and the node's own
    /// connections to IMDS port 80: (from pods, from the node).
    pub fn wire_counts(&self) -> (u64, u64) {
        let out = self
            .wire
            .netns
            .exec("nft", &["-j", "list", "table", "inet", "wire"]);
        let parsed: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        let mut counts = Vec::new();
        for item in parsed["nftables"].as_array().into_iter().flatten() {
            if let Some(rule) = item.get("rule") {
                let packets = rule["expr"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|e| e["counter"]["packets"].as_u64())
                    .unwrap_or(0);
                counts.push(packets);
            }
        }
        (
            counts.first().copied().unwrap_or(0),
            counts.get(1).copied().unwrap_or(0),
        )
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["link", "del", &pod.host_if])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.wire.node_if])
            .output();
    }
}
