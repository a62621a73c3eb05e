//! CertificateSigningRequests for the two kubelet signers, as
//! kube-controller-manager's csrapproving and csrsigning controllers
//! handle them. A request that asks for exactly a node's certificate is
//! approved: its client certificate when a bootstrap token, the node
//! itself or an admin asks; its serving certificate when the node itself
//! or an admin asks and every name in it is the Node's (its name and
//! `status.addresses`). Upstream leaves serving requests to a human or
//! an external approver. An approved request is signed with the cluster
//! CA, whoever approved it, only if it still asks for exactly that
//! (otherwise it is marked Failed); only its key is taken from it.
//! Anything else stays pending for `kubectl certificate approve|deny`.

use std::{sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use k8s_openapi::api::{certificates::v1::CertificateSigningRequest, core::v1::Node};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef},
};
use serde_json::json;
use tracing::{debug, info};

use super::{Context, Error};
use crate::pki::{KUBELET_CLIENT_SIGNER, KUBELET_SERVING_SIGNER, NODES, NodeRequest, node_request};

const BOOTSTRAPPERS: &str = "system:bootstrappers";
const MASTERS: &str = "system:masters";

/// How long issued certificates last unless the request asks for less
/// (`spec.expirationSeconds`, at least 10 minutes), as
/// kube-controller-manager's default `--cluster-signing-duration`.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Requests are deleted once they are of no more use, as upstream's
/// csrcleaner does: an hour after creation once decided (issued, denied,
/// failed), a day after creation while still pending.
const DECIDED_KEPT: Duration = Duration::from_secs(3600);
const PENDING_KEPT: Duration = Duration::from_secs(24 * 3600);

/// How long `csr` is kept from `now` on.
fn kept_for(csr: &CertificateSigningRequest, now: chrono::DateTime<chrono::Utc>) -> Duration {
    let decided = csr.status.as_ref().is_some_and(|s| {
        s.certificate.as_ref().is_some_and(|c| !c.0.is_empty())
            || s.conditions
                .iter()
                .flatten()
                .any(|c| matches!(c.type_.as_str(), "Denied" | "Failed") && c.status == "True")
    });
    let keep = if decided { DECIDED_KEPT } else { PENDING_KEPT };
    let created = csr
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let age = (now - created).to_std().unwrap_or_default();
    keep.saturating_sub(age)
}

pub(super) async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let name = csr.name_any();
    let api = Api::<CertificateSigningRequest>::all(ctx.client.clone());
    let left = kept_for(&csr, chrono::Utc::now());
    if left.is_zero() {
        match api.delete(&name, &Default::default()).await {
            Ok(_) => debug!(csr = %name, "expired request deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(error) => return Err(Error::api("deleting", &name)(error)),
        }
        return Ok(Action::await_change());
    }
    let decided = decide(&csr, &ctx, &api).await?;
    // Back when it is to be deleted, if nothing comes first.
    Ok(decided.unwrap_or(Action::requeue(left)))
}

/// Approves or signs a request for a kubelet signer; `Some` when the
/// request comes back by another way.
async fn decide(
    csr: &CertificateSigningRequest,
    ctx: &Context,
    api: &Api<CertificateSigningRequest>,
) -> Result<Option<Action>, Error> {
    let Some(authority) = &ctx.options.signer else {
        return Ok(None);
    };
    let server = match csr.spec.signer_name.as_str() {
        KUBELET_CLIENT_SIGNER => false,
        KUBELET_SERVING_SIGNER => true,
        _ => return Ok(None),
    };
    let name = csr.name_any();
    let conditions: Vec<(&str, &str)> = csr
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .map(|c| (c.type_.as_str(), c.status.as_str()))
        .collect();
    let issued = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    let has = |kind: &str| conditions.iter().any(|(t, s)| *t == kind && *s == "True");
    if issued || has("Denied") || has("Failed") {
        return Ok(None);
    }
    // What the request asks for, read once for both decisions.
    let asked = node_request(&csr.spec.request.0).and_then(|request| {
        check_usages(csr, server)?;
        let node = ctx.nodes.get(&ObjectRef::new(&request.node));
        check_names(&request, server, node.as_deref())?;
        Ok(request)
    });
    if !has("Approved") {
        let verdict = asked.as_ref().map_err(Clone::clone).and_then(|request| {
            check_requester(csr, request, server)?;
            Ok(request)
        });
        match verdict {
            Ok(request) => {
                let kind = if server { "serving" } else { "client" };
                // Pinned at the version read, so a human's concurrent
                // decision is not overwritten.
                let patch = json!({
                    "metadata": {"resourceVersion": csr.resource_version()},
                    "status": {"conditions": [{
                        "type": "Approved",
                        "status": "True",
                        "reason": "AutoApproved",
                        "message": format!("Auto approving the {kind} certificate of node {}", request.node),
                        "lastUpdateTime": chrono::Utc::now().to_rfc3339(),
                    }]}
                });
                api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::api("approving", &name))?;
                info!(csr = %name, node = %request.node, "certificate request approved");
            }
            // A serving request naming addresses its Node does not
            // report yet comes back with the Node's next change
            // (`node_to_requests`).
            Err(why) => debug!(csr = %name, %why, "not approved"),
        }
        // The approval's own update brings the request back.
        return Ok(None);
    }
    let lifetime = csr
        .spec
        .expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(MAX_LIFETIME, |s| {
            Duration::from_secs(s.max(600)).min(MAX_LIFETIME)
        });
    let signed = asked.and_then(|request| {
        authority
            .sign_node(&request, server, lifetime)
            .map_err(|e| e.to_string())
    });
    let status = match signed {
        Ok(pem) => json!({"status": {"certificate": STANDARD.encode(pem)}}),
        Err(message) => json!({"status": {"conditions": [{
            "type": "Failed",
            "status": "True",
            "reason": "SignerValidationFailure",
            "message": message,
            "lastUpdateTime": chrono::Utc::now().to_rfc3339(),
        }]}}),
    };
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(Error::api("signing", &name))?;
    Ok(None)
}

/// The pending serving requests, to look at again when a Node changes:
/// a node asks for its serving certificate as it registers, and its
/// addresses may come after the request.
pub(super) fn node_to_requests(
    ctx: &Arc<Context>,
) -> impl Fn(Arc<Node>) -> Vec<ObjectRef<CertificateSigningRequest>> + use<> {
    let requests = ctx.requests.clone();
    move |_| {
        requests
            .state()
            .iter()
            .filter(|csr| csr.spec.signer_name == KUBELET_SERVING_SIGNER)
            .filter(|csr| csr.status.as_ref().is_none_or(|s| s.certificate.is_none()))
            .map(|csr| ObjectRef::from_obj(csr.as_ref()))
            .collect()
    }
}

/// The usages must be the signer's: digital signature and key
/// encipherment at most, and its purpose.
fn check_usages(csr: &CertificateSigningRequest, server: bool) -> Result<(), String> {
    let purpose = if server { "server auth" } else { "client auth" };
    let usages: Vec<&str> = csr
        .spec
        .usages
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let allowed = ["digital signature", "key encipherment", purpose];
    if !usages.contains(&purpose) || usages.iter().any(|u| !allowed.contains(u)) {
        return Err(format!("usages {usages:?} are not a node's {purpose}"));
    }
    Ok(())
}

/// A client certificate names no hosts; a serving one only the Node's
/// name and addresses.
fn check_names(request: &NodeRequest, server: bool, node: Option<&Node>) -> Result<(), String> {
    if !server {
        if request.dns_names.is_empty() && request.addresses.is_empty() {
            return Ok(());
        }
        return Err("a client certificate names no hosts".into());
    }
    let node = node.ok_or_else(|| format!("no Node named {}", request.node))?;
    let known: Vec<&str> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .map(|a| a.address.as_str())
        .chain(std::iter::once(request.node.as_str()))
        .collect();
    if request.dns_names.is_empty() && request.addresses.is_empty() {
        return Err("a serving certificate must name its host".into());
    }
    for name in &request.dns_names {
        if !known.contains(&name.as_str()) {
            return Err(format!("{name} is not node {}'s", request.node));
        }
    }
    for address in &request.addresses {
        if !known.contains(&address.to_string().as_str()) {
            return Err(format!("{address} is not node {}'s", request.node));
        }
    }
    Ok(())
}

/// Who may have it approved without a human: the node itself, an admin,
/// or (client certificates only) a bootstrap token.
fn check_requester(
    csr: &CertificateSigningRequest,
    request: &NodeRequest,
    server: bool,
) -> Result<(), String> {
    let requester = csr.spec.username.as_deref().unwrap_or_default();
    let groups: Vec<&str> = csr
        .spec
        .groups
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let by_node = requester == format!("system:node:{}", request.node) && groups.contains(&NODES);
    let by_admin = groups.contains(&MASTERS);
    let by_bootstrapper = !server && groups.contains(&BOOTSTRAPPERS);
    if by_node || by_admin || by_bootstrapper {
        return Ok(());
    }
    Err(format!(
        "{requester} may not have node {}'s certificate approved",
        request.node
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn pem(cn: &str, orgs: &[&str], ips: &[&str]) -> String {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        for org in orgs {
            name.push(DnType::OrganizationName, *org);
        }
        name.push(DnType::CommonName, cn);
        params.distinguished_name = name;
        for ip in ips {
            params
                .subject_alt_names
                .push(SanType::IpAddress(ip.parse().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr(usages: &[&str], user: &str, groups: &[&str]) -> CertificateSigningRequest {
        serde_json::from_value(json!({
            "metadata": {"name": "r"},
            "spec": {"request": "", "signerName": "x/y", "usages": usages, "username": user, "groups": groups}
        }))
        .unwrap()
    }

    fn node(addresses: &[&str]) -> Node {
        let addresses: Vec<_> = addresses
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .collect();
        serde_json::from_value(
            json!({"metadata": {"name": "n1"}, "status": {"addresses": addresses}}),
        )
        .unwrap()
    }

    #[test]
    fn requests_are_kept_an_hour_once_decided_and_a_day_pending() {
        let now = chrono::Utc::now();
        let at = |minutes: i64, status: serde_json::Value| -> CertificateSigningRequest {
            serde_json::from_value(json!({
                "metadata": {"name": "r", "creationTimestamp": (now - chrono::Duration::minutes(minutes)).to_rfc3339()},
                "spec": {"request": "", "signerName": "x/y"},
                "status": status,
            }))
            .unwrap()
        };
        let issued = json!({"certificate": "Zm9v"});
        assert_eq!(kept_for(&at(30, issued.clone()), now).as_secs() / 60, 30);
        assert!(kept_for(&at(61, issued), now).is_zero());
        let denied = json!({"conditions": [{"type": "Denied", "status": "True"}]});
        assert!(kept_for(&at(61, denied), now).is_zero());
        assert_eq!(kept_for(&at(61, json!({})), now).as_secs() / 3600, 22);
        assert!(kept_for(&at(24 * 60 + 1, json!({})), now).is_zero());
    }

    #[test]
    fn only_what_a_node_needs_is_approved() {
        let client = node_request(pem("system:node:n1", &[NODES], &[]).as_bytes()).unwrap();
        let usages = ["digital signature", "key encipherment", "client auth"];
        let by = |user: &str, groups: &[&str]| {
            check_requester(&csr(&usages, user, groups), &client, false)
        };
        assert!(by("system:bootstrap:abcdef", &[BOOTSTRAPPERS]).is_ok());
        assert!(by("system:node:n1", &[NODES]).is_ok());
        assert!(
            by("system:node:n2", &[NODES]).is_err(),
            "a node asking for another's"
        );
        assert!(by("alice", &["developers"]).is_err());
        assert!(check_usages(&csr(&["client auth", "cert sign"], "", &[]), false).is_err());
        assert!(check_names(&client, false, None).is_ok());

        let serving =
            node_request(pem("system:node:n1", &[NODES], &["192.168.90.1"]).as_bytes()).unwrap();
        assert!(check_names(&serving, true, Some(&node(&["192.168.90.1"]))).is_ok());
        assert!(
            check_names(&serving, true, Some(&node(&["192.168.90.2"]))).is_err(),
            "an address that is not the node's"
        );
        assert!(check_names(&serving, true, None).is_err(), "no Node yet");
        assert!(
            check_names(&serving, false, None).is_err(),
            "hosts in a client certificate"
        );
        let usages = ["digital signature", "key encipherment", "server auth"];
        assert!(check_usages(&csr(&usages, "", &[]), true).is_ok());
        assert!(
            check_requester(
                &csr(&usages, "system:bootstrap:abcdef", &[BOOTSTRAPPERS]),
                &serving,
                true
            )
            .is_err(),
            "bootstrappers only get client certificates"
        );
    }
}
