//! Label selectors of typed objects: `LabelSelector` (controllers'
//! selectors, pod affinity terms, topology spread) and node selector terms
//! (node affinity).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

pub type Labels = BTreeMap<String, String>;

/// Whether `labels` satisfy `selector`. An empty selector matches
/// everything, as upstream's `LabelSelectorAsSelector`; an operator it
/// does not know matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let plain = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    plain
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|requirement| {
                let values = requirement.values.as_deref().unwrap_or_default();
                let actual = labels.get(&requirement.key);
                match requirement.operator.as_str() {
                    "In" => actual.is_some_and(|v| values.contains(v)),
                    "NotIn" => actual.is_none_or(|v| !values.contains(v)),
                    "Exists" => actual.is_some(),
                    "DoesNotExist" => actual.is_none(),
                    _ => false,
                }
            })
}

/// A node selector requirement against a label map (`matchExpressions`)
/// or against `metadata.name` (`matchFields`, only that field exists).
fn node_requirement_matches(requirement: &NodeSelectorRequirement, actual: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |text: &str| text.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => actual.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => actual.is_none_or(|v| values.iter().all(|x| x != v)),
        "Exists" => actual.is_some(),
        "DoesNotExist" => actual.is_none(),
        "Gt" | "Lt" => {
            let (Some(actual), [bound]) = (actual.and_then(number), values) else {
                return false;
            };
            let Some(bound) = number(bound) else {
                return false;
            };
            if requirement.operator == "Gt" {
                actual > bound
            } else {
                actual < bound
            }
        }
        _ => false,
    }
}

/// Whether `node` satisfies one term (all of its requirements). An empty
/// term matches no node, as upstream.
pub fn node_term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let labels = node.metadata.labels.as_ref();
    expressions.iter().all(|requirement| {
        let actual = labels
            .and_then(|l| l.get(&requirement.key))
            .map(String::as_str);
        node_requirement_matches(requirement, actual)
    }) && fields.iter().all(|requirement| {
        requirement.key == "metadata.name"
            && node_requirement_matches(requirement, node.metadata.name.as_deref())
    })
}

/// Whether `node` satisfies any of the terms (they are ORed).
pub fn node_terms_match(terms: &[NodeSelectorTerm], node: &Node) -> bool {
    terms.iter().any(|term| node_term_matches(term, node))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn label_selectors() {
        let app_web = labels(&[("app", "web"), ("tier", "front")]);
        let empty = LabelSelector::default();
        assert!(selector_matches(&empty, &app_web));
        let selector = LabelSelector {
            match_labels: Some([("app".to_owned(), "web".to_owned())].into()),
            match_expressions: Some(vec![
                expression("tier", "In", &["front", "edge"]),
                expression("canary", "DoesNotExist", &[]),
            ]),
        };
        assert!(selector_matches(&selector, &app_web));
        assert!(!selector_matches(
            &selector,
            &labels(&[("app", "web"), ("tier", "back")])
        ));
        let not_in = LabelSelector {
            match_expressions: Some(vec![expression("tier", "NotIn", &["front"])]),
            ..Default::default()
        };
        assert!(!selector_matches(&not_in, &app_web));
        assert!(selector_matches(&not_in, &labels(&[])));
        let bogus = LabelSelector {
            match_expressions: Some(vec![expression("tier", "Near", &["front"])]),
            ..Default::default()
        };
        assert!(!selector_matches(&bogus, &app_web));
    }

    #[test]
    fn node_terms() {
        let mut node = Node::default();
        node.metadata.name = Some("n1".to_owned());
        node.metadata.labels = Some(labels(&[("zone", "a"), ("cores", "16")]));
        let requirement = |key: &str, operator: &str, values: &[&str]| NodeSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        };
        let term = |expressions, fields| NodeSelectorTerm {
            match_expressions: Some(expressions),
            match_fields: Some(fields),
        };
        assert!(node_term_matches(
            &term(vec![requirement("zone", "In", &["a", "b"])], vec![]),
            &node
        ));
        assert!(node_term_matches(
            &term(vec![requirement("cores", "Gt", &["8"])], vec![]),
            &node
        ));
        assert!(!node_term_matches(
            &term(vec![requirement("cores", "Lt", &["8"])], vec![]),
            &node
        ));
        assert!(node_term_matches(
            &term(vec![], vec![requirement("metadata.name", "In", &["n1"])]),
            &node
        ));
        assert!(!node_term_matches(&term(vec![], vec![]), &node), "empty");
        assert!(node_terms_match(
            &[
                term(vec![requirement("zone", "In", &["z"])], vec![]),
                term(vec![requirement("zone", "Exists", &[])], vec![]),
            ],
            &node
        ));
    }
}
