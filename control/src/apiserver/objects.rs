//! The verbs on stored objects: get, list, create, update (with optimistic
//! concurrency), delete (graceful, with finalizers and preconditions),
//! deletecollection, and the subresource writes built on update.
//!
//! Every write goes through one store transaction that checks the key's
//! mod revision, so a write is whole or absent, and a stale
//! resourceVersion is a 409, never a lost update.

use std::collections::HashSet;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use chrono::{SecondsFormat, Utc};
use rand::Rng as _;
use serde_json::{Value, json};

use super::{
    App,
    allocation::{self, Plan},
    kinds::{ResourceType, certificates},
    managed::{self, Writer},
    selectors::{FieldSelector, LabelSelector},
    status::{ApiError, Cause},
    stored::Listed,
};
use crate::store::{Check, KeyValue, Op, RangeRequest, Revision, Store, Txn, TxnOutcome};

/// How unknown fields in a request body are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("" | "Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of \"Ignore\", \"Warn\" or \"Strict\", got {other:?}"
            ))),
        }
    }
}

/// Options every write takes.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    /// Who is writing, for managedFields (`fieldManager`, else the
    /// User-Agent's product name, as upstream).
    pub field_manager: String,
}

impl WriteOptions {
    fn writer<'a>(&'a self, rt: &'a ResourceType, now: &'a str, mode: UpdateMode) -> Writer<'a> {
        Writer {
            manager: &self.field_manager,
            api_version: rt.api_version,
            now,
            subresource: mode.subresource(),
        }
    }
}

/// A write's result: the object as stored and warnings for the client.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub warnings: Vec<String>,
}

/// Which part of an object an update may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateMode {
    /// Everything but status (for kinds with a status subresource).
    Main,
    /// Only status.
    Status,
    /// A pod's binding: written as it is proposed, as upstream's binding
    /// storage writes it (a guaranteed update of `nodeName`,
    /// `PodScheduled` and annotations, without the update strategy,
    /// admission or field manager; the scheduler's one write per pod).
    Binding,
    /// A CertificateSigningRequest's `Approved`/`Denied` conditions.
    Approval,
}

impl UpdateMode {
    /// The subresource an update of this mode goes through, if any.
    pub fn subresource(self) -> Option<&'static str> {
        match self {
            Self::Status => Some("status"),
            Self::Approval => Some("approval"),
            Self::Main | Self::Binding => None,
        }
    }
}

/// Query and body options of a delete.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub grace_period: Option<i64>,
    pub propagation: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

impl DeleteOptions {
    /// Merges a `DeleteOptions` body over the query's options.
    pub fn with_body(mut self, body: &Value) -> Result<Self, ApiError> {
        if body.is_null() {
            return Ok(self);
        }
        if !body.is_object() {
            return Err(ApiError::bad_request("DeleteOptions must be a JSON object"));
        }
        if let Some(grace) = body.get("gracePeriodSeconds").and_then(Value::as_i64) {
            self.grace_period = Some(grace);
        }
        if let Some(policy) = body.get("propagationPolicy").and_then(Value::as_str) {
            self.propagation = Some(policy.to_owned());
        }
        if body.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
            self.propagation.get_or_insert_with(|| "Orphan".to_owned());
        }
        let preconditions = &body["preconditions"];
        if let Some(uid) = preconditions.get("uid").and_then(Value::as_str) {
            self.uid = Some(uid.to_owned());
        }
        if let Some(rv) = preconditions.get("resourceVersion").and_then(Value::as_str) {
            self.resource_version = Some(rv.to_owned());
        }
        if body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| !d.is_empty())
        {
            self.dry_run = true;
        }
        Ok(self)
    }
}

/// A list request's parameters.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: usize,
    pub continue_token: Option<String>,
    /// Read at exactly this revision (`resourceVersionMatch=Exact`).
    pub exact_revision: Option<Revision>,
}

/// One page of a list.
#[derive(Debug)]
pub struct ListPage<T = Value> {
    pub items: Vec<T>,
    pub revision: Revision,
    pub continue_token: Option<String>,
}

/// Keys read per store round trip while filtering a selector list.
const LIST_CHUNK: usize = 500;

/// Longest grace period honoured (a year); longer ones are cut to it, so
/// deadlines always fit in a timestamp.
const MAX_GRACE_SECONDS: i64 = 365 * 24 * 3600;

/// Attempts of an unconditional update that keeps losing races.
pub(super) const UPDATE_ATTEMPTS: usize = 16;

pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn new_uid() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // An RFC 4122 version-4 layout, as upstream's UIDs.
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        ["8", "9", "a", "b"][usize::from(bytes[8] & 3)],
        &hex[17..20],
        &hex[20..32]
    )
}

/// Upstream's generateName suffix: five characters without vowels or
/// look-alikes.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn parse_revision(value: &str) -> Result<Revision, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {value:?}")))
}

/// The continue token: base64 of the list revision and the next key,
/// relative to the resource prefix, as upstream encodes it.
fn encode_continue(revision: Revision, next_key: &str) -> String {
    STANDARD.encode(json!({ "v": "meta.k8s.io/v1", "rv": revision, "start": next_key }).to_string())
}

fn decode_continue(token: &str) -> Result<(Revision, String), ApiError> {
    let invalid = || ApiError::bad_request("continue key is not valid: malformed token");
    let bytes = STANDARD.decode(token).map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let revision = value["rv"].as_i64().ok_or_else(invalid)?;
    let start = value["start"].as_str().ok_or_else(invalid)?;
    if start.contains("..") || start.starts_with('/') {
        return Err(invalid());
    }
    Ok((revision, start.to_owned()))
}

/// Whether two objects differ at most in `metadata.resourceVersion`
/// (compared in place: an update's no-op check runs on every write).
fn same_but_resource_version(a: &Value, b: &Value) -> bool {
    /// Equal maps but for the entry `skip`, which is compared at the
    /// level below for "metadata" and ignored for "resourceVersion".
    fn same(
        a: &serde_json::Map<String, Value>,
        b: &serde_json::Map<String, Value>,
        skip: &str,
    ) -> bool {
        let count =
            |m: &serde_json::Map<String, Value>| m.len() - usize::from(m.contains_key(skip));
        count(a) == count(b)
            && a.iter()
                .filter(|(k, _)| *k != skip)
                .all(|(k, v)| b.get(k) == Some(v))
    }
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let metadata = (
                a.get("metadata").and_then(Value::as_object),
                b.get("metadata").and_then(Value::as_object),
            );
            same(a, b, "metadata")
                && match metadata {
                    (Some(x), Some(y)) => same(x, y, "resourceVersion"),
                    _ => a.get("metadata") == b.get("metadata"),
                }
        }
        _ => a == b,
    }
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"][field].as_str().filter(|s| !s.is_empty())
}

impl<S: Store> App<S> {
    fn namespace_for<'a>(&self, rt: &ResourceType, namespace: Option<&'a str>) -> Option<&'a str> {
        if rt.namespaced { namespace } else { None }
    }

    /// One object and its store record.
    pub async fn get_object(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(Value, KeyValue), ApiError> {
        let key = rt.key(self.namespace_for(rt, namespace), name);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| ApiError::NotFound(rt.subject(name)))?;
        Ok((self.decode(&kv, kv.mod_revision)?, kv))
    }

    /// The key prefix of a collection: all namespaces or one.
    pub fn collection_prefix(&self, rt: &ResourceType, namespace: Option<&str>) -> String {
        match self.namespace_for(rt, namespace) {
            Some(namespace) => format!("{}{namespace}/", rt.key_prefix()),
            None => rt.key_prefix(),
        }
    }

    /// A page of matching objects, consistent at one revision.
    pub async fn list_objects(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        params: &ListParams,
    ) -> Result<ListPage, ApiError> {
        let page = self.list_stored(rt, namespace, params).await?;
        Ok(ListPage {
            items: page
                .items
                .into_iter()
                .map(Listed::into_object)
                .collect::<Result<_, _>>()?,
            revision: page.revision,
            continue_token: page.continue_token,
        })
    }

    /// [`Self::list_objects`] as stored: objects are decoded only to
    /// match a selector.
    pub async fn list_stored(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        params: &ListParams,
    ) -> Result<ListPage<Listed>, ApiError> {
        let prefix = self.collection_prefix(rt, namespace);
        let (mut revision, mut start) = match &params.continue_token {
            Some(token) => {
                let (revision, relative) = decode_continue(token)?;
                (revision, format!("{prefix}{relative}"))
            }
            None => (params.exact_revision.unwrap_or(0), prefix.clone()),
        };
        let filtering = !params.labels.is_empty() || !params.fields.is_empty();
        let mut items = Vec::new();
        loop {
            let want = if params.limit == 0 {
                0
            } else {
                params.limit - items.len()
            };
            let chunk = if filtering && want > 0 {
                want.max(LIST_CHUNK)
            } else {
                want
            };
            let range = self
                .store
                .range(RangeRequest {
                    prefix: prefix.clone(),
                    start: Some(start.clone()),
                    limit: chunk,
                    revision,
                })
                .await
                .map_err(|error| match (error, &params.continue_token) {
                    (crate::store::StoreError::Compacted { .. }, Some(_)) => ApiError::Gone {
                        message: "The provided continue parameter is too old to display a \
                                  consistent list result. You can start a new list without \
                                  the continue parameter."
                            .to_owned(),
                    },
                    (error, _) => error.into(),
                })?;
            revision = range.revision;
            let read = range.kvs.len();
            let mut consumed = 0;
            let mut last_key = None;
            for kv in range.kvs {
                consumed += 1;
                let (key, written) = (kv.key.clone(), kv.mod_revision);
                last_key = Some(key.clone());
                let mut item = Listed::new(key, self.plain(kv)?, written);
                if filtering {
                    let object = item.object()?;
                    if !(params.labels.matches(object) && params.fields.matches(object)) {
                        continue;
                    }
                }
                items.push(item);
                if params.limit > 0 && items.len() == params.limit {
                    break;
                }
            }
            let consumed_all = consumed == read;
            let more = range.more || !consumed_all;
            let full = params.limit > 0 && items.len() == params.limit;
            match (more, last_key) {
                (true, Some(last)) if full => {
                    let next = format!("{last}\0");
                    let relative = next.strip_prefix(&prefix).unwrap_or(&next).to_owned();
                    return Ok(ListPage {
                        items,
                        revision,
                        continue_token: Some(encode_continue(revision, &relative)),
                    });
                }
                (true, Some(last)) => start = format!("{last}\0"),
                _ => {
                    return Ok(ListPage {
                        items,
                        revision,
                        continue_token: None,
                    });
                }
            }
        }
    }

    /// Decodes, defaults and validates a body the way every write does;
    /// unknown fields become warnings or a 400 per `fieldValidation`.
    fn admit(
        &self,
        rt: &ResourceType,
        object: &Value,
        options: &WriteOptions,
    ) -> Result<(Value, Vec<String>), ApiError> {
        let normalized = rt.codec.normalize(object)?;
        let unknown: Vec<String> = normalized
            .unknown
            .iter()
            .map(|path| format!("unknown field \"{path}\""))
            .collect();
        if options.field_validation == FieldValidation::Strict && !unknown.is_empty() {
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                unknown.join(", ")
            )));
        }
        if !normalized.causes.is_empty() {
            let name = meta_str(&normalized.object, "name").unwrap_or_default();
            return Err(rt.invalid(name, normalized.causes));
        }
        let warnings = match options.field_validation {
            FieldValidation::Warn => unknown,
            FieldValidation::Ignore | FieldValidation::Strict => Vec::new(),
        };
        Ok((normalized.object, warnings))
    }

    fn check_type_meta(rt: &ResourceType, object: &Value) -> Result<(), ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: the body is not a JSON object",
                rt.kind, rt.version, rt.kind
            )));
        }
        if let Some(api_version) = object["apiVersion"].as_str()
            && api_version != rt.api_version
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                rt.api_version
            )));
        }
        if let Some(kind) = object["kind"].as_str()
            && kind != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        Ok(())
    }

    /// Upstream's Priority admission: a new pod's `spec.priority` (and
    /// `preemptionPolicy`, unless set) come from its PriorityClass, or
    /// from the class marked `globalDefault`, else priority 0. A class
    /// that does not exist refuses the pod.
    async fn resolve_priority(&self, pods: &ResourceType, pod: &mut Value) -> Result<(), ApiError> {
        let Some(classes) = self
            .registry
            .find("scheduling.k8s.io", "v1", "priorityclasses")
        else {
            return Ok(());
        };
        let named = pod["spec"]["priorityClassName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let class = match &named {
            Some(name) => match self.get_object(classes, None, name).await {
                Ok((class, _)) => Some(class),
                Err(ApiError::NotFound(_)) => {
                    return Err(ApiError::Forbidden {
                        subject: pods.subject(meta_str(pod, "name").unwrap_or_default()),
                        message: format!("no PriorityClass with name {name} was found"),
                    });
                }
                Err(error) => return Err(error),
            },
            None => self
                .list_objects(classes, None, &ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|class| class["globalDefault"] == json!(true)),
        };
        if !pod["spec"].is_object() {
            return Ok(());
        }
        let spec = &mut pod["spec"];
        match class {
            Some(class) => {
                spec["priorityClassName"] = class["metadata"]["name"].clone();
                spec["priority"] = class["value"].clone();
                if spec["preemptionPolicy"].is_null() {
                    spec["preemptionPolicy"] = class
                        .get("preemptionPolicy")
                        .cloned()
                        .unwrap_or_else(|| json!("PreemptLowerPriority"));
                }
            }
            None => spec["priority"] = json!(0),
        }
        Ok(())
    }

    /// The namespace must exist and not be terminating.
    async fn check_namespace(&self, rt: &ResourceType, namespace: &str) -> Result<(), ApiError> {
        let namespaces = self
            .registry
            .find("", "v1", "namespaces")
            .ok_or_else(|| ApiError::internal("namespaces are not registered"))?;
        let (object, _) = self.get_object(namespaces, None, namespace).await?;
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Err(ApiError::Forbidden {
                subject: rt.subject(""),
                message: format!(
                    "unable to create new content in namespace {namespace} because it is being terminated"
                ),
            });
        }
        Ok(())
    }

    pub async fn create_object(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        mut object: Value,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        Self::check_type_meta(rt, &object)?;
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let namespace = self.namespace_for(rt, namespace);
        let metadata = &mut object["metadata"];
        match (
            rt.namespaced,
            namespace,
            metadata["namespace"].as_str().filter(|n| !n.is_empty()),
        ) {
            (true, Some(url), Some(body)) if url != body => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (true, Some(url), _) => metadata["namespace"] = json!(url),
            (true, None, _) => {
                return Err(ApiError::bad_request(
                    "a namespace is required to create this object",
                ));
            }
            (false, ..) => {
                if let Some(map) = metadata.as_object_mut() {
                    map.remove("namespace");
                }
            }
        }
        if metadata["name"].as_str().is_none_or(str::is_empty)
            && let Some(prefix) = metadata["generateName"].as_str().filter(|p| !p.is_empty())
        {
            metadata["name"] = json!(format!("{prefix}{}", name_suffix()));
        }
        if meta_str(&object, "resourceVersion").is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let metadata = &mut object["metadata"];
        metadata["uid"] = json!(new_uid());
        metadata["creationTimestamp"] = json!(now_rfc3339());
        if let Some(map) = metadata.as_object_mut() {
            map.remove("deletionTimestamp");
            map.remove("deletionGracePeriodSeconds");
            map.remove("selfLink");
        }
        if object.get("spec").is_some() {
            object["metadata"]["generation"] = json!(1);
        }
        // Status is the system's to write (through /status); a Node's
        // agent registers it with its status, as upstream allows.
        if rt.status
            && !(rt.group.is_empty() && rt.plural == "nodes")
            && let Some(map) = object.as_object_mut()
        {
            map.remove("status");
        }
        if rt.group.is_empty() && rt.plural == "pods" {
            self.tolerations.apply(&mut object);
            self.resolve_priority(rt, &mut object).await?;
        }
        let (mut object, warnings) = self.admit(rt, &object, options)?;
        let now = now_rfc3339();
        managed::track_update(
            None,
            &mut object,
            &options.writer(rt, &now, UpdateMode::Main),
        );
        let name = meta_str(&object, "name").unwrap_or_default().to_owned();
        if let Some(namespace) = namespace {
            self.check_namespace(rt, namespace).await?;
        }
        if options.dry_run {
            return Ok(Written { object, warnings });
        }
        let key = rt.key(namespace, &name);
        let mut taken = HashSet::new();
        for _ in 0..UPDATE_ATTEMPTS {
            let mut object = object.clone();
            let extras = self.plan_extras(rt, &name, None, Some(&mut object), &taken)?;
            let mut txn = Txn::create(&key, self.encode(&key, &mut object));
            extras.add_to(&mut txn, &key);
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    object["metadata"]["resourceVersion"] = json!(revision.to_string());
                    return Ok(Written { object, warnings });
                }
                TxnOutcome::Rejected { current } if current[0].is_some() => {
                    return Err(ApiError::AlreadyExists(rt.subject(&name)));
                }
                TxnOutcome::Rejected { current } => {
                    self.claim_lost(rt, &name, &extras, &current, &mut taken)
                        .await?;
                }
            }
        }
        Err(self.conflict(rt, &name))
    }

    /// What a write must claim and release besides the object itself.
    fn plan_extras(
        &self,
        rt: &ResourceType,
        name: &str,
        previous: Option<&Value>,
        next: Option<&mut Value>,
        taken: &HashSet<String>,
    ) -> Result<Plan, ApiError> {
        if !(rt.group.is_empty() && rt.plural == "services") {
            return Ok(Plan::default());
        }
        match next {
            Some(next) => self
                .ranges
                .plan(previous, next, taken)
                .map_err(|causes| rt.invalid(name, causes)),
            None => Ok(Plan {
                claims: Vec::new(),
                releases: previous.map(allocation::held).unwrap_or_default(),
            }),
        }
    }

    /// After a transaction failed on a claim (`current[1..]`, in claim
    /// order): a value the user asked for is an error; a random pick that
    /// lost a race is retried with what is taken now.
    async fn claim_lost(
        &self,
        rt: &ResourceType,
        name: &str,
        extras: &Plan,
        current: &[Option<KeyValue>],
        taken: &mut HashSet<String>,
    ) -> Result<(), ApiError> {
        let lost = extras
            .claims
            .iter()
            .zip(current.iter().skip(1))
            .find(|(_, holder)| holder.is_some());
        if let Some((claim, _)) = lost
            && claim.requested
        {
            return Err(rt.invalid(name, vec![claim.taken()]));
        }
        taken.clear();
        for prefix in allocation::CLAIM_PREFIXES {
            let range = self
                .store
                .range(RangeRequest {
                    prefix: prefix.to_owned(),
                    ..RangeRequest::default()
                })
                .await?;
            taken.extend(range.kvs.into_iter().map(|kv| kv.key));
        }
        Ok(())
    }

    /// Applies `mutate` to the current object and writes the result if
    /// the object did not change in between; retries lost races unless
    /// the caller pinned a resourceVersion (then it is a 409).
    pub async fn update_object(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        mode: UpdateMode,
        options: &WriteOptions,
        mutate: impl Fn(&Value) -> Result<Value, ApiError>,
    ) -> Result<Written, ApiError> {
        let namespace = self.namespace_for(rt, namespace);
        let key = rt.key(namespace, name);
        let mut taken = HashSet::new();
        for _ in 0..UPDATE_ATTEMPTS {
            let (current, kv) = self.get_object(rt, namespace, name).await?;
            let proposed = mutate(&current)?;
            Self::check_type_meta(rt, &proposed)?;
            let pinned = match meta_str(&proposed, "resourceVersion") {
                Some(rv) => Some(parse_revision(rv)?),
                None => None,
            };
            if pinned.is_some_and(|rv| rv != kv.mod_revision) {
                return Err(self.conflict(rt, name));
            }
            let (mut next, warnings) = if mode == UpdateMode::Binding {
                (proposed, Vec::new())
            } else {
                let next = self.prepare_update(rt, namespace, name, &current, proposed, mode)?;
                let (mut next, warnings) = self.admit(rt, &next, options)?;
                let now = now_rfc3339();
                managed::track_update(Some(&current), &mut next, &options.writer(rt, &now, mode));
                (next, warnings)
            };
            if same_but_resource_version(&next, &current) {
                // A no-op update writes nothing and keeps resourceVersion.
                return Ok(Written {
                    object: current,
                    warnings,
                });
            }
            if options.dry_run {
                return Ok(Written {
                    object: next,
                    warnings,
                });
            }
            // The last finalizer's removal deletes, unless a grace period
            // is still running (a pod's agent deletes it with grace 0).
            let finished = next["metadata"]["deletionTimestamp"].is_string()
                && next["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
                && next["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(0)
                    == 0
                && finalizers_done(rt, &next);
            let (mut txn, extras) = if finished {
                let extras = self.plan_extras(rt, name, Some(&current), None, &taken)?;
                (Txn::delete(&key, kv.mod_revision), extras)
            } else {
                let extras = self.plan_extras(rt, name, Some(&current), Some(&mut next), &taken)?;
                (
                    Txn::update(&key, kv.mod_revision, self.encode(&key, &mut next)),
                    extras,
                )
            };
            extras.add_to(&mut txn, &key);
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    next["metadata"]["resourceVersion"] = json!(revision.to_string());
                    return Ok(Written {
                        object: next,
                        warnings,
                    });
                }
                TxnOutcome::Rejected { current }
                    if current[0].as_ref().map(|kv| kv.mod_revision) == Some(kv.mod_revision) =>
                {
                    self.claim_lost(rt, name, &extras, &current, &mut taken)
                        .await?;
                }
                TxnOutcome::Rejected { .. } if pinned.is_some() => {
                    return Err(self.conflict(rt, name));
                }
                TxnOutcome::Rejected { .. } => {}
            }
        }
        Err(self.conflict(rt, name))
    }

    fn conflict(&self, rt: &ResourceType, name: &str) -> ApiError {
        ApiError::Conflict {
            subject: rt.subject(name),
            reason: "the object has been modified; please apply your changes to the latest version and try again"
                .to_owned(),
        }
    }

    /// Keeps what an update may not change, and bumps generation when the
    /// spec changed.
    fn prepare_update(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        current: &Value,
        mut next: Value,
        mode: UpdateMode,
    ) -> Result<Value, ApiError> {
        if !next["metadata"].is_object() {
            return Err(ApiError::bad_request("metadata is required"));
        }
        match meta_str(&next, "name") {
            Some(body) if body != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body}) does not match the name on the URL ({name})"
                )));
            }
            _ => next["metadata"]["name"] = json!(name),
        }
        match (namespace, meta_str(&next, "namespace")) {
            (Some(url), Some(body)) if url != body => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(url), _) => next["metadata"]["namespace"] = json!(url),
            (None, _) => {}
        }
        if mode == UpdateMode::Status {
            let mut merged = current.clone();
            merged["status"] = next["status"].take();
            // An apply through /status brings its own managedFields.
            if let Some(managed) = next["metadata"].get("managedFields")
                && current["metadata"].get("managedFields") != Some(managed)
            {
                merged["metadata"]["managedFields"] = managed.clone();
            }
            next = merged;
        } else if rt.status && mode == UpdateMode::Main {
            next["status"] = current["status"].clone();
        }
        if rt.group == "certificates.k8s.io" && rt.plural == certificates::PLURAL {
            certificates::keep_on_update(current, &mut next, mode);
        }
        // A node's pods are addressed from its podCIDR and other nodes
        // route it: once set, it stays (as upstream's validation has it),
        // so a node IPAM acting on a stale view cannot move it.
        if rt.group.is_empty() && rt.plural == "nodes" {
            for field in ["podCIDR", "podCIDRs"] {
                let before = &current["spec"][field];
                let set = before.as_str().is_some_and(|c| !c.is_empty())
                    || before.as_array().is_some_and(|c| !c.is_empty());
                if set && next["spec"][field] != *before {
                    return Err(rt.invalid(
                        name,
                        vec![Cause::forbidden(
                            format!("spec.{field}"),
                            "node updates may not change podCIDR except from \"\" to valid",
                        )],
                    ));
                }
            }
        }
        if next["metadata"].get("managedFields").is_none()
            && let Some(managed) = current["metadata"].get("managedFields")
        {
            // Omitted managedFields are kept; only a request that sets
            // them replaces them (as upstream).
            next["metadata"]["managedFields"] = managed.clone();
        }
        // An update naming another uid is for a deleted namesake (the
        // precondition controllers rely on when they adopt objects).
        if let (Some(sent), Some(stored)) = (meta_str(&next, "uid"), meta_str(current, "uid"))
            && sent != stored
        {
            return Err(ApiError::Conflict {
                subject: rt.subject(name),
                reason: format!(
                    "Precondition failed: UID in precondition: {sent}, UID in object meta: {stored}"
                ),
            });
        }
        let metadata = &mut next["metadata"];
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match current["metadata"].get(field) {
                Some(value) => metadata[field] = value.clone(),
                None => {
                    if let Some(map) = metadata.as_object_mut() {
                        map.remove(field);
                    }
                }
            }
        }
        // Finalizers may be removed from a deleting object, never added.
        if current["metadata"]["deletionTimestamp"].is_string() {
            let before: Vec<&Value> = current["metadata"]["finalizers"]
                .as_array()
                .map(|f| f.iter().collect())
                .unwrap_or_default();
            let added = next["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|after| after.iter().any(|f| !before.contains(&f)));
            if added {
                return Err(rt.invalid(
                    name,
                    vec![Cause::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        if current.get("spec") != next.get("spec")
            && current["metadata"].get("generation").is_some()
        {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(generation + 1);
        }
        Ok(next)
    }

    /// Deletes now, or marks for deletion when finalizers or a pod's
    /// grace period say so. Returns the object (as last stored).
    pub async fn delete_object(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let namespace = self.namespace_for(rt, namespace);
        let key = rt.key(namespace, name);
        for _ in 0..UPDATE_ATTEMPTS {
            let (current, kv) = self.get_object(rt, namespace, name).await?;
            if let Some(uid) = &options.uid
                && meta_str(&current, "uid") != Some(uid.as_str())
            {
                return Err(ApiError::Conflict {
                    subject: rt.subject(name),
                    reason: format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&current, "uid").unwrap_or_default()
                    ),
                });
            }
            if let Some(rv) = &options.resource_version
                && parse_revision(rv)? != kv.mod_revision
            {
                return Err(ApiError::Conflict {
                    subject: rt.subject(name),
                    reason: format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        kv.mod_revision
                    ),
                });
            }
            let marked = self.mark_for_deletion(rt, &current, options);
            if options.dry_run {
                return Ok(marked.unwrap_or(current));
            }
            let mut marked = marked;
            let txn = match &mut marked {
                Some(next) if *next == current => return Ok(current),
                Some(next) => Txn::update(&key, kv.mod_revision, self.encode(&key, next)),
                None => {
                    let mut txn = Txn::delete(&key, kv.mod_revision);
                    self.plan_extras(rt, name, Some(&current), None, &HashSet::new())?
                        .add_to(&mut txn, &key);
                    txn
                }
            };
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    let mut object = marked.unwrap_or(current);
                    object["metadata"]["resourceVersion"] = json!(revision.to_string());
                    return Ok(object);
                }
                TxnOutcome::Rejected { .. } if options.resource_version.is_some() => {
                    return Err(self.conflict(rt, name));
                }
                TxnOutcome::Rejected { .. } => {}
            }
        }
        Err(self.conflict(rt, name))
    }

    /// The object marked as deleting, or `None` to delete it now.
    fn mark_for_deletion(
        &self,
        rt: &ResourceType,
        current: &Value,
        options: &DeleteOptions,
    ) -> Option<Value> {
        let mut next = current.clone();
        let mut finalizers: Vec<Value> = current["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let policy_finalizer = match options.propagation.as_deref() {
            Some("Orphan") => Some("orphan"),
            Some("Foreground") => Some("foregroundDeletion"),
            _ => None,
        };
        if let Some(finalizer) = policy_finalizer
            && !finalizers.iter().any(|f| f == finalizer)
        {
            finalizers.push(json!(finalizer));
        }
        let already_deleting = current["metadata"]["deletionTimestamp"].is_string();
        // A pod bound to a node ends gracefully: the node's agent stops it
        // and deletes it with grace period 0.
        let pod_grace = if rt.plural == "pods" && rt.group.is_empty() {
            let bound = current["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let finished = matches!(
                current["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            );
            let grace = options
                .grace_period
                .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .clamp(0, MAX_GRACE_SECONDS);
            (bound && !finished && grace > 0).then_some(grace)
        } else {
            None
        };
        let namespace_pending = rt.plural == "namespaces"
            && rt.group.is_empty()
            && current["spec"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
        if finalizers.is_empty() && pod_grace.is_none() && !namespace_pending {
            return None;
        }
        if !finalizers.is_empty() {
            next["metadata"]["finalizers"] = Value::Array(finalizers);
        }
        if !already_deleting {
            let grace = pod_grace.unwrap_or(0);
            let at = Utc::now() + chrono::Duration::seconds(grace);
            next["metadata"]["deletionTimestamp"] =
                json!(at.to_rfc3339_opts(SecondsFormat::Secs, true));
            next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            if namespace_pending {
                next["status"]["phase"] = json!("Terminating");
            }
        } else if let Some(grace) = pod_grace {
            // A shorter grace period shortens a deletion in progress.
            let current_grace = current["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(i64::MAX);
            if grace < current_grace {
                let at = Utc::now() + chrono::Duration::seconds(grace);
                next["metadata"]["deletionTimestamp"] =
                    json!(at.to_rfc3339_opts(SecondsFormat::Secs, true));
                next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            }
        }
        Some(next)
    }

    /// Creates the namespaces, RBAC policy and `kubernetes` Service every
    /// cluster has.
    pub async fn bootstrap(&self) {
        let Some(namespaces) = self.registry.find("", "v1", "namespaces") else {
            return;
        };
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let object =
                json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
            match self
                .create_object(namespaces, None, object, &WriteOptions::default())
                .await
            {
                Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
                Err(error) => tracing::warn!(%error, namespace = name, "bootstrap"),
            }
        }
        for (plural, object) in super::authz::bootstrap_policy() {
            let Some(rt) = self
                .registry
                .find("rbac.authorization.k8s.io", "v1", plural)
            else {
                continue;
            };
            match self
                .create_object(rt, None, object, &WriteOptions::default())
                .await
            {
                Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
                Err(error) => tracing::warn!(%error, "bootstrap: RBAC policy"),
            }
        }
        // Upstream's built-in classes for what the cluster cannot lose.
        if let Some(classes) = self
            .registry
            .find("scheduling.k8s.io", "v1", "priorityclasses")
        {
            for (name, value, description) in [
                (
                    "system-node-critical",
                    2_000_001_000,
                    "Used for system critical pods that must not be moved from their current node.",
                ),
                (
                    "system-cluster-critical",
                    2_000_000_000,
                    "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
                ),
            ] {
                let class = json!({
                    "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                    "metadata": { "name": name }, "value": value, "description": description,
                });
                match self
                    .create_object(classes, None, class, &WriteOptions::default())
                    .await
                {
                    Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
                    Err(error) => tracing::warn!(%error, class = name, "bootstrap: priority class"),
                }
            }
        }
        // In-cluster clients find the API server at the first service IP.
        let Some(services) = self.registry.find("", "v1", "services") else {
            return;
        };
        let kubernetes = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "kubernetes", "namespace": "default", "labels": { "component": "apiserver", "provider": "kubernetes" } },
            "spec": {
                "clusterIP": self.ranges.first_ip().to_string(),
                "ports": [{ "name": "https", "port": 443, "protocol": "TCP", "targetPort": self.listen.port() }],
            },
        });
        match self
            .create_object(
                services,
                Some("default"),
                kubernetes,
                &WriteOptions::default(),
            )
            .await
        {
            Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
            Err(error) => tracing::warn!(%error, "bootstrap: kubernetes service"),
        }
        self.publish_own_endpoints().await;
    }

    /// Points the `kubernetes` Service at this server at start-up, so pods
    /// reach the API through its ClusterIP (kube-apiserver's endpoint
    /// reconciler keeps doing so; one server writing once is enough here).
    /// Only for an address pods can reach: not a wildcard and not loopback
    /// (a pod's loopback is its own); a server restarted on such an
    /// address leaves the last reachable one published.
    async fn publish_own_endpoints(&self) {
        let std::net::IpAddr::V4(address) = self.listen.ip() else {
            return;
        };
        if address.is_unspecified() || address.is_loopback() {
            return;
        }
        let (ip, port) = (address.to_string(), self.listen.port());
        let objects = [
            (
                ("discovery.k8s.io", "v1", "endpointslices"),
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": { "name": "kubernetes", "namespace": "default", "labels": { "kubernetes.io/service-name": "kubernetes" } },
                    "addressType": "IPv4",
                    "endpoints": [{ "addresses": [ip], "conditions": { "ready": true } }],
                    "ports": [{ "name": "https", "port": port, "protocol": "TCP" }],
                }),
            ),
            (
                ("", "v1", "endpoints"),
                json!({
                    "apiVersion": "v1",
                    "kind": "Endpoints",
                    // Mirrored by nobody: the slice above is written too.
                    "metadata": { "name": "kubernetes", "namespace": "default", "labels": { "endpointslice.kubernetes.io/skip-mirror": "true" } },
                    "subsets": [{ "addresses": [{ "ip": ip }], "ports": [{ "name": "https", "port": port, "protocol": "TCP" }] }],
                }),
            ),
        ];
        for ((group, version, plural), object) in objects {
            let Some(rt) = self.registry.find(group, version, plural) else {
                continue;
            };
            let options = WriteOptions::default();
            let written = match self
                .create_object(rt, Some("default"), object.clone(), &options)
                .await
            {
                // From an earlier start, perhaps on another address.
                Err(ApiError::AlreadyExists(_)) => self
                    .update_object(
                        rt,
                        Some("default"),
                        "kubernetes",
                        UpdateMode::Main,
                        &options,
                        |_| Ok(object.clone()),
                    )
                    .await
                    .map(drop),
                other => other.map(drop),
            };
            if let Err(error) = written {
                tracing::warn!(%error, plural, "bootstrap: the kubernetes service's endpoints");
            }
        }
    }
}

/// A namespace also waits for its spec finalizers (emptied through
/// `/finalize` once its contents are gone).
fn finalizers_done(rt: &ResourceType, object: &Value) -> bool {
    if rt.plural == "namespaces" && rt.group.is_empty() {
        return object["spec"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
    }
    true
}

impl Plan {
    /// Adds the claims (each checked absent, owned by `owner`) and the
    /// releases to a transaction, after its own checks and ops.
    fn add_to(&self, txn: &mut Txn, owner: &str) {
        for claim in &self.claims {
            txn.checks.push(Check::Absent(claim.key.clone()));
            txn.ops.push(Op::Put {
                key: claim.key.clone(),
                value: owner.as_bytes().to_vec(),
            });
        }
        for key in &self.releases {
            txn.ops.push(Op::Delete { key: key.clone() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_resource_version_alone_is_no_change() {
        let a = json!({"metadata": {"name": "x", "resourceVersion": "1"}, "spec": {"n": 1}});
        let b = json!({"metadata": {"name": "x", "resourceVersion": "2"}, "spec": {"n": 1}});
        assert!(same_but_resource_version(&a, &b));
        let c = json!({"metadata": {"name": "x", "resourceVersion": "2"}, "spec": {"n": 2}});
        assert!(!same_but_resource_version(&a, &c));
        let d = json!({"metadata": {"name": "y", "resourceVersion": "1"}, "spec": {"n": 1}});
        assert!(!same_but_resource_version(&a, &d));
        let e = json!({"metadata": {"name": "x"}, "spec": {"n": 1}, "status": {}});
        assert!(!same_but_resource_version(&a, &e));
    }

    #[test]
    fn uids_look_like_version_4_uuids() {
        let uid = new_uid();
        let parts: Vec<&str> = uid.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert_ne!(new_uid(), uid);
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_escapes() {
        let token = encode_continue(42, "ns/web\0");
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, "ns/web\0".to_owned())
        );
        assert!(decode_continue("not base64!").is_err());
        let escape = STANDARD.encode(json!({"rv": 1, "start": "../secrets/"}).to_string());
        assert!(decode_continue(&escape).is_err());
    }

    #[test]
    fn generated_names_avoid_vowels() {
        let suffix = name_suffix();
        assert_eq!(suffix.len(), 5);
        assert!(!suffix.contains(['a', 'e', 'i', 'o', 'u', '0', '1', '3']));
    }
}
