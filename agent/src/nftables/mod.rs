//! The nftables proxy mode: one wharf-owned table (see `render`) with
//! verdict maps for O(1) dispatch, programmed by `nft -f` transactions.
//! The first sync (and every resync) rewrites the table's skeleton and
//! every frontend and deletes what it did not write; later syncs touch
//! only the changed frontends' chains and map elements (their cost still
//! grows slowly with the table: nft reads it back to check a transaction,
//! 28 ms at 1k services, 146 ms at 10k).

mod render;

use std::collections::BTreeSet;

use serde_json::Value;
use tracing::info;

use crate::{
    conntrack::ConntrackError,
    host::{ExecError, Host, System},
    proxy::{
        Changes, DesiredState, Forwarding, FrontendKey, Programmed, Protocol, ServiceProxy,
        StaleFlows, SyncStats, commit,
    },
};
use render::{
    AFFINITY_SET, ENDPOINT_CHAIN, Object, Plan, SERVICE_CHAIN, TABLE, hairpins, objects_of,
};

#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error(transparent)]
    Tool(ExecError),
    #[error("nft printed JSON that does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
}

#[derive(Debug)]
pub struct NftablesProxy<H: Host = System> {
    host: H,
    programmed: Programmed,
    /// Trust nothing about the table: rewrite all of it next time.
    full: bool,
    /// UDP flows still to forget (a failed attempt is retried).
    stale: StaleFlows,
}

impl<H: Host> NftablesProxy<H> {
    pub fn new(host: H) -> Self {
        Self {
            host,
            programmed: Programmed::new(),
            full: true,
            stale: StaleFlows::default(),
        }
    }

    fn nft(&self, args: &[&str], script: Option<&str>) -> Result<String, NftablesError> {
        self.host
            .run("nft", args, script)
            .map_err(NftablesError::Tool)
    }

    /// The per-frontend objects the table holds now.
    fn existing_objects(&self) -> Result<BTreeSet<Object>, NftablesError> {
        if !table_exists(&self.host)? {
            return Ok(BTreeSet::new());
        }
        let mut objects = BTreeSet::new();
        for (what, prefixes) in [
            ("chains", &[SERVICE_CHAIN, ENDPOINT_CHAIN][..]),
            ("sets", &[AFFINITY_SET][..]),
        ] {
            let listing: Value =
                serde_json::from_str(&self.nft(&["-j", "list", what, "ip"], None)?)?;
            for (kind, object) in entries(&listing) {
                if object["table"] != TABLE {
                    continue;
                }
                let Some(name) = object["name"].as_str() else {
                    continue;
                };
                if !prefixes.iter().any(|p| name.starts_with(p)) {
                    continue;
                }
                objects.insert(match kind {
                    "chain" => Object::Chain(name.to_string()),
                    _ => Object::Set(name.to_string()),
                });
            }
        }
        Ok(objects)
    }
}

/// The `{kind: object}` entries of an `nft -j` listing.
fn entries(listing: &Value) -> impl Iterator<Item = (&str, &Value)> {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.as_object()?.iter().next())
        .map(|(kind, object)| (kind.as_str(), object))
}

fn table_exists(host: &impl Host) -> Result<bool, NftablesError> {
    let listing: Value = serde_json::from_str(
        &host
            .run("nft", &["-j", "list", "tables", "ip"], None)
            .map_err(NftablesError::Tool)?,
    )?;
    Ok(entries(&listing).any(|(kind, object)| kind == "table" && object["name"] == TABLE))
}

impl<H: Host> ServiceProxy for NftablesProxy<H> {
    type Error = NftablesError;

    fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, NftablesError> {
        let changes = Changes::between(&self.programmed, desired);
        let mut stats = SyncStats::default();
        if self.full || !changes.is_empty() {
            let (rewrite, delete, existing): (
                BTreeSet<FrontendKey>,
                BTreeSet<Object>,
                BTreeSet<Object>,
            ) = if self.full {
                let wanted: BTreeSet<Object> = desired
                    .frontends
                    .iter()
                    .flat_map(|(key, frontend)| objects_of(key, frontend))
                    .collect();
                let existing = self.existing_objects()?;
                let delete = existing
                    .iter()
                    .filter(|o| !wanted.contains(o))
                    .cloned()
                    .collect();
                (
                    desired.frontends.keys().copied().collect(),
                    delete,
                    existing,
                )
            } else {
                let mut delete = BTreeSet::new();
                let mut existing = BTreeSet::new();
                for key in changes.removed.iter().chain(&changes.changed) {
                    let Some(old) = self.programmed.get(key) else {
                        continue;
                    };
                    let new = desired
                        .frontends
                        .get(key)
                        .map(|f| objects_of(key, f))
                        .unwrap_or_default();
                    let old = objects_of(key, old);
                    delete.extend(old.difference(&new).cloned());
                    existing.extend(old);
                }
                (changes.changed.clone(), delete, existing)
            };
            let wanted_hairpins = hairpins(desired.frontends.values());
            let (hairpin_add, hairpin_remove) = if self.full {
                (wanted_hairpins, BTreeSet::new())
            } else {
                let had = hairpins(self.programmed.values());
                (
                    wanted_hairpins.difference(&had).copied().collect(),
                    had.difference(&wanted_hairpins).copied().collect(),
                )
            };
            let (script, statements) = Plan {
                desired,
                previous: &self.programmed,
                rewrite: &rewrite,
                remove: &changes.removed,
                delete: &delete,
                existing: &existing,
                hairpin_add: &hairpin_add,
                hairpin_remove: &hairpin_remove,
                full: self.full,
            }
            .render();
            let was_full = std::mem::replace(&mut self.full, true);
            self.nft(&["-f", "-"], Some(&script))?;
            self.full = false;
            if was_full {
                info!(
                    statements,
                    objects_deleted = delete.len(),
                    "nftables table written in full"
                );
            }
            stats.map_operations = statements;
            commit(
                &mut self.programmed,
                &mut self.stale,
                &changes,
                desired,
                &mut stats,
            );
        }
        stats.flows_purged = self.stale.forget(&self.host);
        Ok(stats)
    }

    fn resync(&mut self, desired: &DesiredState) -> Result<SyncStats, NftablesError> {
        self.full = true;
        self.sync(desired)
    }

    fn dump(&self) -> Result<Forwarding, NftablesError> {
        if !table_exists(&self.host)? {
            return Ok(Forwarding::new());
        }
        let listing: Value =
            serde_json::from_str(&self.nft(&["-j", "list", "table", "ip", TABLE], None)?)?;
        Ok(forwarding(&listing))
    }

    fn flush(&mut self) -> Result<(), NftablesError> {
        remove(&self.host)?;
        self.programmed.clear();
        self.full = true;
        Ok(())
    }
}

/// What a table listing forwards: each map element's frontend to the DNAT
/// targets its service chain holds (directly, or in the endpoint chains it
/// jumps to); the reject maps' frontends to nothing.
fn forwarding(listing: &Value) -> Forwarding {
    let mut rules: std::collections::HashMap<&str, Vec<&Value>> = Default::default();
    let mut maps = Vec::new();
    for (kind, object) in entries(listing) {
        match kind {
            "rule" => {
                if let Some(chain) = object["chain"].as_str() {
                    rules.entry(chain).or_default().push(&object["expr"]);
                }
            }
            "map" => maps.push(object),
            _ => {}
        }
    }
    let mut forwarding = Forwarding::new();
    for map in maps {
        let name = map["name"].as_str().unwrap_or_default();
        let node_port = name.ends_with("nodeports");
        let dispatch = name.starts_with("service-");
        for element in map["elem"].as_array().into_iter().flatten() {
            let Some(key) = element_key(&element[0], node_port) else {
                continue;
            };
            let mut backends = BTreeSet::new();
            if dispatch {
                let mut chains = Vec::new();
                targets(&element[1], &mut chains);
                for chain in chains {
                    for rule in rules.get(chain.as_str()).into_iter().flatten() {
                        dnat_targets(rule, &mut backends);
                        let mut endpoints = Vec::new();
                        targets(rule, &mut endpoints);
                        for endpoint in endpoints.iter().filter(|e| e.starts_with(ENDPOINT_CHAIN)) {
                            for rule in rules.get(endpoint.as_str()).into_iter().flatten() {
                                dnat_targets(rule, &mut backends);
                            }
                        }
                    }
                }
            }
            forwarding.insert(key, backends);
        }
    }
    forwarding
}

/// A map element's key: `address . proto . port`, or `proto . port`.
fn element_key(key: &Value, node_port: bool) -> Option<FrontendKey> {
    let parts = key["concat"].as_array()?;
    let (address, rest) = if node_port {
        (std::net::Ipv4Addr::UNSPECIFIED, &parts[..])
    } else {
        (parts.first()?.as_str()?.parse().ok()?, parts.get(1..)?)
    };
    let protocol = match rest.first()?.as_str()? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some(FrontendKey {
        address,
        port: u16::try_from(rest.get(1)?.as_u64()?).ok()?,
        protocol,
    })
}

/// Every `goto`/`jump` target anywhere in `value`.
fn targets(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, inner) in object {
                if matches!(key.as_str(), "goto" | "jump")
                    && let Some(target) = inner["target"].as_str()
                {
                    out.push(target.to_string());
                } else {
                    targets(inner, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| targets(i, out)),
        _ => {}
    }
}

/// Every `dnat to address:port` in a rule.
fn dnat_targets(value: &Value, out: &mut BTreeSet<std::net::SocketAddrV4>) {
    for expression in value.as_array().into_iter().flatten() {
        let dnat = &expression["dnat"];
        if let (Some(address), Some(port)) = (dnat["addr"].as_str(), dnat["port"].as_u64())
            && let (Ok(address), Ok(port)) = (address.parse(), u16::try_from(port))
        {
            out.insert(std::net::SocketAddrV4::new(address, port));
        }
    }
}

/// Deletes wharf's table (another mode's leftovers, or this mode's on
/// flush); returns whether there was one.
pub fn remove(host: &impl Host) -> Result<bool, NftablesError> {
    if !table_exists(host)? {
        return Ok(false);
    }
    host.run("nft", &["delete", "table", "ip", TABLE], None)
        .map_err(NftablesError::Tool)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from `nft -j list table ip wharf` (nft 1.0.6).
    const LISTING: &str = r#"{"nftables": [
      {"map": {"family": "ip", "name": "service-ips", "table": "wharf", "map": "verdict",
        "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc-10.96.0.10-tcp-80"}}]]}},
      {"map": {"family": "ip", "name": "no-endpoint-nodeports", "table": "wharf", "map": "verdict",
        "elem": [[{"concat": ["udp", 30053]}, {"goto": {"target": "reject-chain"}}]]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "svc-10.96.0.10-tcp-80", "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@aff-30-x"}},
        {"goto": {"target": "ep-10.96.0.10-tcp-80-10.244.0.11-8080"}}]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "svc-10.96.0.10-tcp-80", "expr": [
        {"match": {"op": "==", "left": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "right": 0}},
        {"goto": {"target": "ep-10.96.0.10-tcp-80-10.244.0.11-8080"}}]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "svc-10.96.0.10-tcp-80", "expr": [
        {"goto": {"target": "ep-10.96.0.10-tcp-80-10.244.0.12-8080"}}]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "ep-10.96.0.10-tcp-80-10.244.0.11-8080", "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.244.0.11"}},
        {"jump": {"target": "mark-for-masquerade"}}]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "ep-10.96.0.10-tcp-80-10.244.0.11-8080", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"dnat": {"addr": "10.244.0.11", "port": 8080}}]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "ep-10.96.0.10-tcp-80-10.244.0.12-8080", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"dnat": {"addr": "10.244.0.12", "port": 8080}}]}},
      {"map": {"family": "ip", "name": "service-ips", "table": "wharf", "map": "verdict",
        "elem": [[{"concat": ["10.96.0.11", "tcp", 80]}, {"goto": {"target": "svc-10.96.0.11-tcp-80"}}]]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "svc-10.96.0.11-tcp-80", "expr": [
        {"match": {"op": "==", "left": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "right": 0}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"dnat": {"family": "ip", "addr": "10.244.0.13", "port": 8080}}]}},
      {"rule": {"family": "ip", "table": "wharf", "chain": "svc-10.96.0.11-tcp-80", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"dnat": {"family": "ip", "addr": "10.244.0.14", "port": 8080}}]}}
    ]}"#;

    #[test]
    fn a_listing_reads_back_as_forwarding() {
        let listing: Value = serde_json::from_str(LISTING).unwrap();
        let forwarding = forwarding(&listing);
        let vip = FrontendKey {
            address: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let node_port = FrontendKey {
            address: std::net::Ipv4Addr::UNSPECIFIED,
            port: 30053,
            protocol: Protocol::Udp,
        };
        let backends: BTreeSet<_> = ["10.244.0.11:8080", "10.244.0.12:8080"]
            .iter()
            .map(|b| b.parse().unwrap())
            .collect();
        let direct = FrontendKey {
            address: "10.96.0.11".parse().unwrap(),
            ..vip
        };
        let direct_backends: BTreeSet<_> = ["10.244.0.13:8080", "10.244.0.14:8080"]
            .iter()
            .map(|b| b.parse().unwrap())
            .collect();
        assert_eq!(
            forwarding,
            Forwarding::from([
                (vip, backends),
                (direct, direct_backends),
                (node_port, BTreeSet::new())
            ])
        );
    }
}
