//! CertificateSigningRequests for the two kubelet signers, as
//! kube-controller-manager's csrapproving and csrsigning controllers
//! handle them: a request that asks for exactly what a node needs is
//! approved (a node's client certificate when a bootstrap token, the
//! node itself or an admin asks; a node's serving certificate when the
//! node itself or an admin asks: upstream leaves those to a human or an
//! external approver), and an approved request is signed with the
//! cluster CA. Anything else stays pending for `kubectl certificate
//! approve|deny`.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};
use serde_json::json;
use tracing::{debug, info};
use x509_parser::{
    certification_request::X509CertificationRequest, extensions::ParsedExtension,
    prelude::FromDer as _,
};

use super::{Context, Error};
use crate::pki::{KUBELET_CLIENT_SIGNER, KUBELET_SERVING_SIGNER};

const NODES: &str = "system:nodes";
const BOOTSTRAPPERS: &str = "system:bootstrappers";
const MASTERS: &str = "system:masters";

pub(super) async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let Some(authority) = &ctx.options.signer else {
        return Ok(Action::await_change());
    };
    let server = match csr.spec.signer_name.as_str() {
        KUBELET_CLIENT_SIGNER => false,
        KUBELET_SERVING_SIGNER => true,
        _ => return Ok(Action::await_change()),
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
        return Ok(Action::await_change());
    }
    let api = Api::<CertificateSigningRequest>::all(ctx.client.clone());
    if !has("Approved") {
        match approvable(&csr, server) {
            Ok(node) => {
                let patch = json!({"status": {"conditions": [{
                    "type": "Approved",
                    "status": "True",
                    "reason": "AutoApproved",
                    "message": format!("Auto approving the {} certificate of node {node}", if server { "serving" } else { "client" }),
                    "lastUpdateTime": chrono::Utc::now().to_rfc3339(),
                }]}});
                api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::api("approving", &name))?;
                info!(csr = %name, %node, "certificate request approved");
            }
            Err(why) => debug!(csr = %name, %why, "left for a human to approve"),
        }
        // The approval's own update brings the request back.
        return Ok(Action::await_change());
    }
    let request = String::from_utf8_lossy(&csr.spec.request.0);
    let status = match authority.sign_request(&request, server) {
        Ok(pem) => json!({"status": {"certificate": STANDARD.encode(pem)}}),
        Err(error) => json!({"status": {"conditions": [{
            "type": "Failed",
            "status": "True",
            "reason": "SignerValidationFailure",
            "message": error.to_string(),
            "lastUpdateTime": chrono::Utc::now().to_rfc3339(),
        }]}}),
    };
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(Error::api("signing", &name))?;
    Ok(Action::await_change())
}

/// The node a request may be approved for without a human, or why not:
/// its subject must be `system:node:<name>` in `system:nodes` and nothing
/// else, its usages those of the signer, and its requester that node, a
/// bootstrapper (client certificates only) or an admin.
fn approvable(csr: &CertificateSigningRequest, server: bool) -> Result<String, String> {
    let pem = x509_parser::pem::parse_x509_pem(&csr.spec.request.0)
        .map_err(|e| format!("not PEM: {e}"))?
        .1;
    let (_, request) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| format!("not a request: {e}"))?;
    let subject = &request.certification_request_info.subject;
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("no common name")?;
    let node = common_name
        .strip_prefix("system:node:")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{common_name} is not a node's name"))?;
    let organizations: Vec<&str> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .collect();
    if organizations != [NODES] {
        return Err(format!("organizations {organizations:?} are not [{NODES}]"));
    }
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
    let extensions = request.requested_extensions().into_iter().flatten();
    for extension in extensions {
        if let ParsedExtension::SubjectAlternativeName(names) = extension {
            let only_hosts = names.general_names.iter().all(|n| {
                matches!(
                    n,
                    x509_parser::extensions::GeneralName::DNSName(_)
                        | x509_parser::extensions::GeneralName::IPAddress(_)
                )
            });
            if !only_hosts || !server {
                return Err(
                    "only a serving certificate may name hosts, and only DNS names and addresses"
                        .into(),
                );
            }
        }
    }
    let requester = csr.spec.username.as_deref().unwrap_or_default();
    let groups: Vec<&str> = csr
        .spec
        .groups
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let by_node = requester == common_name;
    let by_admin = groups.contains(&MASTERS);
    let by_bootstrapper = !server && groups.contains(&BOOTSTRAPPERS);
    if !(by_node || by_admin || by_bootstrapper) {
        return Err(format!(
            "{requester} may not ask for {common_name}'s certificate"
        ));
    }
    Ok(node.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn request(cn: &str, orgs: &[&str], ips: &[&str]) -> String {
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

    fn csr(
        pem: &str,
        signer: &str,
        usages: &[&str],
        user: &str,
        groups: &[&str],
    ) -> CertificateSigningRequest {
        serde_json::from_value(json!({
            "metadata": {"name": "r"},
            "spec": {
                "request": STANDARD.encode(pem),
                "signerName": signer,
                "usages": usages,
                "username": user,
                "groups": groups,
            }
        }))
        .unwrap()
    }

    #[test]
    fn only_what_a_node_needs_is_approved() {
        let client = request("system:node:n1", &[NODES], &[]);
        let usages = ["digital signature", "key encipherment", "client auth"];
        let bootstrap = csr(
            &client,
            KUBELET_CLIENT_SIGNER,
            &usages,
            "system:bootstrap:abcdef",
            &[BOOTSTRAPPERS],
        );
        assert_eq!(approvable(&bootstrap, false), Ok("n1".into()));
        let renewal = csr(
            &client,
            KUBELET_CLIENT_SIGNER,
            &usages,
            "system:node:n1",
            &[NODES],
        );
        assert!(approvable(&renewal, false).is_ok());
        let other_node = csr(
            &client,
            KUBELET_CLIENT_SIGNER,
            &usages,
            "system:node:n2",
            &[NODES],
        );
        assert!(
            approvable(&other_node, false).is_err(),
            "a node asking for another's"
        );
        let admin = request("system:node:n1", &[NODES, MASTERS], &[]);
        let escalation = csr(
            &admin,
            KUBELET_CLIENT_SIGNER,
            &usages,
            "system:bootstrap:abcdef",
            &[BOOTSTRAPPERS],
        );
        assert!(
            approvable(&escalation, false).is_err(),
            "extra organizations"
        );
        let signing = csr(
            &client,
            KUBELET_CLIENT_SIGNER,
            &["client auth", "cert sign"],
            "system:node:n1",
            &[NODES],
        );
        assert!(approvable(&signing, false).is_err(), "extra usages");

        let serving = request("system:node:n1", &[NODES], &["192.168.90.1"]);
        let usages = ["digital signature", "key encipherment", "server auth"];
        let by_node = csr(
            &serving,
            KUBELET_SERVING_SIGNER,
            &usages,
            "system:node:n1",
            &[NODES],
        );
        assert!(approvable(&by_node, true).is_ok());
        let by_bootstrapper = csr(
            &serving,
            KUBELET_SERVING_SIGNER,
            &usages,
            "system:bootstrap:abcdef",
            &[BOOTSTRAPPERS],
        );
        assert!(
            approvable(&by_bootstrapper, true).is_err(),
            "bootstrappers only get client certificates"
        );
    }
}
