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
/// only metadata; `status` the certificate and conditions other than
/// `Approved`/`Denied`; `approval` only those conditions.
pub fn keep_on_update(current: &Value, next: &mut Value, mode: UpdateMode) {
    next["spec"] = current["spec"].clone();
    let conditions = |object: &Value, decisions: bool| -> Vec<Value> {
        object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                let decision = c["type"].as_str().is_some_and(|t| DECISIONS.contains(&t));
                decision == decisions
            })
            .cloned()
            .collect()
    };
    match mode {
        UpdateMode::Approval => {
            let mut status = current["status"].clone();
            if !status.is_object() {
                status = json!({});
            }
            let mut merged = conditions(current, false);
            merged.extend(conditions(next, true));
            status["conditions"] = json!(merged);
            next["status"] = status;
        }
        UpdateMode::Status => {
            let mut merged = conditions(next, false);
            merged.extend(conditions(current, true));
            if next["status"].is_object() {
                next["status"]["conditions"] = json!(merged);
            }
            // A certificate, once issued, stays.
            if let Some(issued) = current["status"]
                .get("certificate")
                .filter(|c| c.as_str().is_some_and(|c| !c.is_empty()))
            {
                next["status"]["certificate"] = issued.clone();
            }
        }
        UpdateMode::Main | UpdateMode::MainAndStatus => {}
    }
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
        // status: the certificate, but no decision.
        let approved = next.clone();
        let mut next = json!({"status": {"certificate": "Zm9v", "conditions": []}});
        keep_on_update(&approved, &mut next, UpdateMode::Status);
        assert_eq!(next["status"]["certificate"], "Zm9v");
        assert_eq!(next["status"]["conditions"][0]["type"], "Approved");
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
