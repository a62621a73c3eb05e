//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`),
//! decoded to the JSON the rest of the server handles.
//!
//! kubectl's generator commands (`kubectl create namespace|configmap|
//! secret|serviceaccount|deployment|service|job|cronjob|role|rolebinding|
//! clusterrole|clusterrolebinding|poddisruptionbudget`) send typed objects
//! this way, and so does `kubectl certificate approve|deny` (a whole
//! CertificateSigningRequest, managedFields included). The envelope is `k8s\0` + `runtime.Unknown{typeMeta, raw}`;
//! `raw` is the object, with the field numbers of upstream's
//! generated.proto. The tables below cover the kinds and fields those
//! commands set. A field outside them is accepted only at its zero value
//! (Go's protobuf writes every non-pointer field, set or not); any other is
//! refused with a message to send JSON, never dropped silently.
//! Responses are always JSON, which the same clients accept.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value, json};

use super::status::ApiError;

/// The media type.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, Copy)]
enum Type {
    Str,
    /// An integer whose zero means unset (a non-pointer Go field).
    Int,
    /// An integer whose zero is a value (a pointer Go field).
    IntKeepZero,
    Bool,
    BoolKeepZero,
    Message(&'static [Field]),
    Time,
    IntOrString,
    StrMap,
    BytesMap,
    /// `bytes`: base64 in JSON.
    Bytes,
    /// A `FieldsV1` message: its one field holds the JSON itself.
    FieldsV1,
}

#[derive(Clone, Copy)]
struct Field {
    number: u64,
    name: &'static str,
    ty: Type,
    repeated: bool,
}

const fn one(number: u64, name: &'static str, ty: Type) -> Field {
    Field {
        number,
        name,
        ty,
        repeated: false,
    }
}

const fn many(number: u64, name: &'static str, ty: Type) -> Field {
    Field {
        number,
        name,
        ty,
        repeated: true,
    }
}

use Type::{
    Bool, BoolKeepZero, Bytes, BytesMap, FieldsV1, Int, IntKeepZero, IntOrString, Message, Str,
    StrMap, Time,
};

const OWNER_REFERENCE: &[Field] = &[
    one(5, "apiVersion", Str),
    one(1, "kind", Str),
    one(3, "name", Str),
    one(4, "uid", Str),
    one(6, "controller", BoolKeepZero),
    one(7, "blockOwnerDeletion", BoolKeepZero),
];
const MANAGED_FIELDS_ENTRY: &[Field] = &[
    one(1, "manager", Str),
    one(2, "operation", Str),
    one(3, "apiVersion", Str),
    one(4, "time", Time),
    one(6, "fieldsType", Str),
    one(7, "fieldsV1", FieldsV1),
    one(8, "subresource", Str),
];

const OBJECT_META: &[Field] = &[
    one(1, "name", Str),
    one(2, "generateName", Str),
    one(3, "namespace", Str),
    one(5, "uid", Str),
    one(6, "resourceVersion", Str),
    one(7, "generation", Int),
    one(8, "creationTimestamp", Time),
    one(11, "labels", StrMap),
    one(12, "annotations", StrMap),
    many(13, "ownerReferences", Message(OWNER_REFERENCE)),
    many(14, "finalizers", Str),
    many(17, "managedFields", Message(MANAGED_FIELDS_ENTRY)),
];
const LABEL_SELECTOR_REQUIREMENT: &[Field] = &[
    one(1, "key", Str),
    one(2, "operator", Str),
    many(3, "values", Str),
];
const LABEL_SELECTOR: &[Field] = &[
    one(1, "matchLabels", StrMap),
    many(2, "matchExpressions", Message(LABEL_SELECTOR_REQUIREMENT)),
];
const NAMESPACE_SPEC: &[Field] = &[many(1, "finalizers", Str)];
const NAMESPACE: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(NAMESPACE_SPEC)),
];
const CONFIG_MAP: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(4, "immutable", BoolKeepZero),
    one(2, "data", StrMap),
    one(3, "binaryData", BytesMap),
];
const SECRET: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(5, "immutable", BoolKeepZero),
    one(2, "data", BytesMap),
    one(4, "stringData", StrMap),
    one(3, "type", Str),
];
const LOCAL_OBJECT_REFERENCE: &[Field] = &[one(1, "name", Str)];
const SERVICE_ACCOUNT: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    many(3, "imagePullSecrets", Message(LOCAL_OBJECT_REFERENCE)),
    one(4, "automountServiceAccountToken", BoolKeepZero),
];
const SERVICE_PORT: &[Field] = &[
    one(1, "name", Str),
    one(2, "protocol", Str),
    one(6, "appProtocol", Str),
    one(3, "port", Int),
    one(4, "targetPort", IntOrString),
    one(5, "nodePort", Int),
];
const SERVICE_SPEC: &[Field] = &[
    many(1, "ports", Message(SERVICE_PORT)),
    one(2, "selector", StrMap),
    one(3, "clusterIP", Str),
    many(18, "clusterIPs", Str),
    one(4, "type", Str),
    many(5, "externalIPs", Str),
    one(7, "sessionAffinity", Str),
    one(10, "externalName", Str),
    one(11, "externalTrafficPolicy", Str),
    one(22, "internalTrafficPolicy", Str),
];
const SERVICE: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(SERVICE_SPEC)),
];
const CONTAINER_PORT: &[Field] = &[
    one(1, "name", Str),
    one(2, "hostPort", Int),
    one(3, "containerPort", Int),
    one(4, "protocol", Str),
    one(5, "hostIP", Str),
];
const ENV_VAR: &[Field] = &[one(1, "name", Str), one(2, "value", Str)];
const CONTAINER: &[Field] = &[
    one(1, "name", Str),
    one(2, "image", Str),
    many(3, "command", Str),
    many(4, "args", Str),
    one(5, "workingDir", Str),
    many(6, "ports", Message(CONTAINER_PORT)),
    many(7, "env", Message(ENV_VAR)),
    one(13, "terminationMessagePath", Str),
    one(20, "terminationMessagePolicy", Str),
    one(14, "imagePullPolicy", Str),
    one(16, "stdin", Bool),
    one(17, "stdinOnce", Bool),
    one(18, "tty", Bool),
];
const POD_SPEC: &[Field] = &[
    many(20, "initContainers", Message(CONTAINER)),
    many(2, "containers", Message(CONTAINER)),
    one(3, "restartPolicy", Str),
    one(4, "terminationGracePeriodSeconds", IntKeepZero),
    one(6, "dnsPolicy", Str),
    one(7, "nodeSelector", StrMap),
    one(8, "serviceAccountName", Str),
    one(10, "nodeName", Str),
    one(11, "hostNetwork", Bool),
    many(15, "imagePullSecrets", Message(LOCAL_OBJECT_REFERENCE)),
    one(19, "schedulerName", Str),
];
const POD_TEMPLATE_SPEC: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(POD_SPEC)),
];
const DEPLOYMENT_SPEC: &[Field] = &[
    one(1, "replicas", IntKeepZero),
    one(2, "selector", Message(LABEL_SELECTOR)),
    one(3, "template", Message(POD_TEMPLATE_SPEC)),
    one(5, "minReadySeconds", Int),
    one(6, "revisionHistoryLimit", IntKeepZero),
    one(7, "paused", Bool),
    one(9, "progressDeadlineSeconds", IntKeepZero),
];
const DEPLOYMENT: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(DEPLOYMENT_SPEC)),
];
const JOB_SPEC: &[Field] = &[
    one(1, "parallelism", IntKeepZero),
    one(2, "completions", IntKeepZero),
    one(3, "activeDeadlineSeconds", IntKeepZero),
    one(7, "backoffLimit", IntKeepZero),
    one(4, "selector", Message(LABEL_SELECTOR)),
    one(6, "template", Message(POD_TEMPLATE_SPEC)),
    one(8, "ttlSecondsAfterFinished", IntKeepZero),
    one(10, "suspend", BoolKeepZero),
];
const JOB: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(JOB_SPEC)),
];
const JOB_TEMPLATE_SPEC: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(JOB_SPEC)),
];
const CRON_JOB_SPEC: &[Field] = &[
    one(1, "schedule", Str),
    one(8, "timeZone", Str),
    one(3, "concurrencyPolicy", Str),
    one(4, "suspend", BoolKeepZero),
    one(5, "jobTemplate", Message(JOB_TEMPLATE_SPEC)),
    one(6, "successfulJobsHistoryLimit", IntKeepZero),
    one(7, "failedJobsHistoryLimit", IntKeepZero),
];
const CRON_JOB: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(CRON_JOB_SPEC)),
];
const POLICY_RULE: &[Field] = &[
    many(1, "verbs", Str),
    many(2, "apiGroups", Str),
    many(3, "resources", Str),
    many(4, "resourceNames", Str),
    many(5, "nonResourceURLs", Str),
];
const ROLE: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    many(2, "rules", Message(POLICY_RULE)),
];
const ROLE_REF: &[Field] = &[
    one(1, "apiGroup", Str),
    one(2, "kind", Str),
    one(3, "name", Str),
];
const SUBJECT: &[Field] = &[
    one(1, "kind", Str),
    one(2, "apiGroup", Str),
    one(3, "name", Str),
    one(4, "namespace", Str),
];
const BINDING: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    many(2, "subjects", Message(SUBJECT)),
    one(3, "roleRef", Message(ROLE_REF)),
];
const PDB_SPEC: &[Field] = &[
    one(1, "minAvailable", IntOrString),
    one(2, "selector", Message(LABEL_SELECTOR)),
    one(3, "maxUnavailable", IntOrString),
    one(4, "unhealthyPodEvictionPolicy", Str),
];
const PDB: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(PDB_SPEC)),
];

/// The kinds protobuf bodies are decoded for, by apiVersion and kind.
const CSR_SPEC: &[Field] = &[
    one(1, "request", Bytes),
    one(7, "signerName", Str),
    one(8, "expirationSeconds", IntKeepZero),
    many(5, "usages", Str),
    one(2, "username", Str),
    one(3, "uid", Str),
    many(4, "groups", Str),
];

const CSR_CONDITION: &[Field] = &[
    one(1, "type", Str),
    one(6, "status", Str),
    one(2, "reason", Str),
    one(3, "message", Str),
    one(4, "lastUpdateTime", Time),
    one(5, "lastTransitionTime", Time),
];

const CSR_STATUS: &[Field] = &[
    many(1, "conditions", Message(CSR_CONDITION)),
    one(2, "certificate", Bytes),
];

/// `kubectl certificate approve|deny` sends the request back whole.
const CSR: &[Field] = &[
    one(1, "metadata", Message(OBJECT_META)),
    one(2, "spec", Message(CSR_SPEC)),
    one(3, "status", Message(CSR_STATUS)),
];

fn schema(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("v1", "Service") => SERVICE,
        ("apps/v1", "Deployment") => DEPLOYMENT,
        ("batch/v1", "Job") => JOB,
        ("batch/v1", "CronJob") => CRON_JOB,
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        ("policy/v1", "PodDisruptionBudget") => PDB,
        ("certificates.k8s.io/v1", "CertificateSigningRequest") => CSR,
        _ => return None,
    })
}

fn unsupported(detail: String) -> ApiError {
    ApiError::bad_request(format!(
        "protobuf body not supported by wharf ({detail}); send application/json instead"
    ))
}

/// One wire-format field.
enum Wire<'a> {
    Varint(u64),
    Fixed(u64),
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn truncated() -> ApiError {
        ApiError::bad_request("protobuf body is truncated or malformed")
    }

    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0_u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or_else(Self::truncated)?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Self::truncated())
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], ApiError> {
        if self.bytes.len() < len {
            return Err(Self::truncated());
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, ApiError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed(u64::from_le_bytes(
                self.take(8)?.try_into().map_err(|_| Self::truncated())?,
            )),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| Self::truncated())?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed(u64::from(u32::from_le_bytes(
                self.take(4)?.try_into().map_err(|_| Self::truncated())?,
            ))),
            _ => return Err(Self::truncated()),
        };
        Ok(Some((key >> 3, wire)))
    }
}

fn text(bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("protobuf string is not UTF-8"))
}

/// A map entry message: key = 1, value = 2.
fn map_entry(bytes: &[u8], value_bytes: bool) -> Result<(String, Value), ApiError> {
    let mut reader = Reader { bytes };
    let (mut key, mut value) = (String::new(), json!(""));
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            (1, Wire::Bytes(bytes)) => key = text(bytes)?,
            (2, Wire::Bytes(bytes)) if value_bytes => value = json!(STANDARD.encode(bytes)),
            (2, Wire::Bytes(bytes)) => value = json!(text(bytes)?),
            _ => return Err(Reader::truncated()),
        }
    }
    Ok((key, value))
}

fn time(bytes: &[u8]) -> Result<Option<Value>, ApiError> {
    let mut reader = Reader { bytes };
    let (mut seconds, mut nanos) = (0_i64, 0_u32);
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            // Two's complement varints: the casts reinterpret, as protobuf does.
            (1, Wire::Varint(value)) => seconds = value as i64,
            (2, Wire::Varint(value)) => nanos = value as u32,
            _ => return Err(Reader::truncated()),
        }
    }
    if seconds == 0 && nanos == 0 {
        return Ok(None);
    }
    let at = DateTime::from_timestamp(seconds, nanos)
        .ok_or_else(|| ApiError::bad_request("timestamp out of range"))?;
    Ok(Some(json!(at.to_rfc3339_opts(SecondsFormat::Secs, true))))
}

/// A `FieldsV1` message (`Raw` = 1, the JSON form itself).
fn fields_v1(bytes: &[u8]) -> Result<Option<Value>, ApiError> {
    let mut reader = Reader { bytes };
    let mut value = None;
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            (1, Wire::Bytes(raw)) => {
                value = Some(
                    serde_json::from_slice(raw)
                        .map_err(|_| ApiError::bad_request("fieldsV1 is not JSON"))?,
                );
            }
            _ => return Err(Reader::truncated()),
        }
    }
    Ok(value)
}

fn int_or_string(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut reader = Reader { bytes };
    let (mut kind, mut int, mut string) = (0, 0_i64, String::new());
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            (1, Wire::Varint(value)) => kind = value,
            (2, Wire::Varint(value)) => int = i64::from(value as i32),
            (3, Wire::Bytes(bytes)) => string = text(bytes)?,
            _ => return Err(Reader::truncated()),
        }
    }
    Ok(if kind == 1 { json!(string) } else { json!(int) })
}

/// Whether a field holds only Go zero values: 0, an empty string, or a
/// message (such as an unset status) whose fields are all zero.
fn is_zero(wire: &Wire<'_>) -> bool {
    match wire {
        Wire::Varint(v) | Wire::Fixed(v) => *v == 0,
        Wire::Bytes(bytes) => {
            let mut reader = Reader { bytes };
            loop {
                match reader.next() {
                    Ok(None) => return true,
                    Ok(Some((_, inner))) if is_zero(&inner) => {}
                    _ => return false,
                }
            }
        }
    }
}

fn decode_message(
    bytes: &[u8],
    fields: &[Field],
    path: &str,
) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let mut reader = Reader { bytes };
    while let Some((number, wire)) = reader.next()? {
        let Some(field) = fields.iter().find(|f| f.number == number) else {
            if is_zero(&wire) {
                continue;
            }
            return Err(unsupported(format!("field {number} of {path}")));
        };
        let at = format!("{path}.{}", field.name);
        let value = match (field.ty, wire) {
            (Str, Wire::Bytes(b)) => {
                Some(json!(text(b)?)).filter(|v| field.repeated || v.as_str() != Some(""))
            }
            (Int, Wire::Varint(v)) => Some(json!(v as i64)).filter(|v| v.as_i64() != Some(0)),
            (IntKeepZero, Wire::Varint(v)) => Some(json!(v as i64)),
            (Bool, Wire::Varint(v)) => Some(json!(v != 0)).filter(|v| v.as_bool() == Some(true)),
            (BoolKeepZero, Wire::Varint(v)) => Some(json!(v != 0)),
            (Message(schema), Wire::Bytes(b)) => {
                Some(Value::Object(decode_message(b, schema, &at)?))
            }
            (Time, Wire::Bytes(b)) => time(b)?,
            (Bytes, Wire::Bytes(b)) => Some(json!(STANDARD.encode(b))).filter(|_| !b.is_empty()),
            (FieldsV1, Wire::Bytes(b)) => fields_v1(b)?,
            (IntOrString, Wire::Bytes(b)) => Some(int_or_string(b)?),
            (StrMap | BytesMap, Wire::Bytes(b)) => {
                let (key, value) = map_entry(b, matches!(field.ty, BytesMap))?;
                let map = out.entry(field.name).or_insert_with(|| json!({}));
                map[key] = value;
                continue;
            }
            _ => return Err(unsupported(format!("wire type of {at}"))),
        };
        let Some(value) = value else { continue };
        if field.repeated {
            match out.entry(field.name).or_insert_with(|| json!([])) {
                Value::Array(items) => items.push(value),
                _ => return Err(Reader::truncated()),
            }
        } else {
            out.insert(field.name.to_owned(), value);
        }
    }
    Ok(out)
}

/// Decodes a protobuf request body into the object's JSON form.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("protobuf body lacks the k8s\\0 prefix"))?;
    let mut reader = Reader { bytes: envelope };
    let (mut api_version, mut kind, mut raw, mut encoding) =
        (String::new(), String::new(), &[][..], String::new());
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            (1, Wire::Bytes(type_meta)) => {
                let mut meta = Reader { bytes: type_meta };
                while let Some((number, wire)) = meta.next()? {
                    match (number, wire) {
                        (1, Wire::Bytes(b)) => api_version = text(b)?,
                        (2, Wire::Bytes(b)) => kind = text(b)?,
                        _ => return Err(Reader::truncated()),
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = b,
            (3, Wire::Bytes(b)) => encoding = text(b)?,
            (4, Wire::Bytes(_)) => {}
            _ => return Err(Reader::truncated()),
        }
    }
    if !encoding.is_empty() {
        return Err(unsupported(format!("content encoding {encoding}")));
    }
    let fields =
        schema(&api_version, &kind).ok_or_else(|| unsupported(format!("{api_version} {kind}")))?;
    let mut object = decode_message(raw, fields, &kind)?;
    object.insert("apiVersion".to_owned(), json!(api_version));
    object.insert("kind".to_owned(), json!(kind));
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut value: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    fn varint_field(number: u64, value: u64, out: &mut Vec<u8>) {
        varint(number << 3, out);
        varint(value, out);
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut type_meta = Vec::new();
        bytes_field(1, api_version.as_bytes(), &mut type_meta);
        bytes_field(2, kind.as_bytes(), &mut type_meta);
        let mut body = MAGIC.to_vec();
        bytes_field(1, &type_meta, &mut body);
        bytes_field(2, raw, &mut body);
        body
    }

    #[test]
    fn a_deployment_decodes_with_zero_values_dropped_and_pointers_kept() {
        let mut labels = Vec::new();
        bytes_field(1, b"app", &mut labels);
        bytes_field(2, b"web", &mut labels);
        let mut meta = Vec::new();
        bytes_field(1, b"web", &mut meta);
        bytes_field(8, &[], &mut meta);
        bytes_field(11, &labels, &mut meta);
        let mut port = Vec::new();
        varint_field(2, 0, &mut port);
        varint_field(3, 8080, &mut port);
        let mut container = Vec::new();
        bytes_field(1, b"web", &mut container);
        bytes_field(2, b"nginx", &mut container);
        bytes_field(6, &port, &mut container);
        bytes_field(13, b"", &mut container);
        bytes_field(8, &[], &mut container);
        let mut pod = Vec::new();
        bytes_field(2, &container, &mut pod);
        let mut template = Vec::new();
        bytes_field(1, &meta, &mut template);
        bytes_field(2, &pod, &mut template);
        let mut spec = Vec::new();
        varint_field(1, 0, &mut spec);
        bytes_field(3, &template, &mut spec);
        bytes_field(4, &[], &mut spec);
        let mut status = Vec::new();
        varint_field(1, 0, &mut status);
        bytes_field(9, b"", &mut status);
        let mut raw = Vec::new();
        bytes_field(1, &meta, &mut raw);
        bytes_field(2, &spec, &mut raw);
        bytes_field(3, &status, &mut raw);
        let object = decode(&envelope("apps/v1", "Deployment", &raw)).unwrap();
        assert_eq!(object["kind"], "Deployment");
        assert_eq!(
            object["metadata"],
            json!({"name": "web", "labels": {"app": "web"}})
        );
        assert_eq!(object["spec"]["replicas"], 0, "a pointer's zero is kept");
        let container = &object["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            *container,
            json!({"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]})
        );
    }

    #[test]
    fn unknown_fields_with_values_and_garbage_are_refused() {
        let mut raw = Vec::new();
        bytes_field(9, b"surprise", &mut raw);
        assert!(matches!(
            decode(&envelope("v1", "ConfigMap", &raw)),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(decode(&envelope("v1", "Pod", &[])).is_err());
        assert!(decode(b"k8s\0\x0a\xff").is_err());
        assert!(decode(b"{}").is_err());
    }
}
