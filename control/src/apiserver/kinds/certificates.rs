//! certificates.k8s.io: CertificateSigningRequests, as kube-apiserver
//! serves them. The requester is stamped on create; the spec never
//! changes after; `Approved`/`Denied` conditions are set only through
//! the `approval` subresource and the certificate only through `status`.

use k8s_openapi::{
    api::certificates::v1::CertificateSigningRequest,
    chrono::{DateTime, Utc},
};
use serde_json::{Value, json};

use super::{Kind, ResourceType, register};
use crate::apiserver::{
    authn::User,
    objects::UpdateMode,
    status::Cause,
    table::{Column, age},
    validation::Causes,
};

pub(super) fn register_all(types: &mut Vec<ResourceType>) {
    register::<CertificateSigningRequest>(types);
}

/// The plural, for the places that treat these requests specially.
pub const PLURAL: &str = "certificatesigningrequests";

/// Key usages a request may ask for (certificates.k8s.io/v1).
const USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// The condition types only the approval subresource sets.
const DECISIONS: [&str; 2] = ["Approved", "Denied"];

impl Kind for CertificateSigningRequest {
    const SHORT_NAMES: &'static [&'static str] = &["csr"];
    const STATUS: bool = true;
    const FIELDS: &'static [&'static str] = &["spec.signerName"];

    fn validate(&self, causes: &mut Causes) {
        let spec = &self.spec;
        let signer = spec.signer_name.as_str();
        if signer.is_empty() {
            causes.push(Cause::required("spec.signerName"));
        } else if signer.split('/').count() != 2 {
            causes.push(Cause::invalid(
                "spec.signerName",
                &json!(signer),
                "must be a fully qualified domain and path of the form 'example.com/signer-name'",
            ));
        }
        let request = String::from_utf8_lossy(&spec.request.0);
        if rcgen::CertificateSigningRequestParams::from_pem(&request).is_err() {
            causes.push(Cause::invalid(
                "spec.request",
                &json!("<request>"),
                "must contain one PEM-encoded CERTIFICATE REQUEST with a valid signature",
            ));
        }
        for (i, usage) in spec.usages.iter().flatten().enumerate() {
            if !USAGES.contains(&usage.as_str()) {
                causes.push(Cause::not_supported(
                    format!("spec.usages[{i}]"),
                    &json!(usage),
                    USAGES,
                ));
            }
        }
        if spec.expiration_seconds.is_some_and(|s| s < 600) {
            causes.push(Cause::invalid(
                "spec.expirationSeconds",
                &json!(spec.expiration_seconds),
                "may not specify a duration less than 600 seconds (10 minutes)",
            ));
        }
        let decisions: Vec<&str> = self
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .map(|c| c.type_.as_str())
            .filter(|t| DECISIONS.contains(t))
            .collect();
        if decisions.contains(&"Approved") && decisions.contains(&"Denied") {
            causes.push(Cause::invalid(
                "status.conditions",
                &json!(decisions),
                "Approved and Denied conditions are mutually exclusive",
            ));
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Age", "string", 0),
            Column::new("SignerName", "string", 0),
            Column::new("Requestor", "string", 0),
            Column::new("RequestedDuration", "string", 0),
            Column::new("Condition", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let mut condition: Vec<&str> = self
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .filter(|c| c.status == "True")
            .map(|c| c.type_.as_str())
            .collect();
        if self
            .status
            .as_ref()
            .is_some_and(|s| s.certificate.as_ref().is_some_and(|c| !c.0.is_empty()))
        {
            condition.push("Issued");
        }
        let condition = if condition.is_empty() {
            "Pending".to_owned()
        } else {
            condition.join(",")
        };
        let duration = self
            .spec
            .expiration_seconds
            .map_or("<none>".to_owned(), |s| format!("{s}s"));
        vec![
            json!(age(&self.metadata, now)),
            json!(self.spec.signer_name),
            json!(self.spec.username.clone().unwrap_or_default()),
            json!(duration),
            json!(condition),
        ]
    }
}

/// Stamps who is asking on a request being created (whatever the body
/// says), as kube-apiserver does.
pub fn stamp_requester(object: &mut Value, user: &User) {
    let spec = &mut object["spec"];
    if !spec.is_object() {
        return;
    }
    spec["username"] = json!(user.name);
    spec["groups"] = json!(user.groups);
    if let Some(map) = spec.as_object_mut() {
        map.remove("uid");
        map.remove("extra");
    }
}

/// What an update of a request may change, by mode: the main resource
/// only metadata; `status` the certificate (once approved, and never
/// again once issued) and conditions other than the decisions;
/// `approval` only the decisions, which once made are never taken back
/// (nor is `Failed`).
pub fn keep_on_update(current: &Value, next: &mut Value, mode: UpdateMode) {
    next["spec"] = current["spec"].clone();
    let is_decision = |c: &Value| c["type"].as_str().is_some_and(|t| DECISIONS.contains(&t));
    let conditions = |object: &Value| -> Vec<Value> {
        object["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let kept: Vec<Value> = conditions(current);
    let made: Vec<&Value> = kept
        .iter()
        .filter(|c| is_decision(c) || c["type"] == "Failed")
        .collect();
    let mut status = match mode {
        UpdateMode::Approval => current["status"].clone(),
        UpdateMode::Status => next["status"].clone(),
        UpdateMode::Main | UpdateMode::Binding => return,
    };
    if !status.is_object() {
        status = json!({});
    }
    let mut merged: Vec<Value> = match mode {
        // The body's decisions beside the current other conditions.
        UpdateMode::Approval => kept
            .iter()
            .filter(|c| !is_decision(c))
            .cloned()
            .chain(conditions(next).into_iter().filter(|c| is_decision(c)))
            .collect(),
        // The body's other conditions beside the current decisions.
        _ => conditions(next)
            .into_iter()
            .filter(|c| !is_decision(c))
            .chain(kept.iter().filter(|c| is_decision(c)).cloned())
            .collect(),
    };
    // Decisions and failures stay.
    for condition in made {
        if !merged.iter().any(|c| c["type"] == condition["type"]) {
            merged.push(condition.clone());
        }
    }
    status["conditions"] = json!(merged);
    let approved = merged
        .iter()
        .any(|c| c["type"] == "Approved" && c["status"] == "True");
    let issued = current["status"]
        .get("certificate")
        .filter(|c| c.as_str().is_some_and(|c| !c.is_empty()))
        .cloned();
    match (issued, approved) {
        (Some(issued), _) => status["certificate"] = issued,
        (None, false) => {
            if let Some(map) = status.as_object_mut() {
                map.remove("certificate");
            }
        }
        (None, true) => {}
    }
    next["status"] = status;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_change_only_what_their_mode_may() {
        let current = json!({
            "spec": {"request": "cmVx", "signerName": "a/b", "username": "alice"},
            "status": {"conditions": [{"type": "Failed", "status": "True"}]}
        });
        // approval: only Approved/Denied conditions.
        let mut next = json!({
            "spec": {"username": "mallory"},
            "status": {"certificate": "Zm9v", "conditions": [
                {"type": "Approved", "status": "True"}, {"type": "Failed", "status": "False"}
            ]}
        });
        keep_on_update(&current, &mut next, UpdateMode::Approval);
        assert_eq!(next["spec"]["username"], "alice");
        assert!(next["status"].get("certificate").is_none());
        let types: Vec<&str> = next["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Failed", "Approved"]);
        // status: the certificate, but no decision; a decision stays.
        let approved = next.clone();
        let mut next = json!({"status": {"certificate": "Zm9v", "conditions": []}});
        keep_on_update(&approved, &mut next, UpdateMode::Status);
        assert_eq!(next["status"]["certificate"], "Zm9v");
        assert_eq!(next["status"]["conditions"][0]["type"], "Approved");
        // approval cannot take a decision back.
        let issued = next.clone();
        let mut next = json!({"status": {"conditions": [{"type": "Denied", "status": "True"}]}});
        keep_on_update(&issued, &mut next, UpdateMode::Approval);
        let types: Vec<&str> = next["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert!(types.contains(&"Approved"), "{types:?}");
        assert_eq!(next["status"]["certificate"], "Zm9v");
        // status cannot issue a certificate for an unapproved request.
        let mut next = json!({"status": {"certificate": "Zm9v"}});
        keep_on_update(&current, &mut next, UpdateMode::Status);
        assert!(next["status"].get("certificate").is_none());
    }

    #[test]
    fn the_requester_is_who_asked() {
        let mut object = json!({"spec": {"username": "someone-else", "uid": "x"}});
        let user = User {
            name: "system:bootstrap:abcdef".into(),
            groups: vec!["system:bootstrappers".into()],
        };
        stamp_requester(&mut object, &user);
        assert_eq!(object["spec"]["username"], "system:bootstrap:abcdef");
        assert_eq!(object["spec"]["groups"][0], "system:bootstrappers");
        assert!(object["spec"].get("uid").is_none());
    }
}
