//! Masquerading of pod egress: traffic from the cluster's pods to
//! anywhere outside the cluster leaves with the node's address (the
//! outside has no route back to pod addresses), while traffic to pods
//! and to nodes keeps the pod's own address, as the Kubernetes network
//! model requires. One nftables table of wharf's own, rewritten whole in
//! one transaction whenever the set of nodes changes.

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::host::{ExecError, Host};

/// The table; no proxy mode's (`wharf`, `wharf-ipvs`), so switching
/// modes leaves it alone.
pub const TABLE: &str = "wharf-egress";

/// The nft script that replaces the table: pods' traffic to anything but
/// the cluster CIDR and the nodes' addresses is masqueraded.
pub fn render(cluster_cidr: &str, nodes: &BTreeSet<Ipv4Addr>) -> String {
    let mut kept = vec![cluster_cidr.to_string()];
    kept.extend(nodes.iter().map(Ipv4Addr::to_string));
    format!(
        "table ip {TABLE} {{}}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tset unmasqueraded {{\n\
         \t\ttype ipv4_addr; flags interval; auto-merge\n\
         \t\telements = {{ {} }}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cluster_cidr} ip daddr != @unmasqueraded masquerade\n\
         \t}}\n\
         }}\n",
        kept.join(", ")
    )
}

/// Writes the table for these nodes.
pub fn program(
    host: &impl Host,
    cluster_cidr: &str,
    nodes: &BTreeSet<Ipv4Addr>,
) -> Result<(), ExecError> {
    host.run("nft", &["-f", "-"], Some(&render(cluster_cidr, nodes)))
        .map(drop)
}

/// Removes the table if it is there (`--teardown`); true if it was.
pub fn remove(host: &impl Host) -> Result<bool, ExecError> {
    let tables = host.run("nft", &["list", "tables", "ip"], None)?;
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table ip {TABLE}"))
    {
        return Ok(false);
    }
    host.run("nft", &["delete", "table", "ip", TABLE], None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_keep_their_address_towards_pods_and_nodes() {
        let nodes = [
            Ipv4Addr::new(192, 168, 90, 2),
            Ipv4Addr::new(192, 168, 90, 1),
        ]
        .into_iter()
        .collect();
        let script = render("10.244.0.0/16", &nodes);
        assert!(
            script.contains("elements = { 10.244.0.0/16, 192.168.90.1, 192.168.90.2 }"),
            "{script}"
        );
        assert!(script.contains("ip saddr 10.244.0.0/16 ip daddr != @unmasqueraded masquerade"));
        assert!(
            script.starts_with("table ip wharf-egress {}\ndelete table ip wharf-egress\n"),
            "replaced whole, in one transaction"
        );
    }
}
