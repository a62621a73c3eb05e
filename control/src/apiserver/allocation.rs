//! ClusterIP and NodePort allocation for Services.
//!
//! Each allocated IP or port is a key in the store (`/wharf/claims/...`)
//! written in the same transaction as the Service, with a check that it is
//! absent. Two concurrent creates can therefore never get the same IP or
//! port, a failed create holds nothing, and deleting the Service releases
//! its claims in the deleting transaction. (Upstream's newer allocator
//! keeps one IPAddress object per IP for the same reason.)

use std::{collections::HashSet, net::Ipv4Addr, ops::RangeInclusive};

use rand::Rng as _;
use serde_json::{Value, json};

use super::status::Cause;

const IP_CLAIMS: &str = "/wharf/claims/serviceips/";
const PORT_CLAIMS: &str = "/wharf/claims/servicenodeports/";

/// The ranges Services draw from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRanges {
    base: u32,
    size: u32,
    node_ports: RangeInclusive<u16>,
}

/// Why a range flag is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error(
        "service CIDR {0:?}: expected an IPv4 network like 10.96.0.0/12 with at least 8 addresses"
    )]
    Cidr(String),
    #[error("node port range {0:?}: expected FIRST-LAST, like 30000-32767")]
    Ports(String),
}

/// One IP or port a Service holds; `requested` when the user named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub requested: bool,
    pub field: String,
    value: Value,
}

impl Claim {
    /// The Invalid error for a requested value someone else holds.
    pub fn taken(&self) -> Cause {
        let what = if self.key.starts_with(IP_CLAIMS) {
            "IP"
        } else {
            "port"
        };
        Cause::invalid(
            self.field.clone(),
            &self.value,
            format!("provided {what} is already allocated"),
        )
    }
}

/// What a Service write must claim and may release.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub claims: Vec<Claim>,
    pub releases: Vec<String>,
}

fn ip_key(ip: Ipv4Addr) -> String {
    format!("{IP_CLAIMS}{ip}")
}

fn port_key(port: i64) -> String {
    format!("{PORT_CLAIMS}{port}")
}

/// The claim keys a stored Service holds.
pub fn held(service: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = service["spec"]["clusterIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
    {
        keys.push(ip_key(ip));
    }
    for port in service["spec"]["ports"].as_array().into_iter().flatten() {
        if let Some(node_port) = port["nodePort"].as_i64().filter(|p| *p != 0) {
            keys.push(port_key(node_port));
        }
    }
    keys
}

impl ServiceRanges {
    pub fn parse(cidr: &str, node_ports: &str) -> Result<Self, RangeError> {
        let bad_cidr = || RangeError::Cidr(cidr.to_owned());
        let (address, prefix) = cidr.split_once('/').ok_or_else(bad_cidr)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad_cidr())?;
        let prefix: u32 = prefix.parse().map_err(|_| bad_cidr())?;
        if !(1..=29).contains(&prefix) {
            return Err(bad_cidr());
        }
        let size = 1_u32 << (32 - prefix);
        let base = u32::from(address) & !(size - 1);
        let bad_ports = || RangeError::Ports(node_ports.to_owned());
        let (first, last) = node_ports.split_once('-').ok_or_else(bad_ports)?;
        let first: u16 = first.trim().parse().map_err(|_| bad_ports())?;
        let last: u16 = last.trim().parse().map_err(|_| bad_ports())?;
        if first == 0 || first > last {
            return Err(bad_ports());
        }
        Ok(Self {
            base,
            size,
            node_ports: first..=last,
        })
    }

    /// The first usable IP: upstream gives it to the `kubernetes` Service.
    pub fn first_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        // Network and broadcast addresses are never handed out.
        ip > self.base && ip < self.base + self.size - 1
    }

    /// A random free IP (the first IP is reserved), avoiding `taken`.
    fn pick_ip(&self, taken: &HashSet<String>) -> Option<Ipv4Addr> {
        let usable = self.size - 3;
        let start = rand::rng().random_range(0..usable);
        (0..usable)
            .map(|i| Ipv4Addr::from(self.base + 2 + (start + i) % usable))
            .find(|ip| !taken.contains(&ip_key(*ip)))
    }

    fn pick_port(&self, taken: &HashSet<String>, chosen: &[i64]) -> Option<i64> {
        let first = i64::from(*self.node_ports.start());
        let count = i64::from(*self.node_ports.end()) - first + 1;
        let start = rand::rng().random_range(0..count);
        (0..count)
            .map(|i| first + (start + i) % count)
            .find(|port| !taken.contains(&port_key(*port)) && !chosen.contains(port))
    }

    /// Fills in and checks `next`'s ClusterIP and node ports (keeping
    /// `previous`'s on update) and returns what the write must claim and
    /// release. `taken` holds keys known to be claimed by others.
    pub fn plan(
        &self,
        previous: Option<&Value>,
        next: &mut Value,
        taken: &HashSet<String>,
    ) -> Result<Plan, Vec<Cause>> {
        let mut causes = Vec::new();
        let mut claims = Vec::new();
        let kind = next["spec"]["type"]
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        let old_ip = previous
            .and_then(|p| p["spec"]["clusterIP"].as_str())
            .filter(|ip| !ip.is_empty());
        let asked = next["spec"]["clusterIP"]
            .as_str()
            .filter(|ip| !ip.is_empty())
            .map(str::to_owned);
        let ip = match (kind.as_str(), old_ip, asked.as_deref()) {
            ("ExternalName", _, _) => None,
            (_, Some(old), Some(new)) if old != new => {
                causes.push(Cause::invalid(
                    "spec.clusterIPs[0]",
                    &json!(new),
                    "may not change once set",
                ));
                None
            }
            (_, Some(old), _) => Some(old.to_owned()),
            (_, None, Some("None")) => Some("None".to_owned()),
            (_, None, Some(requested)) => match requested.parse::<Ipv4Addr>() {
                Ok(ip) if self.contains(ip) => {
                    claims.push(Claim {
                        key: ip_key(ip),
                        requested: true,
                        field: "spec.clusterIPs[0]".to_owned(),
                        value: json!(requested),
                    });
                    Some(requested.to_owned())
                }
                _ => {
                    causes.push(Cause::invalid(
                        "spec.clusterIPs[0]",
                        &json!(requested),
                        "provided IP is not in the valid range. The range of valid IPs is the service CIDR",
                    ));
                    None
                }
            },
            (_, None, None) => match self.pick_ip(taken) {
                Some(ip) => {
                    claims.push(Claim {
                        key: ip_key(ip),
                        requested: false,
                        field: "spec.clusterIPs[0]".to_owned(),
                        value: json!(ip.to_string()),
                    });
                    Some(ip.to_string())
                }
                None => {
                    causes.push(Cause::invalid(
                        "spec.clusterIPs[0]",
                        &json!(""),
                        "range is full",
                    ));
                    None
                }
            },
        };
        match &ip {
            Some(ip) => {
                next["spec"]["clusterIP"] = json!(ip);
                next["spec"]["clusterIPs"] = json!([ip]);
            }
            None => {
                if let Some(spec) = next["spec"].as_object_mut() {
                    spec.remove("clusterIP");
                    spec.remove("clusterIPs");
                }
            }
        }
        let wants_node_ports = matches!(kind.as_str(), "NodePort" | "LoadBalancer");
        let old_ports: Vec<(i64, String, i64)> = previous
            .and_then(|p| p["spec"]["ports"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["port"].as_i64()?,
                    p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                    p["nodePort"].as_i64()?,
                ))
            })
            .collect();
        let held_before: HashSet<String> =
            previous.map(held).unwrap_or_default().into_iter().collect();
        let mut chosen = Vec::new();
        if let Some(ports) = next["spec"]["ports"].as_array_mut() {
            for (i, port) in ports.iter_mut().enumerate() {
                let field = format!("spec.ports[{i}].nodePort");
                if !wants_node_ports {
                    if let Some(map) = port.as_object_mut() {
                        map.remove("nodePort");
                    }
                    continue;
                }
                let protocol = port["protocol"].as_str().unwrap_or("TCP").to_owned();
                let number = port["port"].as_i64().unwrap_or_default();
                let node_port = match port["nodePort"].as_i64().filter(|p| *p != 0) {
                    Some(requested) => {
                        let in_range =
                            u16::try_from(requested).is_ok_and(|p| self.node_ports.contains(&p));
                        if !in_range {
                            causes.push(Cause::invalid(
                                field,
                                &json!(requested),
                                format!(
                                    "provided port is not in the valid range. The range of valid ports is {}-{}",
                                    self.node_ports.start(),
                                    self.node_ports.end()
                                ),
                            ));
                            continue;
                        }
                        if !held_before.contains(&port_key(requested))
                            && !chosen.contains(&requested)
                        {
                            claims.push(Claim {
                                key: port_key(requested),
                                requested: true,
                                field,
                                value: json!(requested),
                            });
                        }
                        requested
                    }
                    None => match old_ports
                        .iter()
                        .find(|(p, proto, _)| *p == number && *proto == protocol)
                    {
                        Some((_, _, kept)) => *kept,
                        None => match self.pick_port(taken, &chosen) {
                            Some(picked) => {
                                claims.push(Claim {
                                    key: port_key(picked),
                                    requested: false,
                                    field,
                                    value: json!(picked),
                                });
                                picked
                            }
                            None => {
                                causes.push(Cause::invalid(field, &json!(0), "range is full"));
                                continue;
                            }
                        },
                    },
                };
                chosen.push(node_port);
                port["nodePort"] = json!(node_port);
            }
        }
        if !causes.is_empty() {
            return Err(causes);
        }
        let keep: HashSet<String> = held(next).into_iter().collect();
        let releases = held_before
            .into_iter()
            .filter(|key| !keep.contains(key))
            .collect();
        // An update keeps what it already holds: claim only what is new.
        claims.retain(|claim| !previous.is_some_and(|p| held(p).contains(&claim.key)));
        Ok(Plan { claims, releases })
    }
}

/// The prefixes holding every claim, for reading what is taken.
pub const CLAIM_PREFIXES: [&str; 2] = [IP_CLAIMS, PORT_CLAIMS];

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges() -> ServiceRanges {
        ServiceRanges::parse("10.96.0.0/28", "30000-30002").unwrap()
    }

    fn service(kind: &str, ip: Option<&str>, node_port: Option<i64>) -> Value {
        let mut port = json!({"port": 80, "protocol": "TCP"});
        if let Some(node_port) = node_port {
            port["nodePort"] = json!(node_port);
        }
        let mut service = json!({"spec": {"type": kind, "ports": [port]}});
        if let Some(ip) = ip {
            service["spec"]["clusterIP"] = json!(ip);
        }
        service
    }

    #[test]
    fn ranges_parse_and_reserve_the_first_ip() {
        let ranges = ServiceRanges::parse("10.96.0.0/12", "30000-32767").unwrap();
        assert_eq!(ranges.first_ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(ServiceRanges::parse("10.96.0.0", "30000-32767").is_err());
        assert!(ServiceRanges::parse("10.96.0.0/12", "32767-30000").is_err());
    }

    #[test]
    fn random_picks_avoid_taken_and_reserved_addresses() {
        let ranges = ranges();
        let mut taken = HashSet::new();
        for _ in 0..13 {
            let mut next = service("ClusterIP", None, None);
            let plan = ranges.plan(None, &mut next, &taken).unwrap();
            let key = plan.claims[0].key.clone();
            assert!(!taken.contains(&key));
            assert_ne!(key, ip_key(ranges.first_ip()));
            taken.insert(key);
        }
        let mut next = service("ClusterIP", None, None);
        assert!(
            ranges.plan(None, &mut next, &taken).is_err(),
            "a /28 has 13 assignable IPs"
        );
    }

    #[test]
    fn requested_values_are_checked_against_the_ranges() {
        let ranges = ranges();
        let mut outside = service("NodePort", Some("10.97.0.1"), Some(40000));
        let causes = ranges
            .plan(None, &mut outside, &HashSet::new())
            .unwrap_err();
        assert_eq!(causes.len(), 2);
        let mut inside = service("NodePort", Some("10.96.0.5"), Some(30001));
        let plan = ranges.plan(None, &mut inside, &HashSet::new()).unwrap();
        assert!(plan.claims.iter().all(|c| c.requested));
        assert_eq!(inside["spec"]["clusterIPs"], json!(["10.96.0.5"]));
    }

    #[test]
    fn updates_keep_ips_and_release_node_ports_they_drop() {
        let ranges = ranges();
        let mut created = service("NodePort", None, None);
        ranges.plan(None, &mut created, &HashSet::new()).unwrap();
        let node_port = created["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
        let mut same = service("NodePort", None, None);
        let plan = ranges
            .plan(Some(&created), &mut same, &HashSet::new())
            .unwrap();
        assert_eq!(plan, Plan::default());
        assert_eq!(same["spec"]["clusterIP"], created["spec"]["clusterIP"]);
        assert_eq!(same["spec"]["ports"][0]["nodePort"], node_port);
        let mut demoted = service("ClusterIP", None, None);
        let plan = ranges
            .plan(Some(&created), &mut demoted, &HashSet::new())
            .unwrap();
        assert_eq!(plan.releases, [port_key(node_port)]);
        // Any other address than the allocated one (random) is a move.
        let other = if created["spec"]["clusterIP"] == "10.96.0.9" {
            "10.96.0.8"
        } else {
            "10.96.0.9"
        };
        let mut moved = service("ClusterIP", Some(other), None);
        assert!(
            ranges
                .plan(Some(&created), &mut moved, &HashSet::new())
                .is_err()
        );
    }
}
