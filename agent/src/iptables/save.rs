//! Reading `iptables-save` output back: which wharf chains and jumps
//! exist (for full syncs and cleanup), and what the rules forward (for
//! `dump`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use super::render::{Jump, NO_ENDPOINTS, NODEPORTS, PREFIX, SERVICES};
use crate::proxy::{Forwarding, FrontendKey, Protocol};

/// Rules as argument lists, by table and chain.
#[derive(Debug, Default)]
pub struct Saved {
    tables: BTreeMap<String, BTreeMap<String, Vec<Vec<String>>>>,
}

impl Saved {
    pub fn parse(text: &str) -> Self {
        let mut saved = Saved::default();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = name.to_string();
                saved.tables.entry(table.clone()).or_default();
            } else if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split(' ').next().unwrap_or_default();
                saved
                    .tables
                    .entry(table.clone())
                    .or_default()
                    .entry(chain.to_string())
                    .or_default();
            } else if line.starts_with("-A ") {
                let mut words = split(line).into_iter().skip(1);
                let Some(chain) = words.next() else { continue };
                saved
                    .tables
                    .entry(table.clone())
                    .or_default()
                    .entry(chain)
                    .or_default()
                    .push(words.collect());
            }
        }
        saved
    }

    fn rules(&self, table: &str, chain: &str) -> &[Vec<String>] {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .map_or(&[], Vec::as_slice)
    }

    /// wharf's chains in `table`.
    pub fn wharf_chains(&self, table: &str) -> BTreeSet<String> {
        self.tables
            .get(table)
            .into_iter()
            .flat_map(|t| t.keys())
            .filter(|c| c.starts_with(PREFIX))
            .cloned()
            .collect()
    }

    pub fn has_jump(&self, jump: &Jump) -> bool {
        self.rules(jump.table, jump.chain)
            .iter()
            .any(|rule| value(rule, "-j") == Some(jump.target))
    }

    /// Number of rules other owners wrote: wharf's own chains and the
    /// jumps into them do not count (detection must follow the node, not
    /// wharf's earlier choice).
    pub fn foreign_rule_count(&self) -> usize {
        self.tables
            .values()
            .flat_map(|t| t.iter())
            .filter(|(chain, _)| !chain.starts_with(PREFIX))
            .flat_map(|(_, rules)| rules)
            .filter(|rule| !value(rule, "-j").is_some_and(|t| t.starts_with(PREFIX)))
            .count()
    }

    /// What the rules forward: each dispatched frontend to the DNAT
    /// targets its chains reach, and each rejected one to nothing.
    pub fn forwarding(&self) -> Forwarding {
        let mut forwarding = Forwarding::new();
        for (chain, unspecified) in [(SERVICES, false), (NODEPORTS, true)] {
            for rule in self.rules("nat", chain) {
                let (Some(key), Some(target)) = (frontend(rule, unspecified), value(rule, "-j"))
                else {
                    continue;
                };
                let backends = self
                    .rules("nat", target)
                    .iter()
                    .filter_map(|r| value(r, "-j"))
                    .flat_map(|endpoint| self.rules("nat", endpoint))
                    .filter_map(|r| value(r, "--to-destination")?.parse::<SocketAddrV4>().ok())
                    .collect();
                forwarding.insert(key, backends);
            }
        }
        for rule in self.rules("filter", NO_ENDPOINTS) {
            let node_port = value(rule, "--dst-type") == Some("LOCAL");
            if let Some(key) = frontend(rule, node_port) {
                forwarding.insert(key, BTreeSet::new());
            }
        }
        forwarding
    }
}

/// The frontend a dispatch or reject rule matches.
fn frontend(rule: &[String], node_port: bool) -> Option<FrontendKey> {
    let protocol = match value(rule, "-p")? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let address = if node_port {
        Ipv4Addr::UNSPECIFIED
    } else {
        value(rule, "-d")?.strip_suffix("/32")?.parse().ok()?
    };
    Some(FrontendKey {
        address,
        port: value(rule, "--dport")?.parse().ok()?,
        protocol,
    })
}

/// The word after `flag`, unless the flag is negated (`! -d ...`).
fn value<'a>(rule: &'a [String], flag: &str) -> Option<&'a str> {
    let index = rule.iter().position(|w| w == flag)?;
    if index > 0 && rule[index - 1] == "!" {
        return None;
    }
    rule.get(index + 1).map(String::as_str)
}

/// Splits a rule into words; double quotes group (comments).
fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            ' ' if !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            _ => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::render::JUMPS;

    /// What iptables-nft-save 1.8.9 printed for rules wharf wrote.
    const SAVED: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:WHARF-NO-ENDPOINTS - [0:0]
-A INPUT -m comment --comment "wharf services without endpoints" -j WHARF-NO-ENDPOINTS
-A WHARF-NO-ENDPOINTS -p udp -m addrtype --dst-type LOCAL -m comment --comment "x has no endpoints" -m udp --dport 30053 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:WHARF-NODEPORTS - [0:0]
:WHARF-SEP-BBBB - [0:0]
:WHARF-SEP-CCCC - [0:0]
:WHARF-SERVICES - [0:0]
:WHARF-SVC-AAAA - [0:0]
-A PREROUTING -m comment --comment "wharf service portals" -j WHARF-SERVICES
-A WHARF-NODEPORTS -p tcp -m comment --comment "demo/web:http nodePort" -m tcp --dport 30080 -j WHARF-SVC-AAAA
-A WHARF-SEP-BBBB -s 10.244.0.1/32 -j WHARF-MARK-MASQ
-A WHARF-SEP-BBBB -p tcp -m recent --set --name WHARF-SEP-BBBB --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.0.1:8080
-A WHARF-SEP-CCCC -p tcp -m tcp -j DNAT --to-destination 10.244.0.2:8080
-A WHARF-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "demo/web:http cluster IP" -m tcp --dport 80 -j WHARF-SVC-AAAA
-A WHARF-SERVICES ! -d 127.0.0.0/8 -m comment --comment "wharf nodeports; must be last" -m addrtype --dst-type LOCAL -j WHARF-NODEPORTS
-A WHARF-SVC-AAAA -m recent --rcheck --seconds 30 --reap --name WHARF-SEP-BBBB --mask 255.255.255.255 --rsource -j WHARF-SEP-BBBB
-A WHARF-SVC-AAAA -m statistic --mode random --probability 0.50000000000 -j WHARF-SEP-BBBB
-A WHARF-SVC-AAAA -j WHARF-SEP-CCCC
COMMIT
"#;

    #[test]
    fn saved_rules_read_back_as_forwarding_chains_and_jumps() {
        let saved = Saved::parse(SAVED);
        let backends: BTreeSet<SocketAddrV4> = ["10.244.0.1:8080", "10.244.0.2:8080"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let key = |address: [u8; 4], port, protocol| FrontendKey {
            address: address.into(),
            port,
            protocol,
        };
        let expected: Forwarding = [
            (key([10, 96, 0, 10], 80, Protocol::Tcp), backends.clone()),
            (key([0, 0, 0, 0], 30080, Protocol::Tcp), backends),
            (key([0, 0, 0, 0], 30053, Protocol::Udp), BTreeSet::new()),
        ]
        .into();
        assert_eq!(saved.forwarding(), expected);
        assert!(saved.has_jump(&JUMPS[0]), "nat PREROUTING");
        assert!(!saved.has_jump(&JUMPS[1]), "nat OUTPUT");
        assert!(saved.has_jump(&JUMPS[3]), "filter INPUT");
        assert_eq!(saved.wharf_chains("nat").len(), 5);
        assert_eq!(saved.foreign_rule_count(), 0, "only wharf's rules");
    }

    #[test]
    fn words_split_on_spaces_outside_quotes() {
        assert_eq!(
            split(r#"-A X -m comment --comment "a b" -j Y"#),
            ["-A", "X", "-m", "comment", "--comment", "a b", "-j", "Y"]
        );
    }
}
