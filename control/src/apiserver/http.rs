//! Routing: one handler parses the request path the way kube-apiserver
//! lays out its URLs and dispatches to a verb.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::Utc;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    App,
    authn::{self, User},
    authz::{Attributes, Decision},
    discovery, eviction,
    kinds::{ResourceType, certificates},
    logs,
    managed::{self, Writer},
    objects::{
        DeleteOptions, FieldValidation, ListParams, UPDATE_ATTEMPTS, UpdateMode, WriteOptions,
        now_rfc3339,
    },
    patch::{self, PatchType},
    protobuf,
    selectors::{FieldSelector, LabelSelector},
    status::{ApiError, Subject},
    stored::Listed,
    table::{IncludeObject, table},
    tls::PeerIdentity,
    watch::{self, WatchSpec, json_frame},
};
use crate::store::{Revision, Store};

/// Largest request body, as kube-apiserver's limit (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Watches end after this long unless the client asks otherwise
/// (upstream picks 30-60 min); clients re-watch.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The Kubernetes version the server speaks (kubectl warns on skew).
const VERSION_MINOR: &str = "32";

pub fn router<S: Store>(app: Arc<App<S>>) -> Router {
    Router::new().fallback(handle::<S>).with_state(app)
}

async fn handle<S: Store>(State(app): State<Arc<App<S>>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let mut labels = Labels::default();
    let response = match dispatch(&app, request, &mut labels).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    app.metrics.observe(
        &labels.verb,
        &labels.resource,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// How a request is counted in `/metrics`.
#[derive(Debug, Default)]
struct Labels {
    /// Upstream's verb label: LIST, WATCH, GET, CREATE, ...
    verb: String,
    /// `pods`, `deployments.apps`, `pods/status`; empty for other paths.
    resource: String,
}

/// A parsed request.
struct Call {
    method: Method,
    headers: HeaderMap,
    query: HashMap<String, String>,
    body: Bytes,
}

impl Call {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A boolean parameter, parsed as Go's strconv.ParseBool (the Python
    /// client sends `watch=True`).
    fn flag(&self, name: &str) -> bool {
        matches!(
            self.param(name),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }

    fn accepts(&self, needle: &str) -> bool {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains(needle))
    }

    fn wants_table(&self) -> bool {
        self.accepts("as=Table")
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
    }

    /// The body as JSON (or YAML, which kubectl never sends but curl users do).
    fn json_body(&self) -> Result<Value, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request("the request body is empty"));
        }
        let media = self
            .content_type()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim();
        match media {
            "application/yaml" => serde_yaml::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML body: {e}"))),
            "application/json" | "" | "*/*" => serde_json::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}"))),
            protobuf::MEDIA_TYPE => protobuf::decode(&self.body),
            _ => Err(ApiError::UnsupportedMediaType {
                accepted: "application/json, application/yaml, application/vnd.kubernetes.protobuf",
            }),
        }
    }

    fn write_options(&self) -> Result<WriteOptions, ApiError> {
        let user_agent = self
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|agent| agent.split('/').next())
            .filter(|product| !product.is_empty());
        let field_manager = self
            .param("fieldManager")
            .or(user_agent)
            .unwrap_or("unknown");
        Ok(WriteOptions {
            dry_run: self.param("dryRun").is_some(),
            field_validation: FieldValidation::parse(self.param("fieldValidation"))?,
            field_manager: field_manager.to_owned(),
        })
    }
}

/// Encoded with `to_vec`, not `Display`, which goes through
/// `fmt::Write` a piece at a time.
fn json_response(code: StatusCode, value: &Value, warnings: &[String]) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = (code, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    for warning in warnings {
        let escaped = warning.replace('"', "\\\"");
        if let Ok(value) = HeaderValue::from_str(&format!("299 - \"{escaped}\"")) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": VERSION_MINOR,
        "gitVersion": format!("v1.{VERSION_MINOR}.0-wharf.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "none (wharf is written in Rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
    })
}

async fn dispatch<S: Store>(
    app: &Arc<App<S>>,
    request: Request,
    labels: &mut Labels,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    labels.verb = parts.method.as_str().to_owned();
    let peer = parts
        .extensions
        .get::<PeerIdentity>()
        .cloned()
        .unwrap_or_default();
    let user = match app.authn.authenticate(peer.0.as_ref(), &parts.headers) {
        Some(user) => user,
        None => bootstrap_user(app, &parts.headers)
            .await
            .ok_or(ApiError::Unauthorized)?,
    };
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::TooLarge { limit: MAX_BODY })?;
    let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|Query(query)| query)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    let call = Call {
        method: parts.method,
        headers: parts.headers,
        query,
        body,
    };
    let path = parts.uri.path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let resource_path = matches!(
        segments.as_slice(),
        ["api", "v1", _, ..] | ["apis", _, _, _, ..]
    );
    if !resource_path {
        let attributes = Attributes::NonResource {
            verb: call.method.as_str().to_ascii_lowercase(),
            path: path.clone(),
        };
        if let Decision::Deny(reason) = app.authz.decide(&user, &attributes) {
            return Err(ApiError::Forbidden {
                subject: Subject::default(),
                message: format!("forbidden: {reason}"),
            });
        }
    }
    let get = call.method == Method::GET;
    let aggregated = call.accepts("as=APIGroupDiscoveryList");
    let discovery_response = |value: Value| {
        let content_type = if aggregated {
            discovery::AGGREGATED
        } else {
            "application/json"
        };
        ([(header::CONTENT_TYPE, content_type)], value.to_string()).into_response()
    };
    match segments.as_slice() {
        ["version"] if get => Ok(json_response(StatusCode::OK, &version(), &[])),
        ["metrics"] if get => Ok((
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            app.metrics.render(),
        )
            .into_response()),
        ["healthz" | "livez" | "readyz"] if get => {
            app.store.revision().await?;
            Ok((StatusCode::OK, "ok").into_response())
        }
        ["api"] if get && aggregated => Ok(discovery_response(discovery::aggregated(
            &app.registry,
            true,
        ))),
        ["api"] if get => Ok(json_response(
            StatusCode::OK,
            &discovery::api_versions(&host(&call)),
            &[],
        )),
        ["apis"] if get && aggregated => Ok(discovery_response(discovery::aggregated(
            &app.registry,
            false,
        ))),
        ["apis"] if get => Ok(json_response(
            StatusCode::OK,
            &discovery::api_group_list(&app.registry),
            &[],
        )),
        ["api", "v1"] if get => discovery::resource_list(&app.registry, "", "v1")
            .map(|list| json_response(StatusCode::OK, &list, &[]))
            .ok_or(ApiError::NoSuchResource),
        ["apis", group] if get => discovery::api_group(&app.registry, group)
            .map(|g| json_response(StatusCode::OK, &g, &[]))
            .ok_or(ApiError::NoSuchResource),
        ["apis", group, version] if get => discovery::resource_list(&app.registry, group, version)
            .map(|list| json_response(StatusCode::OK, &list, &[]))
            .ok_or(ApiError::NoSuchResource),
        ["openapi", "v2"] if get => Ok((
            [(header::CONTENT_TYPE, "application/json")],
            app.openapi.v2.clone(),
        )
            .into_response()),
        ["openapi", "v3"] if get => Ok(json_response(StatusCode::OK, &app.openapi.v3_index, &[])),
        ["openapi", "v3", rest @ ..] if get => app
            .openapi
            .v3
            .get(&rest.join("/"))
            .map(|doc| ([(header::CONTENT_TYPE, "application/json")], doc.clone()).into_response())
            .ok_or(ApiError::NoSuchResource),
        ["api", "v1", rest @ ..] => resource(app, &call, &user, "", "v1", rest, labels).await,
        ["apis", group, version, rest @ ..] => {
            resource(app, &call, &user, group, version, rest, labels).await
        }
        _ => Err(ApiError::NoSuchResource),
    }
}

fn host(call: &Call) -> String {
    call.headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// What a resource URL names.
struct Target<'a> {
    index: usize,
    rt: &'a ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn resolve<'a, S: Store>(
    app: &'a App<S>,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target<'a>, ApiError> {
    let find = |plural: &str| {
        app.registry
            .types
            .iter()
            .enumerate()
            .find(|(_, rt)| rt.group == group && rt.version == version && rt.plural == plural)
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, plural, tail @ ..]
            if find(plural).is_some_and(|(_, rt)| rt.namespaced) =>
        {
            (
                Some((*namespace).to_owned()),
                [&[*plural][..], tail].concat(),
            )
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::NoSuchResource),
    };
    let (index, rt) = find(plural).ok_or(ApiError::NoSuchResource)?;
    Ok(Target {
        index,
        rt,
        namespace,
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

/// The RBAC verb of a request on a resource URL.
fn verb(call: &Call, target: &Target<'_>) -> &'static str {
    match (&call.method, target.name.is_some()) {
        (&Method::GET, false) if call.flag("watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, false) => "deletecollection",
        (&Method::DELETE, true) => "delete",
        _ => "unknown",
    }
}

/// Authorizes a resource request; a node's pod writes are checked
/// against the pod's binding.
async fn authorize<S: Store>(
    app: &App<S>,
    call: &Call,
    user: &User,
    target: &Target<'_>,
) -> Result<(), ApiError> {
    let rt = target.rt;
    // A create names its object in the body: the node authorizer needs
    // it to tell a node's own Node and Lease from others' (nobody else
    // does, so other creates skip this extra parse).
    let name = target.name.clone().or_else(|| {
        if call.method != Method::POST || !user.in_group(super::authz::NODES) {
            return None;
        }
        let body: Value = serde_json::from_slice(&call.body).ok()?;
        body["metadata"]["name"].as_str().map(str::to_owned)
    });
    let attributes = Attributes::Resource {
        verb: verb(call, target).to_owned(),
        group: rt.group.to_owned(),
        resource: rt.plural.to_owned(),
        subresource: target.subresource.clone(),
        namespace: target.namespace.clone(),
        name: name.clone(),
    };
    let denied = |reason: String| {
        let what = match &target.name {
            Some(name) => format!("{} \"{name}\"", rt.plural),
            None => rt.plural.to_owned(),
        };
        ApiError::Forbidden {
            subject: rt.subject(target.name.as_deref().unwrap_or_default()),
            message: format!("{what} is forbidden: {reason}"),
        }
    };
    match app.authz.decide(user, &attributes) {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => Err(denied(reason)),
        Decision::AllowIfPodBoundTo(node) => {
            // The pod itself, or the pod a usage report is named after.
            let pods = app
                .registry
                .find("", "v1", "pods")
                .ok_or_else(|| ApiError::internal("pods are not registered"))?;
            let pod = app
                .get_object(
                    pods,
                    target.namespace.as_deref(),
                    name.as_deref().unwrap_or_default(),
                )
                .await?
                .0;
            if pod["spec"]["nodeName"].as_str() == Some(node.as_str()) {
                Ok(())
            } else {
                Err(denied(format!(
                    "node \"{node}\" can only change pods bound to it"
                )))
            }
        }
    }
}

async fn resource<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    user: &User,
    group: &str,
    version: &str,
    rest: &[&str],
    labels: &mut Labels,
) -> Result<Response, ApiError> {
    let target = resolve(app, group, version, rest)?;
    labels.verb = verb(call, &target).to_ascii_uppercase();
    let qualified = match target.rt.group {
        "" => target.rt.plural.to_owned(),
        group => format!("{}.{group}", target.rt.plural),
    };
    labels.resource = match &target.subresource {
        Some(sub) => format!("{qualified}/{sub}"),
        None => qualified,
    };
    authorize(app, call, user, &target).await?;
    let rt = target.rt;
    let namespace = target.namespace.as_deref();
    let unsupported = || ApiError::MethodNotSupported {
        subject: rt.subject(target.name.as_deref().unwrap_or_default()),
    };
    match (
        &call.method,
        target.name.as_deref(),
        target.subresource.as_deref(),
    ) {
        (&Method::GET, None, None) if call.flag("watch") => {
            watch_collection(app, call, &target).await
        }
        (&Method::GET, None, None) => list(app, call, rt, namespace).await,
        (&Method::POST, None, None) => {
            let mut body = call.json_body()?;
            admit_create(app, user, rt, namespace, &mut body)?;
            let written = app
                .create_object(rt, namespace, body, &call.write_options()?)
                .await?;
            Ok(json_response(
                StatusCode::CREATED,
                &written.object,
                &written.warnings,
            ))
        }
        (&Method::DELETE, None, None) => delete_collection(app, call, rt, namespace).await,
        (&Method::GET, Some(name), sub) if update_mode(rt, sub).is_some() => {
            let (object, _) = app.get_object(rt, namespace, name).await?;
            Ok(render_one(call, rt, object))
        }
        (&Method::PUT, Some(name), sub) if update_mode(rt, sub).is_some() => {
            let mode = update_mode(rt, sub).unwrap_or(UpdateMode::Main);
            let body = call.json_body()?;
            guard_rbac(app, user, rt, namespace, &body)?;
            let written = app
                .update_object(
                    rt,
                    namespace,
                    name,
                    mode,
                    &call.write_options()?,
                    |current| {
                        guard_approval(app, user, rt, mode, current)?;
                        Ok(body.clone())
                    },
                )
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &written.object,
                &written.warnings,
            ))
        }
        (&Method::PATCH, Some(name), sub)
            if update_mode(rt, sub).is_some()
                && PatchType::from_content_type(call.content_type()) == Some(PatchType::Apply) =>
        {
            let mode = update_mode(rt, sub).unwrap_or(UpdateMode::Main);
            server_side_apply(app, call, user, rt, namespace, name, mode).await
        }
        (&Method::PATCH, Some(name), sub) if update_mode(rt, sub).is_some() => {
            let mode = update_mode(rt, sub).unwrap_or(UpdateMode::Main);
            let kind = PatchType::from_content_type(call.content_type()).ok_or(ApiError::UnsupportedMediaType {
                accepted: "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json",
            })?;
            let written = app
                .update_object(
                    rt,
                    namespace,
                    name,
                    mode,
                    &call.write_options()?,
                    |current| {
                        guard_approval(app, user, rt, mode, current)?;
                        let mut patched = patch::apply(kind, current, &call.body)?;
                        guard_rbac(app, user, rt, namespace, &patched)?;
                        // A resourceVersion the patch changed is a
                        // precondition; the current one carried along is not.
                        if patched["metadata"]["resourceVersion"]
                            == current["metadata"]["resourceVersion"]
                        {
                            precondition(&mut patched, None);
                        }
                        Ok(patched)
                    },
                )
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &written.object,
                &written.warnings,
            ))
        }
        (&Method::DELETE, Some(name), None) => {
            let options = delete_options(call)?;
            let object = app.delete_object(rt, namespace, name, &options).await?;
            Ok(json_response(StatusCode::OK, &object, &[]))
        }
        (&Method::GET, Some(name), Some("log")) if rt.plural == "pods" && rt.group.is_empty() => {
            let (pod, _) = app.get_object(rt, namespace, name).await?;
            let node_name = pod["spec"]["nodeName"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request(format!("pod {name} does not have a host assigned"))
                })?;
            let nodes = app
                .registry
                .find("", "v1", "nodes")
                .ok_or_else(|| ApiError::internal("nodes are not registered"))?;
            let (node, _) = app.get_object(nodes, None, node_name).await?;
            let mut query: Vec<(String, String)> = call.query.clone().into_iter().collect();
            query.sort();
            logs::pod_log(&app.kubelet, &pod, &node, call.param("container"), &query).await
        }
        (_, Some(name), Some("scale")) if rt.scale => scale(app, call, rt, namespace, name).await,
        (&Method::POST, Some(name), Some("binding"))
            if rt.plural == "pods" && rt.group.is_empty() =>
        {
            bind(app, call, rt, namespace, name).await
        }
        (&Method::POST, Some(name), Some("eviction"))
            if rt.plural == "pods" && rt.group.is_empty() =>
        {
            evict(app, call, rt, namespace, name).await
        }
        (&Method::PUT, Some(name), Some("finalize"))
            if rt.plural == "namespaces" && rt.group.is_empty() =>
        {
            let body = call.json_body()?;
            let written = app
                .update_object(
                    rt,
                    None,
                    name,
                    UpdateMode::Main,
                    &call.write_options()?,
                    |current| {
                        let mut next = current.clone();
                        next["spec"]["finalizers"] = body["spec"]["finalizers"].clone();
                        Ok(next)
                    },
                )
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &written.object,
                &written.warnings,
            ))
        }
        (_, _, Some(_)) => Err(ApiError::NoSuchResource),
        _ => Err(unsupported()),
    }
}

/// What every create checks and takes from its requester, however it
/// comes (POST or server-side apply): RBAC escalation, and the requester
/// a CertificateSigningRequest names.
fn admit_create<S: Store>(
    app: &App<S>,
    user: &User,
    rt: &ResourceType,
    namespace: Option<&str>,
    object: &mut Value,
) -> Result<(), ApiError> {
    guard_rbac(app, user, rt, namespace, object)?;
    if rt.plural == certificates::PLURAL {
        certificates::stamp_requester(object, user);
    }
    Ok(())
}

/// A decision on a CertificateSigningRequest needs, besides access to
/// its `approval` subresource, the `approve` verb on its signer
/// (`signers` in certificates.k8s.io, named by `signerName`), as
/// upstream's admission has it.
fn guard_approval<S: Store>(
    app: &App<S>,
    user: &User,
    rt: &ResourceType,
    mode: UpdateMode,
    current: &Value,
) -> Result<(), ApiError> {
    if mode != UpdateMode::Approval {
        return Ok(());
    }
    let signer = current["spec"]["signerName"].as_str().unwrap_or_default();
    let approve = Attributes::Resource {
        verb: "approve".to_owned(),
        group: "certificates.k8s.io".to_owned(),
        resource: "signers".to_owned(),
        subresource: None,
        namespace: None,
        name: Some(signer.to_owned()),
    };
    match app.authz.decide(user, &approve) {
        Decision::Deny(reason) => Err(ApiError::Forbidden {
            subject: rt.subject(current["metadata"]["name"].as_str().unwrap_or_default()),
            message: format!(
                "user not permitted to approve requests with signerName \"{signer}\": {reason}"
            ),
        }),
        _ => Ok(()),
    }
}

/// The user of a bootstrap token, checked against its Secret.
async fn bootstrap_user<S: Store>(app: &Arc<App<S>>, headers: &HeaderMap) -> Option<User> {
    let (id, secret) = authn::bootstrap_token(headers)?;
    let secrets = app.registry.find("", "v1", "secrets")?;
    let name = format!("bootstrap-token-{id}");
    let (object, _) = app
        .get_object(secrets, Some("kube-system"), &name)
        .await
        .ok()?;
    authn::bootstrap_user(&object, &id, &secret, Utc::now())
}

/// What an update through `subresource` may change: the object, its
/// status, or (CertificateSigningRequests) its approval; None for other
/// subresources.
fn update_mode(rt: &ResourceType, subresource: Option<&str>) -> Option<UpdateMode> {
    match subresource {
        None => Some(UpdateMode::Main),
        Some("status") => Some(UpdateMode::Status),
        Some("approval") if rt.plural == certificates::PLURAL => Some(UpdateMode::Approval),
        Some(_) => None,
    }
}

/// Sets the resourceVersion an update must match (`update_object` treats
/// it as a precondition), or removes it for an unconditional update.
fn precondition(object: &mut Value, resource_version: Option<&str>) {
    match resource_version {
        Some(rv) => object["metadata"]["resourceVersion"] = json!(rv),
        None => {
            if let Some(metadata) = object["metadata"].as_object_mut() {
                metadata.remove("resourceVersion");
            }
        }
    }
}

/// Refuses a Role, ClusterRole or binding that grants more than the
/// requester holds (RBAC's escalation prevention).
fn guard_rbac<S: Store>(
    app: &App<S>,
    user: &User,
    rt: &ResourceType,
    namespace: Option<&str>,
    object: &Value,
) -> Result<(), ApiError> {
    if rt.group != "rbac.authorization.k8s.io" {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    app.authz
        .check_escalation(user, rt.plural, namespace, object)
        .map_err(|reason| ApiError::Forbidden {
            subject: rt.subject(name),
            message: format!(
                "{}.{} \"{name}\" is forbidden: {reason}",
                rt.plural, rt.group
            ),
        })
}

/// A single object, or a one-row table when kubectl asks for one.
fn render_one(call: &Call, rt: &ResourceType, object: Value) -> Response {
    if call.wants_table() {
        let include = IncludeObject::parse(call.param("includeObject"));
        let cells = rt.codec.cells(&object, Utc::now());
        let meta = json!({ "resourceVersion": object["metadata"]["resourceVersion"] });
        let columns = rt.codec.columns();
        return json_response(
            StatusCode::OK,
            &table(&columns, vec![(cells, &object)], include, meta),
            &[],
        );
    }
    json_response(StatusCode::OK, &object, &[])
}

fn list_params(call: &Call, rt: &ResourceType) -> Result<ListParams, ApiError> {
    let limit = match call.param("limit") {
        Some(limit) => limit
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {limit:?}")))?,
        None => 0,
    };
    let exact_revision = match (
        call.param("resourceVersionMatch"),
        call.param("resourceVersion"),
    ) {
        (Some("Exact"), Some(rv)) => Some(
            rv.parse::<Revision>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        ),
        _ => None,
    };
    Ok(ListParams {
        labels: LabelSelector::parse(call.param("labelSelector").unwrap_or_default())?,
        fields: FieldSelector::parse(call.param("fieldSelector").unwrap_or_default(), |f| {
            rt.selectable(f)
        })?,
        limit,
        continue_token: call.param("continue").map(str::to_owned),
        exact_revision,
    })
}

async fn list<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<&str>,
) -> Result<Response, ApiError> {
    let params = list_params(call, rt)?;
    let page = app.list_stored(rt, namespace, &params).await?;
    let mut meta = json!({ "resourceVersion": page.revision.to_string() });
    if let Some(token) = &page.continue_token {
        meta["continue"] = json!(token);
    }
    if call.wants_table() {
        let include = IncludeObject::parse(call.param("includeObject"));
        let now = Utc::now();
        let objects = page
            .items
            .into_iter()
            .map(Listed::into_object)
            .collect::<Result<Vec<_>, _>>()?;
        let rows = objects
            .iter()
            .map(|object| (rt.codec.cells(object, now), object))
            .collect();
        return Ok(json_response(
            StatusCode::OK,
            &table(&rt.codec.columns(), rows, include, meta),
            &[],
        ));
    }
    // The list's own fields around the items' stored JSON, keys sorted
    // as `json_response` writes them.
    let text = |value: &Value| serde_json::to_vec(value).unwrap_or_default();
    let mut body = b"{\"apiVersion\":".to_vec();
    body.extend(text(&json!(rt.api_version)));
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        item.write_json(&mut body)?;
    }
    body.extend_from_slice(b"],\"kind\":");
    body.extend(text(&json!(format!("{}List", rt.kind))));
    body.extend_from_slice(b",\"metadata\":");
    body.extend(text(&meta));
    body.push(b'}');
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn delete_options(call: &Call) -> Result<DeleteOptions, ApiError> {
    let grace_period = match call.param("gracePeriodSeconds") {
        Some(grace) => Some(grace.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid gracePeriodSeconds: {grace:?}"))
        })?),
        None => None,
    };
    let options = DeleteOptions {
        grace_period,
        propagation: call.param("propagationPolicy").map(str::to_owned),
        dry_run: call.param("dryRun").is_some(),
        ..DeleteOptions::default()
    };
    let body = if call.body.is_empty() {
        Value::Null
    } else {
        call.json_body()?
    };
    options.with_body(&body)
}

async fn delete_collection<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<&str>,
) -> Result<Response, ApiError> {
    let params = ListParams {
        limit: 0,
        continue_token: None,
        ..list_params(call, rt)?
    };
    let options = delete_options(call)?;
    let page = app.list_objects(rt, namespace, &params).await?;
    let mut deleted = Vec::with_capacity(page.items.len());
    for object in &page.items {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let object_namespace = object["metadata"]["namespace"].as_str();
        match app
            .delete_object(rt, object_namespace, name, &options)
            .await
        {
            Ok(object) => deleted.push(object),
            // Deleted by someone else meanwhile: the goal is reached.
            Err(ApiError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
    }
    let list = json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version,
        "metadata": { "resourceVersion": page.revision.to_string() },
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &list, &[]))
}

async fn watch_collection<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    target: &Target<'_>,
) -> Result<Response, ApiError> {
    let rt = target.rt;
    let namespace = target.namespace.as_deref();
    let params = list_params(call, rt)?;
    let send_initial = call.flag("sendInitialEvents");
    let from = match call.param("resourceVersion") {
        None | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<Revision>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        ),
    };
    // Without a resourceVersion (or with sendInitialEvents) the watch
    // starts with the current state as ADDED events.
    let (after, initial) = match from {
        Some(after) if !send_initial => (after, Vec::new()),
        _ => {
            let everything = ListParams {
                limit: 0,
                continue_token: None,
                ..params.clone()
            };
            let page = app.list_objects(rt, namespace, &everything).await?;
            (page.revision, page.items)
        }
    };
    let timeout =
        match call.param("timeoutSeconds") {
            Some(seconds) => Duration::from_secs(seconds.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds: {seconds:?}"))
            })?),
            None => DEFAULT_WATCH_TIMEOUT,
        };
    let spec = WatchSpec {
        prefix: app.collection_prefix(rt, namespace),
        labels: params.labels,
        fields: params.fields,
        after,
        initial,
        bookmarks: call.flag("allowWatchBookmarks"),
        initial_end_bookmark: send_initial,
        timeout,
        api_version: rt.api_version,
        kind: rt.kind,
    };
    let encoder: watch::Encoder = if call.wants_table() {
        let app = Arc::clone(app);
        let index = target.index;
        let include = IncludeObject::parse(call.param("includeObject"));
        let first = std::sync::atomic::AtomicBool::new(true);
        Box::new(move |kind, payload| {
            if kind == "BOOKMARK" {
                return json_frame(kind, payload);
            }
            let object = payload.object();
            let rt = &app.registry.types[index];
            let columns = if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                rt.codec.columns()
            } else {
                Vec::new()
            };
            let meta = json!({ "resourceVersion": object["metadata"]["resourceVersion"] });
            let row = vec![(rt.codec.cells(object, Utc::now()), object)];
            json_frame(
                kind,
                watch::Payload::Object(&table(&columns, row, include, meta)),
            )
        })
    } else {
        Box::new(json_frame)
    };
    let guard = app.metrics.watch_started(rt.plural);
    let frames = watch::start(&app.cache, spec, encoder, guard)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(ReceiverStream::new(frames)),
    )
        .into_response())
}

fn scale_of(object: &Value) -> Value {
    let selector = serde_json::from_value(object["spec"]["selector"].clone())
        .map(|selector| super::kinds::selector_query(&selector))
        .unwrap_or_default();
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        // Every scalable kind defaults replicas to 1.
        "spec": { "replicas": object["spec"]["replicas"].as_i64().unwrap_or(1) },
        "status": { "replicas": object["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector },
    })
}

async fn scale<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<&str>,
    name: &str,
) -> Result<Response, ApiError> {
    let change = match call.method {
        Method::GET => {
            let (object, _) = app.get_object(rt, namespace, name).await?;
            return Ok(json_response(StatusCode::OK, &scale_of(&object), &[]));
        }
        Method::PUT => Some(call.json_body()?),
        Method::PATCH => None,
        _ => {
            return Err(ApiError::MethodNotSupported {
                subject: rt.subject(name),
            });
        }
    };
    let kind = PatchType::from_content_type(call.content_type());
    let written = app
        .update_object(rt, namespace, name, UpdateMode::Main, &call.write_options()?, |current| {
            let scale = match (&change, kind) {
                (Some(body), _) => body.clone(),
                (None, Some(kind)) => patch::apply(kind, &scale_of(current), &call.body)?,
                (None, None) => {
                    return Err(ApiError::UnsupportedMediaType {
                        accepted: "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json",
                    });
                }
            };
            let replicas = scale["spec"]["replicas"]
                .as_i64()
                .ok_or_else(|| ApiError::bad_request("Scale.spec.replicas is required"))?;
            let mut next = current.clone();
            next["spec"]["replicas"] = json!(replicas);
            // A PUT's resourceVersion is a precondition, a patch's is not.
            let pinned = scale["metadata"]["resourceVersion"].as_str().filter(|_| change.is_some());
            precondition(&mut next, pinned);
            Ok(next)
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &scale_of(&written.object),
        &written.warnings,
    ))
}

/// `PATCH` with `application/apply-patch+yaml`: creates or merges the
/// configuration, owning its fields for `fieldManager`.
async fn server_side_apply<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    user: &User,
    rt: &ResourceType,
    namespace: Option<&str>,
    name: &str,
    mode: UpdateMode,
) -> Result<Response, ApiError> {
    if call.param("fieldManager").is_none() {
        return Err(ApiError::bad_request(
            "PATCH requests with apply must have a fieldManager",
        ));
    }
    let options = call.write_options()?;
    let config: Value = serde_yaml::from_slice(&call.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    if !config.is_object() || !(config["metadata"].is_object() || config["metadata"].is_null()) {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object with object metadata",
        ));
    }
    if !config["metadata"]["managedFields"].is_null() {
        return Err(ApiError::bad_request(
            "metadata.managedFields must be nil in an applied configuration",
        ));
    }
    if config["metadata"]["name"]
        .as_str()
        .is_some_and(|body| body != name)
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            config["metadata"]["name"].as_str().unwrap_or_default()
        )));
    }
    let force = call.flag("force");
    let now = now_rfc3339();
    let writer = Writer {
        manager: &options.field_manager,
        api_version: rt.api_version,
        now: &now,
        subresource: mode.subresource(),
    };
    let conflict = |conflicts: Vec<managed::Conflict>| ApiError::ApplyConflict {
        subject: rt.subject(name),
        conflicts: conflicts
            .into_iter()
            .map(|c| super::status::Cause {
                reason: "FieldManagerConflict",
                message: format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                field: c.field,
            })
            .collect(),
    };
    match app.get_object(rt, namespace, name).await {
        Err(error @ ApiError::NotFound(_)) if mode != UpdateMode::Main => Err(error),
        Err(ApiError::NotFound(_)) => {
            // Applying to a missing object creates it: that needs `create`.
            let create = Attributes::Resource {
                verb: "create".to_owned(),
                group: rt.group.to_owned(),
                resource: rt.plural.to_owned(),
                subresource: None,
                namespace: namespace.map(str::to_owned),
                name: Some(name.to_owned()),
            };
            if let Decision::Deny(reason) = app.authz.decide(user, &create) {
                return Err(ApiError::Forbidden {
                    subject: rt.subject(name),
                    message: format!("{} \"{name}\" is forbidden: {reason}", rt.plural),
                });
            }
            let mut object = managed::apply(None, &config, &writer, force).map_err(conflict)?;
            admit_create(app, user, rt, namespace, &mut object)?;
            object["metadata"]["name"] = json!(name);
            let written = app.create_object(rt, namespace, object, &options).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &written.object,
                &written.warnings,
            ))
        }
        Err(error) => Err(error),
        Ok(_) => {
            let written = app
                .update_object(rt, namespace, name, mode, &options, |current| {
                    guard_approval(app, user, rt, mode, current)?;
                    let mut merged =
                        managed::apply(Some(current), &config, &writer, force).map_err(conflict)?;
                    guard_rbac(app, user, rt, namespace, &merged)?;
                    // Only a resourceVersion in the configuration is a
                    // precondition.
                    precondition(&mut merged, config["metadata"]["resourceVersion"].as_str());
                    Ok(merged)
                })
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &written.object,
                &written.warnings,
            ))
        }
    }
}

/// The `Status` a subresource create (binding, eviction) answers with.
fn success_created() -> Response {
    let status = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201 });
    json_response(StatusCode::CREATED, &status, &[])
}

fn typed<T: serde::de::DeserializeOwned>(object: Value) -> Result<T, ApiError> {
    serde_json::from_value(object).map_err(|e| ApiError::internal(format!("stored object: {e}")))
}

/// Deletes a pod if its disruption budget allows it, spending one
/// allowed disruption first; a budget written meanwhile (another
/// eviction, the controller) makes it judge again.
async fn evict<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<&str>,
    name: &str,
) -> Result<Response, ApiError> {
    let eviction = call.json_body()?;
    if eviction["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != name)
    {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object",
        ));
    }
    let mut options = DeleteOptions {
        dry_run: call.param("dryRun").is_some(),
        ..DeleteOptions::default()
    }
    .with_body(&eviction["deleteOptions"])?;
    let budgets_rt = app
        .registry
        .find("policy", "v1", "poddisruptionbudgets")
        .ok_or_else(|| ApiError::internal("poddisruptionbudgets are not registered"))?;
    let write = WriteOptions {
        dry_run: options.dry_run,
        ..call.write_options()?
    };
    let caller_uid = options.uid.clone();
    let mut decided = false;
    for _ in 0..UPDATE_ATTEMPTS {
        let pod: k8s_openapi::api::core::v1::Pod =
            typed(app.get_object(rt, namespace, name).await?.0)?;
        let budgets = app
            .list_objects(budgets_rt, namespace, &ListParams::default())
            .await?
            .items
            .into_iter()
            .map(typed)
            .collect::<Result<Vec<_>, _>>()?;
        // The pod judged is the pod deleted, not a namesake created since
        // (unless the caller named a uid itself).
        options.uid = caller_uid.clone().or_else(|| pod.metadata.uid.clone());
        match eviction::judge(&pod, &budgets, Utc::now())? {
            eviction::Verdict::Delete => {}
            eviction::Verdict::Spend {
                budget,
                resource_version,
                status,
            } => {
                let status = serde_json::to_value(&status).map_err(ApiError::internal)?;
                let spent = app
                    .update_object(
                        budgets_rt,
                        namespace,
                        &budget,
                        UpdateMode::Status,
                        &write,
                        |current| {
                            let mut next = current.clone();
                            next["status"] = status.clone();
                            precondition(&mut next, Some(&resource_version));
                            Ok(next)
                        },
                    )
                    .await;
                match spent {
                    Ok(_) => {}
                    Err(ApiError::Conflict { .. }) => continue,
                    Err(error) => return Err(error),
                }
            }
        }
        decided = true;
        break;
    }
    if !decided {
        return Err(ApiError::TooManyRequests {
            subject: rt.subject(name),
            message: "too many concurrent evictions; try again".to_owned(),
            causes: Vec::new(),
        });
    }
    app.delete_object(rt, namespace, name, &options).await?;
    Ok(success_created())
}

async fn bind<S: Store>(
    app: &Arc<App<S>>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<&str>,
    name: &str,
) -> Result<Response, ApiError> {
    let binding = call.json_body()?;
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| rt.invalid(name, vec![super::status::Cause::required("target.name")]))?
        .to_owned();
    // As upstream's binding validation: a binding targets a Node.
    if let Some(kind) = binding["target"]["kind"].as_str()
        && !kind.is_empty()
        && kind != "Node"
    {
        return Err(rt.invalid(
            name,
            vec![super::status::Cause::not_supported(
                "target.kind",
                &binding["target"]["kind"],
                &["Node"],
            )],
        ));
    }
    app.update_object(
        rt,
        namespace,
        name,
        UpdateMode::Binding,
        &call.write_options()?,
        |current| {
            if let Some(bound) = current["spec"]["nodeName"]
                .as_str()
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::Conflict {
                    subject: rt.subject(name),
                    reason: format!("pod {name} is already assigned to node \"{bound}\""),
                });
            }
            if current["metadata"]["deletionTimestamp"].is_string() {
                return Err(ApiError::Conflict {
                    subject: rt.subject(name),
                    reason: format!("pod {name} is being deleted, cannot be assigned to a host"),
                });
            }
            if let Some(uid) = binding["metadata"]["uid"].as_str()
                && current["metadata"]["uid"].as_str() != Some(uid)
            {
                return Err(ApiError::Conflict {
                    subject: rt.subject(name),
                    reason: format!("the binding is for pod uid {uid}, not this pod"),
                });
            }
            let mut next = current.clone();
            next["spec"]["nodeName"] = json!(node);
            // The binding's annotations go onto the pod.
            if let Some(annotations) = binding["metadata"]["annotations"].as_object()
                && !annotations.is_empty()
            {
                let pod = &mut next["metadata"]["annotations"];
                if !pod.is_object() {
                    *pod = json!({});
                }
                for (key, value) in annotations {
                    pod[key] = value.clone();
                }
            }
            // As upstream's binding storage: the pod is now scheduled.
            let scheduled = json!({ "type": "PodScheduled", "status": "True",
                "lastTransitionTime": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true) });
            let conditions = &mut next["status"]["conditions"];
            if !conditions.is_array() {
                *conditions = json!([]);
            }
            if let Some(list) = conditions.as_array_mut() {
                list.retain(|c| c["type"] != "PodScheduled");
                list.push(scheduled);
            }
            precondition(&mut next, None);
            Ok(next)
        },
    )
    .await?;
    Ok(success_created())
}
