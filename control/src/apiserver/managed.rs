//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Field sets use upstream's FieldsV1 shape: `f:<field>` for object
//! fields, `k:{"name":"web"}` for items of lists merged by key (the same
//! merge keys strategic merge patch uses), `v:<json>` for members of set
//! lists, `.` for an item itself; `{}` is a leaf. Every write records who
//! changed which fields; an apply owns exactly the fields of its
//! configuration, fails on fields another manager owns with a different
//! value unless forced, and removes fields it owned before but no longer
//! applies (if nobody else owns them).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::patch::{merge_key, merges_as_set, strategic_merge};

/// Fields nobody owns: identity and server-managed metadata.
const UNOWNED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// A set of field paths, as a tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

type Path = Vec<String>;

impl FieldSet {
    /// The fields `object` sets: everything but apiVersion/kind, identity
    /// metadata and status, or (`status`) only status, for writes through
    /// the status subresource.
    pub fn of(object: &Value, status: bool) -> Self {
        let mut set = Self::default();
        let Some(map) = object.as_object() else {
            return set;
        };
        for (key, value) in map {
            let skipped = match key.as_str() {
                "status" => !status,
                _ => status || matches!(key.as_str(), "apiVersion" | "kind"),
            };
            if skipped {
                continue;
            }
            let child = set.children.entry(format!("f:{key}")).or_default();
            let mut path = vec![key.clone()];
            if key == "metadata" {
                if let Some(metadata) = value.as_object() {
                    for (field, inner) in metadata {
                        if UNOWNED_METADATA.contains(&field.as_str()) {
                            continue;
                        }
                        path.push(field.clone());
                        collect(
                            inner,
                            &mut path,
                            child.children.entry(format!("f:{field}")).or_default(),
                        );
                        path.pop();
                    }
                }
                continue;
            }
            collect(value, &mut path, child);
        }
        set.prune();
        set
    }

    fn prune(&mut self) {
        self.children.retain(|_, child| {
            child.prune();
            child.member || !child.children.is_empty()
        });
    }

    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Every owned path (members), in order.
    pub fn leaves(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.walk(&mut Vec::new(), &mut out);
        out
    }

    fn walk(&self, path: &mut Path, out: &mut Vec<Path>) {
        if self.member && !path.is_empty() {
            out.push(path.clone());
        }
        for (key, child) in &self.children {
            path.push(key.clone());
            child.walk(path, out);
            path.pop();
        }
    }

    fn contains(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => self.member,
            Some((head, rest)) => self
                .children
                .get(head)
                .is_some_and(|child| child.contains(rest)),
        }
    }

    fn insert(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.member = true,
            Some((head, rest)) => self.children.entry(head.clone()).or_default().insert(rest),
        }
    }

    fn remove(&mut self, path: &[String]) {
        match path.split_first() {
            None => self.member = false,
            Some((head, rest)) => {
                if let Some(child) = self.children.get_mut(head) {
                    child.remove(rest);
                }
            }
        }
        self.prune();
    }

    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".to_owned(), json!({}));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.to_json());
        }
        Value::Object(map)
    }

    pub fn from_json(value: &Value) -> Self {
        let mut set = Self::default();
        match value.as_object() {
            Some(map) if map.is_empty() => set.member = true,
            Some(map) => {
                for (key, child) in map {
                    if key == "." {
                        set.member = true;
                    } else {
                        set.children.insert(key.clone(), Self::from_json(child));
                    }
                }
            }
            None => {}
        }
        set
    }
}

fn collect(value: &Value, path: &mut Path, set: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, inner) in map {
                path.push(key.clone());
                collect(
                    inner,
                    path,
                    set.children.entry(format!("f:{key}")).or_default(),
                );
                path.pop();
            }
        }
        Value::Array(items) => {
            if let Some(key) = merge_key(path) {
                for item in items {
                    let Some(id) = item.get(key) else {
                        // An item without its key: the list is atomic.
                        set.member = true;
                        set.children.clear();
                        return;
                    };
                    let child = set
                        .children
                        .entry(format!("k:{}", json!({ key: id })))
                        .or_default();
                    // The item itself is owned too (FieldsV1's ".").
                    child.member = true;
                    collect(item, path, child);
                }
            } else if merges_as_set(path) {
                for item in items {
                    set.children.entry(format!("v:{item}")).or_default().member = true;
                }
            } else {
                set.member = true;
            }
        }
        _ => set.member = true,
    }
}

/// Walks the field sets of an old and a new object side by side with
/// their values: fields of `after` whose value changed go to the first
/// list, fields of `before` that `after` lacks to the second. A subtree
/// whose value and fields are equal in both is skipped whole, so an
/// update costs in proportion to what it changed: a binding looks at
/// `spec.nodeName`, not at every field.
fn diff(
    before: Option<&FieldSet>,
    after: Option<&FieldSet>,
    (old, new): (Option<&Value>, Option<&Value>),
    path: &mut Path,
    (changed, removed): (&mut Vec<Path>, &mut Vec<Path>),
) {
    // Equal values mostly mean equal field sets, but not always: a list
    // can turn atomic, and duplicate merge keys hide items from `get`.
    if old == new && before == after {
        return;
    }
    let owned_after = after.is_some_and(|s| s.member);
    if !path.is_empty() {
        if owned_after {
            if old != new {
                changed.push(path.clone());
            }
        } else if before.is_some_and(|s| s.member) {
            removed.push(path.clone());
        }
    }
    let keys: std::collections::BTreeSet<&String> = before
        .iter()
        .chain(after.iter())
        .flat_map(|set| set.children.keys())
        .collect();
    for key in keys {
        let step = std::slice::from_ref(key);
        path.push(key.clone());
        diff(
            before.and_then(|s| s.children.get(key)),
            after.and_then(|s| s.children.get(key)),
            (
                old.and_then(|v| get(v, step)),
                new.and_then(|v| get(v, step)),
            ),
            path,
            (changed, removed),
        );
        path.pop();
    }
}

/// The value at a field path, if present.
fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let Some((head, rest)) = path.split_first() else {
        return Some(value);
    };
    let next = if let Some(field) = head.strip_prefix("f:") {
        value.get(field)?
    } else if let Some(key) = head.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        value
            .as_array()?
            .iter()
            .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?
    } else if let Some(member) = head.strip_prefix("v:") {
        let member: Value = serde_json::from_str(member).ok()?;
        value.as_array()?.iter().find(|item| **item == member)?
    } else {
        return None;
    };
    get(next, rest)
}

/// Removes the value at a field path (a `k:` path removes its item).
fn remove(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = value;
    for head in parents {
        let next = if let Some(field) = head.strip_prefix("f:") {
            at.get_mut(field)
        } else if let Some(key) = head.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
                return;
            };
            at.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
            })
        } else {
            None
        };
        let Some(next) = next else { return };
        at = next;
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = at.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(key) = last.strip_prefix("k:") {
        if let (Ok(key), Some(items)) = (
            serde_json::from_str::<Map<String, Value>>(key),
            at.as_array_mut(),
        ) {
            items.retain(|item| !key.iter().all(|(k, v)| item.get(k) == Some(v)));
        }
    } else if let Some(member) = last.strip_prefix("v:")
        && let (Ok(member), Some(items)) =
            (serde_json::from_str::<Value>(member), at.as_array_mut())
    {
        items.retain(|item| *item != member);
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn parse(value: &Value) -> Option<Self> {
        Some(Self {
            manager: value["manager"].as_str()?.to_owned(),
            operation: value["operation"].as_str()?.to_owned(),
            api_version: value["apiVersion"].as_str().unwrap_or_default().to_owned(),
            time: value["time"].as_str().unwrap_or_default().to_owned(),
            subresource: value["subresource"].as_str().map(str::to_owned),
            fields: FieldSet::from_json(&value["fieldsV1"]),
        })
    }

    fn to_json(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_json(),
        });
        if let Some(subresource) = &self.subresource {
            entry["subresource"] = json!(subresource);
        }
        entry
    }
}

fn entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|list| list.iter().filter_map(Entry::parse).collect())
        .unwrap_or_default()
}

fn store_entries(object: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|entry| !entry.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if list.is_empty() {
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("managedFields");
        }
    } else {
        object["metadata"]["managedFields"] = Value::Array(list);
    }
}

/// A write's context: who, through which API version, at what time.
#[derive(Clone, Debug)]
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
    pub subresource: Option<&'a str>,
}

/// Records an Update by `writer`: the fields it changed become its own
/// and leave every other manager; removed fields leave everyone. A request
/// that sets managedFields itself (differently from before) keeps them.
pub fn track_update(old: Option<&Value>, new: &mut Value, writer: &Writer<'_>) {
    let explicit = new["metadata"].get("managedFields");
    let previous = old.and_then(|o| o["metadata"].get("managedFields"));
    if explicit.is_some() && explicit != previous {
        return;
    }
    let mut list = old.map(entries).unwrap_or_default();
    let status = writer.subresource == Some("status");
    let after = FieldSet::of(new, status);
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    match old {
        None => changed = after.leaves(),
        Some(old) => diff(
            Some(&FieldSet::of(old, status)),
            Some(&after),
            (Some(old), Some(new)),
            &mut Vec::new(),
            (&mut changed, &mut removed),
        ),
    }
    if changed.is_empty() && removed.is_empty() {
        match previous {
            Some(previous) => new["metadata"]["managedFields"] = previous.clone(),
            None => store_entries(new, list),
        }
        return;
    }
    for entry in &mut list {
        for path in changed.iter().chain(&removed) {
            entry.fields.remove(path);
        }
    }
    let position = list.iter().position(|e| {
        e.manager == writer.manager
            && e.operation == "Update"
            && e.subresource.as_deref() == writer.subresource
    });
    let entry = match position {
        Some(i) => &mut list[i],
        None => {
            list.push(Entry {
                manager: writer.manager.to_owned(),
                operation: "Update".to_owned(),
                api_version: writer.api_version.to_owned(),
                time: String::new(),
                subresource: writer.subresource.map(str::to_owned),
                fields: FieldSet::default(),
            });
            let last = list.len() - 1;
            &mut list[last]
        }
    };
    entry.time = writer.now.to_owned();
    for path in &changed {
        entry.fields.insert(path);
    }
    store_entries(new, list);
}

/// A field another manager owns with a different value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    /// Upstream's rendering: `.spec.replicas`, `.spec.containers[name="web"].image`.
    pub field: String,
}

fn render_path(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(member) = element.strip_prefix("v:") {
            out.push_str(&format!("[={member}]"));
        }
    }
    out
}

/// Server-side apply of `config` over `live` (absent: a create). Returns
/// the object to store, with managedFields, or the conflicts.
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    writer: &Writer<'_>,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let applied = FieldSet::of(config, writer.subresource == Some("status"));
    let applied_leaves = applied.leaves();
    let mut list = live.map(entries).unwrap_or_default();
    let base = live.cloned().unwrap_or_else(|| json!({}));
    let mine = |e: &Entry| {
        e.manager == writer.manager
            && e.operation == "Apply"
            && e.subresource.as_deref() == writer.subresource
    };
    let mut conflicts = Vec::new();
    // Managers are (name, operation) pairs: a tool's own Updates conflict
    // with its Applies, as upstream's do.
    for entry in list.iter_mut().filter(|e| !mine(e)) {
        let clashing: Vec<Path> = applied_leaves
            .iter()
            .filter(|path| entry.fields.contains(path))
            // Owning the same list item is not a conflict; its fields are.
            .filter(|path| !path.last().is_some_and(|last| last.starts_with("k:")))
            .filter(|path| get(&base, path) != get(config, path))
            .cloned()
            .collect();
        if force {
            for path in &clashing {
                entry.fields.remove(path);
            }
        } else {
            conflicts.extend(clashing.iter().map(|path| Conflict {
                manager: entry.manager.clone(),
                api_version: entry.api_version.clone(),
                field: render_path(path),
            }));
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let previous = list
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut result = base;
    let mut dropped: Vec<Path> = previous
        .leaves()
        .into_iter()
        .filter(|path| !applied.contains(path))
        .filter(|path| {
            !list
                .iter()
                .filter(|e| !mine(e))
                .any(|e| e.fields.contains(path))
        })
        .collect();
    // Deepest first, so an item's fields go before the item.
    dropped.sort_by_key(|path| std::cmp::Reverse(path.len()));
    for path in &dropped {
        remove(&mut result, path);
    }
    let mut merged = strategic_merge(&result, config, &mut Vec::new());
    let mut unchanged = merged.clone();
    unchanged["metadata"]["managedFields"] =
        live.map_or(Value::Null, |l| l["metadata"]["managedFields"].clone());
    if previous == applied && live.is_some_and(|live| *live == unchanged) {
        // Re-applying the same configuration changes nothing, not even
        // the entry's timestamp.
        return Ok(unchanged);
    }
    list.retain(|e| !mine(e));
    list.push(Entry {
        manager: writer.manager.to_owned(),
        operation: "Apply".to_owned(),
        api_version: writer.api_version.to_owned(),
        time: writer.now.to_owned(),
        subresource: writer.subresource.map(str::to_owned),
        fields: applied,
    });
    store_entries(&mut merged, list);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "apps/v1",
            now: "2026-01-01T00:00:00Z",
            subresource: None,
        }
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}},
        })
    }

    /// The side-by-side diff finds what comparing every field of both
    /// objects finds (the definition it shortcuts).
    #[test]
    fn the_diff_matches_a_field_by_field_comparison() {
        let base = json!({
            "metadata": {"name": "p", "labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]},
            "spec": {
                "containers": [{"name": "c", "image": "v1", "args": ["a"]}, {"name": "d", "image": "v1"}],
                "tolerations": [{"key": "k"}],
            },
            "status": {"conditions": [{"type": "Ready", "status": "False"}]},
        });
        let edits: [fn(&mut Value); 6] = [
            |o| o["spec"]["nodeName"] = json!("n1"),
            |o| o["metadata"]["labels"] = json!({"a": "1", "c": "3"}),
            |o| o["metadata"]["finalizers"] = json!(["y", "z"]),
            |o| o["spec"]["containers"] = json!([{"name": "c", "image": "v2", "args": ["b"]}]),
            |o| o["spec"]["tolerations"] = json!([{"key": "k", "effect": "NoExecute"}]),
            |o| o["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}]),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut next = base.clone();
            edit(&mut next);
            for status in [false, true] {
                let (before, after) = (FieldSet::of(&base, status), FieldSet::of(&next, status));
                let expected_changed: Vec<Path> = after
                    .leaves()
                    .into_iter()
                    .filter(|path| get(&base, path) != get(&next, path))
                    .collect();
                let expected_removed: Vec<Path> = before
                    .leaves()
                    .into_iter()
                    .filter(|path| !after.contains(path))
                    .collect();
                let (mut changed, mut removed) = (Vec::new(), Vec::new());
                diff(
                    Some(&before),
                    Some(&after),
                    (Some(&base), Some(&next)),
                    &mut Vec::new(),
                    (&mut changed, &mut removed),
                );
                assert_eq!(changed, expected_changed, "edit {i}, status {status}");
                assert_eq!(removed, expected_removed, "edit {i}, status {status}");
                // Edit 5 changes status only.
                assert_eq!(
                    !changed.is_empty() || !removed.is_empty(),
                    status == (i == 5),
                    "edit {i} shows through its own subresource only"
                );
            }
        }
    }

    #[test]
    fn field_sets_use_upstream_shapes() {
        let set = FieldSet::of(&deployment(2, "nginx"), false);
        let fields = set.to_json();
        assert_eq!(fields["f:metadata"]["f:labels"]["f:app"], json!({}));
        let container =
            &fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(container["."], json!({}));
        assert_eq!(container["f:image"], json!({}));
        assert!(fields["f:metadata"].get("f:name").is_none());
        assert_eq!(FieldSet::from_json(&fields), set);
    }

    #[test]
    fn apply_conflicts_with_another_owner_unless_forced() {
        let created = apply(None, &deployment(2, "nginx"), &writer("alice"), false).unwrap();
        let conflicts = apply(
            Some(&created),
            &deployment(3, "nginx"),
            &writer("bob"),
            false,
        )
        .unwrap_err();
        assert_eq!(
            conflicts,
            [Conflict {
                manager: "alice".into(),
                api_version: "apps/v1".into(),
                field: ".spec.replicas".into()
            }]
        );
        // Same values are shared ownership, not a conflict.
        let shared = apply(
            Some(&created),
            &deployment(2, "nginx"),
            &writer("bob"),
            false,
        )
        .unwrap();
        assert_eq!(
            shared["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let forced = apply(
            Some(&created),
            &deployment(3, "nginx"),
            &writer("bob"),
            true,
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let alice = &forced["metadata"]["managedFields"][0];
        assert!(
            alice["fieldsV1"]["f:spec"].get("f:replicas").is_none(),
            "{alice}"
        );
    }

    #[test]
    fn dropping_a_field_from_the_config_removes_it() {
        let mut config = deployment(2, "nginx");
        config["metadata"]["labels"]["tier"] = json!("front");
        let created = apply(None, &config, &writer("alice"), false).unwrap();
        let applied = apply(
            Some(&created),
            &deployment(2, "nginx"),
            &writer("alice"),
            false,
        )
        .unwrap();
        assert_eq!(applied["metadata"]["labels"], json!({"app": "web"}));
    }

    #[test]
    fn updates_take_ownership_of_what_they_change() {
        let created = apply(None, &deployment(2, "nginx"), &writer("alice"), false).unwrap();
        let mut scaled = created.clone();
        scaled["spec"]["replicas"] = json!(5);
        track_update(Some(&created), &mut scaled, &writer("kubectl-scale"));
        let entries = scaled["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries[1]["manager"], "kubectl-scale");
        assert_eq!(
            entries[1]["fieldsV1"],
            json!({"f:spec": {"f:replicas": {}}})
        );
        assert!(entries[0]["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        let mut same = scaled.clone();
        track_update(Some(&scaled), &mut same, &writer("other"));
        assert_eq!(same, scaled, "an unchanged object keeps its managedFields");
        let mut reported = scaled.clone();
        reported["status"] = json!({"readyReplicas": 5});
        let status_writer = Writer {
            subresource: Some("status"),
            ..writer("controller")
        };
        track_update(Some(&scaled), &mut reported, &status_writer);
        let entries = reported["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries[2]["subresource"], "status");
        assert_eq!(
            entries[2]["fieldsV1"],
            json!({"f:status": {"f:readyReplicas": {}}})
        );
    }
}
