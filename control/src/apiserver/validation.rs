//! Field validation shared by every kind: names, labels, ports, selectors,
//! following upstream's apimachinery validators and messages.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::{Value, json};

use super::status::Cause;

/// Collects causes under a field path.
#[derive(Debug, Default)]
pub struct Causes(pub Vec<Cause>);

impl Causes {
    pub fn push(&mut self, cause: Cause) {
        self.0.push(cause);
    }
}

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

fn is_dns1123_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= DNS1123_LABEL_MAX
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.as_bytes()[0] != b'-'
        && value.as_bytes()[value.len() - 1] != b'-'
}

fn is_dns1123_subdomain(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= DNS1123_SUBDOMAIN_MAX
        && value.split('.').all(is_dns1123_label)
}

/// What object names must look like, per kind (upstream's NameIsDNS*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    Subdomain,
    Label,
    /// DNS-1035: a label that starts with a letter (Services).
    Label1035,
    /// Anything without `/` or `%` and not `.` or `..` (RBAC objects).
    PathSegment,
}

pub fn check_name(rule: NameRule, field: &str, name: &str, causes: &mut Causes) {
    let value = json!(name);
    let (ok, detail) = match rule {
        NameRule::Subdomain => (
            is_dns1123_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (e.g. \
             'example.com', regex used for validation is \
             '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        ),
        NameRule::Label => (
            is_dns1123_label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or \
             '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        ),
        NameRule::Label1035 => (
            is_dns1123_label(name) && name.as_bytes()[0].is_ascii_lowercase(),
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start \
             with an alphabetic character, and end with an alphanumeric character (e.g. \
             'my-name',  or 'abc-123', regex used for validation is \
             '[a-z]([-a-z0-9]*[a-z0-9])?')",
        ),
        NameRule::PathSegment => (
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%']),
            "may not be '.' or '..' and may not contain '/' or '%'",
        ),
    };
    if !ok {
        causes.push(Cause::invalid(field, &value, detail));
    }
}

/// Label and annotation keys: an optional DNS subdomain prefix and a name.
fn check_qualified_name(field: &str, key: &str, causes: &mut Causes) {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(is_dns1123_subdomain);
    if !name_ok || !prefix_ok {
        causes.push(Cause::invalid(
            field,
            &json!(key),
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start \
             and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or \
             '123-abc', regex used for validation is \
             '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix \
             and '/' (e.g. 'example.com/MyName')",
        ));
    }
}

fn check_label_value(field: &str, value: &str, causes: &mut Causes) {
    let ok = value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.as_bytes()[0].is_ascii_alphanumeric()
            && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric());
    if !ok {
        causes.push(Cause::invalid(
            field,
            &json!(value),
            "a valid label must be an empty string or consist of alphanumeric characters, '-', \
             '_' or '.', and must start and end with an alphanumeric character (e.g. \
             'MyValue',  or 'my_value',  or '12345', regex used for validation is \
             '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
        ));
    }
}

pub fn check_labels(field: &str, labels: &BTreeMap<String, String>, causes: &mut Causes) {
    for (key, value) in labels {
        check_qualified_name(field, key, causes);
        check_label_value(field, value, causes);
    }
}

/// Upstream's limit on all annotations of one object together.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

pub fn check_metadata(meta: &ObjectMeta, rule: NameRule, causes: &mut Causes) {
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => check_name(rule, "metadata.name", name, causes),
        _ => causes.push(Cause::required("metadata.name")),
    }
    if let Some(labels) = &meta.labels {
        check_labels("metadata.labels", labels, causes);
    }
    if let Some(annotations) = &meta.annotations {
        let mut total = 0;
        for (key, value) in annotations {
            check_qualified_name("metadata.annotations", key, causes);
            total += key.len() + value.len();
        }
        if total > ANNOTATIONS_MAX_BYTES {
            causes.push(Cause {
                reason: "FieldValueTooLong",
                field: "metadata.annotations".to_owned(),
                message: format!("Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"),
            });
        }
    }
}

pub fn check_port(field: &str, port: i32, causes: &mut Causes) {
    if !(1..=65535).contains(&port) {
        causes.push(Cause::invalid(
            field,
            &json!(port),
            "must be between 1 and 65535, inclusive",
        ));
    }
}

pub fn check_protocol(field: &str, protocol: Option<&str>, causes: &mut Causes) {
    if let Some(protocol) = protocol
        && !matches!(protocol, "TCP" | "UDP" | "SCTP")
    {
        causes.push(Cause::not_supported(
            field,
            &json!(protocol),
            &["SCTP", "TCP", "UDP"],
        ));
    }
}

/// A label selector that selects something, and whose expressions parse.
pub fn check_selector(field: &str, selector: &LabelSelector, causes: &mut Causes) {
    if let Some(labels) = &selector.match_labels {
        check_labels(&format!("{field}.matchLabels"), labels, causes);
    }
    for (i, expression) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let values = expression.values.as_deref().unwrap_or_default();
        match expression.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                causes.push(Cause::required(format!("{at}.values")))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => causes.push(Cause::forbidden(
                format!("{at}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => causes.push(Cause::not_supported(
                format!("{at}.operator"),
                &Value::String(other.to_owned()),
                &["DoesNotExist", "Exists", "In", "NotIn"],
            )),
        }
    }
}

/// Whether `selector` selects `labels` (for template-label checks).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let expressions_match = selector
        .match_expressions
        .iter()
        .flatten()
        .all(|expression| {
            let values = expression.values.as_deref().unwrap_or_default();
            let value = labels.get(&expression.key);
            match expression.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_rules() {
        let mut causes = Causes::default();
        check_name(
            NameRule::Subdomain,
            "metadata.name",
            "web.example-1",
            &mut causes,
        );
        check_name(NameRule::Label, "metadata.name", "web-1", &mut causes);
        check_name(NameRule::Label1035, "metadata.name", "web", &mut causes);
        assert!(causes.0.is_empty(), "{:?}", causes.0);
        for (rule, bad) in [
            (NameRule::Subdomain, "Web"),
            (NameRule::Subdomain, "-web"),
            (NameRule::Label, "a.b"),
            (NameRule::Label1035, "1web"),
            (NameRule::PathSegment, "a/b"),
        ] {
            let mut causes = Causes::default();
            check_name(rule, "metadata.name", bad, &mut causes);
            assert_eq!(causes.0.len(), 1, "{bad} passed {rule:?}");
        }
    }

    #[test]
    fn label_keys_may_have_a_dns_prefix() {
        let mut causes = Causes::default();
        let labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "web".to_owned()),
            ("tier".to_owned(), String::new()),
        ]);
        check_labels("metadata.labels", &labels, &mut causes);
        assert!(causes.0.is_empty());
        let bad = BTreeMap::from([("Bad Key".to_owned(), "-x".to_owned())]);
        check_labels("metadata.labels", &bad, &mut causes);
        assert_eq!(causes.0.len(), 2);
    }
}
