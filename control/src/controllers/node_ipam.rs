//! Node IPAM: each node gets a `spec.podCIDR` of `--node-cidr-mask-size`
//! bits from `--cluster-cidr`, which the agent's IPAM hands out to pods.
//! A CIDR is never given twice: allocations are taken from every node in
//! the cache plus those this process handed out and the cache has not
//! shown yet.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

use super::{Context, Error};
use crate::events::EventType;

/// Parses `a.b.c.d/len` (the network address, host bits cleared).
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, length) = text.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let length: u8 = length.parse().ok().filter(|l| *l <= 32)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0);
    Some((Ipv4Addr::from(u32::from(address) & mask), length))
}

/// The first `/mask` subnet of `cluster` not in `taken` (network
/// addresses as integers).
pub(super) fn allocate(cluster: (Ipv4Addr, u8), mask: u8, taken: &BTreeSet<u32>) -> Option<u32> {
    let (base, length) = cluster;
    if mask < length || mask > 32 {
        return None;
    }
    let count = 1u64 << (mask - length);
    let step = 1u64 << (32 - mask);
    (0..count)
        .map(|i| u64::from(u32::from(base)) + i * step)
        .filter_map(|n| u32::try_from(n).ok())
        .find(|n| !taken.contains(n))
}

fn cidr_of(node: &Node) -> Option<u32> {
    let text = node.spec.as_ref()?.pod_cidr.as_deref()?;
    parse_cidr(text).map(|(a, _)| u32::from(a))
}

pub(super) async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    if cidr_of(&node).is_some() {
        return Ok(Action::await_change());
    }
    let (cluster, mask) = (ctx.options.cluster_cidr, ctx.options.node_cidr_mask);
    let chosen = {
        let mut handed_out = ctx
            .pod_cidrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut taken: BTreeSet<u32> = ctx
            .nodes
            .state()
            .iter()
            .filter_map(|n| cidr_of(n))
            .collect();
        // What the cache shows needs no remembering (and a deleted node's
        // CIDR becomes free again).
        handed_out.retain(|network| !taken.contains(network));
        taken.extend(handed_out.iter().copied());
        let chosen = allocate(cluster, mask, &taken);
        if let Some(network) = chosen {
            handed_out.insert(network);
        }
        chosen
    };
    let Some(network) = chosen else {
        ctx.recorder.record(
            &*node,
            EventType::Warning,
            "CIDRNotAvailable",
            format!("Node {} status is now: CIDRNotAvailable", node.name_any()),
        );
        return Ok(Action::requeue(std::time::Duration::from_secs(30)));
    };
    let cidr = format!("{}/{mask}", Ipv4Addr::from(network));
    let patch = serde_json::json!({ "spec": { "podCIDR": cidr, "podCIDRs": [cidr] } });
    if let Err(error) = Api::<Node>::all(ctx.client.clone())
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        ctx.pod_cidrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&network);
        return Err(Error::api("assigning a pod CIDR to", node.name_any())(
            error,
        ));
    }
    ctx.recorder.record(
        &*node,
        EventType::Normal,
        "CIDRAssignmentSucceeded",
        format!("Node {} got pod CIDR {cidr}", node.name_any()),
    );
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_the_first_free_subnet() {
        let cluster = parse_cidr("10.244.7.9/16").unwrap();
        assert_eq!(
            cluster,
            (Ipv4Addr::new(10, 244, 0, 0), 16),
            "host bits cleared"
        );
        let mut taken = BTreeSet::new();
        let first = allocate(cluster, 24, &taken).unwrap();
        assert_eq!(Ipv4Addr::from(first), Ipv4Addr::new(10, 244, 0, 0));
        taken.insert(first);
        taken.insert(u32::from(Ipv4Addr::new(10, 244, 1, 0)));
        assert_eq!(
            Ipv4Addr::from(allocate(cluster, 24, &taken).unwrap()),
            Ipv4Addr::new(10, 244, 2, 0)
        );
        let tiny = parse_cidr("10.0.0.0/23").unwrap();
        let full: BTreeSet<u32> = [
            u32::from(Ipv4Addr::new(10, 0, 0, 0)),
            u32::from(Ipv4Addr::new(10, 0, 1, 0)),
        ]
        .into();
        assert_eq!(allocate(tiny, 24, &full), None, "exhausted");
        assert_eq!(
            allocate(tiny, 22, &BTreeSet::new()),
            None,
            "mask shorter than the cluster"
        );
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
    }
}
