//! API errors as Kubernetes `Status` objects: the code, reason, message and
//! details shape that kubectl and client libraries parse.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::store::StoreError;

/// One invalid field, as `details.causes` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// The field path: `spec.containers[0].name`.
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".to_owned(),
        }
    }

    /// `value` is shown quoted (strings) or as is (numbers), as upstream.
    pub fn invalid(field: impl Into<String>, value: &Value, detail: impl AsRef<str>) -> Self {
        Self {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {value}: {}", detail.as_ref()),
        }
    }

    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let supported: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        Self {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {value}: supported values: {}",
                supported.join(", ")
            ),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        Self {
            reason: "FieldValueDuplicate",
            field: field.into(),
            message: format!("Duplicate value: {value}"),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {}", detail.into()),
        }
    }

    fn describe(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

/// The resource an error is about: `group` is empty for core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    pub group: String,
    /// The plural resource name (`pods`), as upstream's details.kind.
    pub resource: String,
    pub name: String,
}

impl Subject {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{} \"{}\" not found", .0.qualified(), .0.name)]
    NotFound(Subject),
    #[error("{} \"{}\" already exists", .0.qualified(), .0.name)]
    AlreadyExists(Subject),
    #[error("Operation cannot be fulfilled on {} \"{}\": {reason}", subject.qualified(), subject.name)]
    Conflict { subject: Subject, reason: String },
    #[error("Apply failed with {} conflict{}: {}", .conflicts.len(), if .conflicts.len() == 1 { "" } else { "s" }, describe_conflicts(.conflicts))]
    ApplyConflict {
        subject: Subject,
        conflicts: Vec<Cause>,
    },
    #[error("{kind} \"{name}\" is invalid: {}", describe_causes(.causes))]
    Invalid {
        kind: String,
        name: String,
        group: String,
        causes: Vec<Cause>,
    },
    #[error("{message}")]
    BadRequest { message: String },
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{message}")]
    Forbidden { subject: Subject, message: String },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotSupported { subject: Subject },
    #[error("the server could not find the requested resource")]
    NoSuchResource,
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {accepted}"
    )]
    UnsupportedMediaType { accepted: &'static str },
    #[error("the server has received a request that is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{message}")]
    Gone { message: String },
    /// Refused for now; `causes` say what to wait for (an eviction a
    /// disruption budget does not allow).
    #[error("{message}")]
    TooManyRequests {
        subject: Subject,
        message: String,
        causes: Vec<Cause>,
    },
    #[error("Internal error occurred: {message}")]
    Internal { message: String },
}

fn describe_conflicts(conflicts: &[Cause]) -> String {
    conflicts
        .iter()
        .map(|c| format!("{}: {}", c.message, c.field))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_causes(causes: &[Cause]) -> String {
    match causes {
        [one] => one.describe(),
        many => format!(
            "[{}]",
            many.iter()
                .map(Cause::describe)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::Internal {
            message: message.to_string(),
        }
    }

    pub fn code(&self) -> StatusCode {
        match self {
            Self::NotFound(_) | Self::NoSuchResource => StatusCode::NOT_FOUND,
            Self::AlreadyExists(_) | Self::Conflict { .. } | Self::ApplyConflict { .. } => {
                StatusCode::CONFLICT
            }
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::MethodNotSupported { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Gone { .. } => StatusCode::GONE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) | Self::NoSuchResource => "NotFound",
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::Conflict { .. } | Self::ApplyConflict { .. } => "Conflict",
            Self::Invalid { .. } => "Invalid",
            Self::BadRequest { .. } => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::MethodNotSupported { .. } => "MethodNotAllowed",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            Self::TooLarge { .. } => "RequestEntityTooLarge",
            Self::Gone { .. } => "Expired",
            Self::TooManyRequests { .. } => "TooManyRequests",
            Self::Internal { .. } => "InternalError",
        }
    }

    fn details(&self) -> Option<Value> {
        let subject = |subject: &Subject| json!({ "name": subject.name, "group": subject.group, "kind": subject.resource });
        match self {
            Self::NotFound(s) | Self::AlreadyExists(s) => Some(subject(s)),
            Self::Conflict { subject: s, .. }
            | Self::Forbidden { subject: s, .. }
            | Self::MethodNotSupported { subject: s } => Some(subject(s)),
            Self::ApplyConflict {
                subject: s,
                conflicts: causes,
            }
            | Self::TooManyRequests {
                subject: s, causes, ..
            } => {
                let mut details = subject(s);
                details["causes"] = causes
                    .iter()
                    .map(|c| json!({ "reason": c.reason, "message": c.message, "field": c.field }))
                    .collect();
                Some(details)
            }
            Self::Invalid {
                kind,
                name,
                group,
                causes,
            } => Some(json!({
                "name": name,
                "group": group,
                "kind": kind,
                "causes": causes.iter().map(|cause| json!({
                    "reason": cause.reason,
                    "message": cause.message,
                    "field": cause.field,
                })).collect::<Vec<_>>(),
            })),
            _ => None,
        }
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        if let Some(details) = self.details() {
            status["details"] = details;
        }
        status
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Compacted {
                requested,
                compacted,
            } => Self::Gone {
                message: match compacted {
                    Some(oldest) => format!("too old resource version: {requested} ({oldest})"),
                    None => format!("too old resource version: {requested}"),
                },
            },
            // Upstream answers reads from the future with a timeout; a clear
            // error serves clients better.
            StoreError::FutureRevision { requested, .. } => {
                Self::bad_request(format!("Too large resource version: {requested}"))
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.status().to_string(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_lists_every_cause_like_upstream() {
        let error = ApiError::Invalid {
            kind: "Pod".to_owned(),
            name: "web".to_owned(),
            group: String::new(),
            causes: vec![
                Cause::required("spec.containers[0].name"),
                Cause::invalid(
                    "metadata.name",
                    &json!("Web"),
                    "a lowercase RFC 1123 subdomain",
                ),
            ],
        };
        assert_eq!(
            error.to_string(),
            "Pod \"web\" is invalid: [spec.containers[0].name: Required value, metadata.name: \
             Invalid value: \"Web\": a lowercase RFC 1123 subdomain]"
        );
        let status = error.status();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueRequired"
        );
        assert_eq!(status["details"]["causes"][1]["field"], "metadata.name");
    }

    #[test]
    fn not_found_names_the_group_qualified_resource() {
        let error = ApiError::NotFound(Subject {
            group: "apps".to_owned(),
            resource: "deployments".to_owned(),
            name: "web".to_owned(),
        });
        assert_eq!(error.to_string(), "deployments.apps \"web\" not found");
        assert_eq!(error.status()["details"]["kind"], "deployments");
    }
}
