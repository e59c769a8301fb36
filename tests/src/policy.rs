//! Network policy on the pod network fixture, enforced the way Calico's
//! iptables/nftables dataplane enforces it: on the host side of each pod's
//! veth (`cali*`), in the node's network namespace.
//!
//! The model (Calico docs, "Configure Felix": `DefaultEndpointToHostAction`;
//! Felix's `cali-from-wl-dispatch` / `cali-fw-<iface>` chains):
//! - packets a workload sends enter the node through its `cali*` interface
//!   and go through that endpoint's egress policy, both when they are
//!   forwarded (hook `forward`) and when they are addressed to the host
//!   itself (hook `input`), where the agent listens;
//! - return traffic of established connections passes
//!   (`ct state established,related`);
//! - rules run in order, the first `Allow` accepts, the first `Deny` drops,
//!   `Pass` leaves the tier; a workload that some egress policy selects and
//!   that nothing allowed is dropped (default deny);
//! - after egress policy, traffic to the host gets `DefaultEndpointToHostAction`;
//!   this model uses `Accept`, what the Calico operator and manifests set.
//!
//! The shipped policies (`manifests/policies/*.yaml`) are translated into
//! these rules as they are written, with the node subnet in them replaced by
//! the fixture's.

use std::{fs, path::Path, process::Command};

use serde::Deserialize;
use serde_yaml::Value;

use crate::privileged::run_ok;

/// The node subnet the shipped files name (AKS managed VNet).
pub const SHIPPED_NODE_SUBNET: &str = "10.224.0.0/16";
/// The fixture's node subnet (its node IP is 10.240.0.4).
pub const FIXTURE_NODE_SUBNET: &str = "10.240.0.0/16";

const TABLE: &str = "podid_policy";

/// One egress rule, as nft text ("accept", "drop") or `None` for `Pass`.
fn rule_to_nft(matches: &[String], verdict: &str) -> String {
    format!("{} {verdict}", matches.join(" "))
}

fn nets(destination: &Value) -> Vec<String> {
    destination["nets"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str())
        .map(|n| n.replace(SHIPPED_NODE_SUBNET, FIXTURE_NODE_SUBNET))
        .collect()
}

fn ports(values: Option<&Vec<Value>>) -> Vec<String> {
    values
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64().or_else(|| p["port"].as_u64()))
        .map(|p| p.to_string())
        .collect()
}

fn set(items: &[String]) -> String {
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

/// The nft rules of one policy document's egress section, in order. A
/// `Pass` ends the document's rules.
pub fn egress_rules(document: &Value) -> Vec<String> {
    let kind = document["kind"].as_str().unwrap_or_default();
    let mut rules = Vec::new();
    match kind {
        "NetworkPolicy" if document["apiVersion"].as_str() == Some("networking.k8s.io/v1") => {
            for rule in document["spec"]["egress"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                let mut matches = Vec::new();
                let cidrs: Vec<String> = rule["to"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["ipBlock"]["cidr"].as_str())
                    .map(|c| c.replace(SHIPPED_NODE_SUBNET, FIXTURE_NODE_SUBNET))
                    .collect();
                if !cidrs.is_empty() {
                    matches.push(format!("ip daddr {}", set(&cidrs)));
                }
                let tcp_ports = ports(rule["ports"].as_sequence());
                if !tcp_ports.is_empty() {
                    matches.push(format!("tcp dport {}", set(&tcp_ports)));
                }
                rules.push(rule_to_nft(&matches, "accept"));
            }
        }
        "NetworkPolicy" | "GlobalNetworkPolicy" => {
            for rule in document["spec"]["egress"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                let action = rule["action"].as_str().unwrap_or_default();
                if action == "Pass" {
                    break;
                }
                let mut matches = Vec::new();
                let destination = &rule["destination"];
                let nets = nets(destination);
                if !nets.is_empty() {
                    matches.push(format!("ip daddr {}", set(&nets)));
                }
                let tcp_ports = ports(destination["ports"].as_sequence());
                match rule["protocol"].as_str() {
                    Some("TCP") if !tcp_ports.is_empty() => {
                        matches.push(format!("tcp dport {}", set(&tcp_ports)))
                    }
                    Some("TCP") => matches.push("meta l4proto tcp".into()),
                    _ => {}
                }
                let verdict = if action == "Allow" { "accept" } else { "drop" };
                rules.push(rule_to_nft(&matches, verdict));
            }
        }
        _ => {}
    }
    rules
}

/// The egress rules of every policy in a shipped file, in file order.
pub fn shipped_rules(file: &Path) -> Vec<String> {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
        .flat_map(|doc| egress_rules(&doc))
        .collect()
}

/// Egress policy on pods' veths, in the node's network namespace (the
/// calling thread's). Removed with the namespace.
pub struct EgressPolicy;

impl EgressPolicy {
    /// Puts `host_if` (a pod's `cali*` interface) under default-deny egress,
    /// with `allow` (nft rules, in order) before the final drop.
    pub fn apply(host_if: &str, allow: &[String]) {
        let chain = format!("fw-{host_if}");
        let mut script = format!(
            "add table inet {TABLE}\n\
             add chain inet {TABLE} forward {{ type filter hook forward priority 0; policy accept; }}\n\
             add chain inet {TABLE} input {{ type filter hook input priority 0; policy accept; }}\n\
             add chain inet {TABLE} {chain}\n\
             flush chain inet {TABLE} {chain}\n\
             add rule inet {TABLE} {chain} ct state established,related accept\n"
        );
        for rule in allow {
            script.push_str(&format!("add rule inet {TABLE} {chain} {rule}\n"));
        }
        script.push_str(&format!("add rule inet {TABLE} {chain} counter drop\n"));
        // Dispatch once per interface, on both hooks (the chain may be new).
        let listed = Command::new("nft")
            .args(["list", "chain", "inet", TABLE, "input"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if !listed.contains(&format!("\"{host_if}\"")) {
            for hook in ["forward", "input"] {
                script.push_str(&format!(
                    "add rule inet {TABLE} {hook} iifname \"{host_if}\" jump {chain}\n"
                ));
            }
        }
        run_ok(Command::new("nft").arg(script));
    }

    /// Packets the default-deny dropped for `host_if`.
    pub fn dropped(host_if: &str) -> u64 {
        let out = run_ok(Command::new("nft").args([
            "-j",
            "list",
            "chain",
            "inet",
            TABLE,
            &format!("fw-{host_if}"),
        ]));
        let parsed: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        parsed["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("rule"))
            .filter_map(|rule| {
                rule["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|e| e["counter"]["packets"].as_u64())
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path)
    }

    #[test]
    fn the_shipped_policies_translate_into_an_allow_for_the_agent_and_nothing_for_imds() {
        let calico = shipped_rules(&repo("manifests/policies/calico-networkpolicy.yaml"));
        assert_eq!(
            calico,
            [
                "ip daddr 10.240.0.0/16 tcp dport 2579 accept",
                "ip daddr 169.254.169.254/32 drop",
            ]
        );
        let kubernetes = shipped_rules(&repo("manifests/policies/kubernetes-networkpolicy.yaml"));
        assert_eq!(kubernetes, ["ip daddr 10.240.0.0/16 tcp dport 2579 accept"]);
        let global = shipped_rules(&repo("manifests/policies/calico-globalnetworkpolicy.yaml"));
        assert_eq!(
            global,
            [
                "ip daddr 10.240.0.0/16 tcp dport 2579 accept",
                "ip daddr 169.254.169.254/32 drop",
            ]
        );
        for rules in [&calico, &kubernetes, &global] {
            assert!(
                !rules
                    .iter()
                    .any(|r| r.contains("169.254.169.254") && r.ends_with("accept")),
                "no policy allows IMDS itself: {rules:?}"
            );
        }
    }
}
