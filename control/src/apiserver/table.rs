//! Server-side `Table` output (meta.k8s.io/v1), what `kubectl get` prints.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    chrono::{DateTime, Utc},
};
use serde_json::{Value, json};

/// One column definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    /// `string`, `integer`, `date`.
    pub kind: &'static str,
    /// Columns above 0 only show with `-o wide`.
    pub priority: u8,
    pub format: &'static str,
}

impl Column {
    pub const fn new(name: &'static str, kind: &'static str, priority: u8) -> Self {
        Self {
            name,
            kind,
            priority,
            format: "",
        }
    }

    fn definition(&self) -> Value {
        json!({
            "name": self.name,
            "type": self.kind,
            "format": self.format,
            "description": "",
            "priority": self.priority,
        })
    }
}

pub fn name_column() -> Column {
    Column {
        format: "name",
        ..Column::new("Name", "string", 0)
    }
}

/// Upstream's HumanDuration: two significant units, coarser as it grows.
pub fn human_duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    let years = days / 365;
    match seconds {
        s if s < 60 * 2 => format!("{s}s"),
        s if minutes < 10 => match s % 60 {
            0 => format!("{minutes}m"),
            rest => format!("{minutes}m{rest}s"),
        },
        _ if minutes < 60 * 3 => format!("{minutes}m"),
        _ if hours < 8 => match minutes % 60 {
            0 => format!("{hours}h"),
            rest => format!("{hours}h{rest}m"),
        },
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 24 * 8 => match hours % 24 {
            0 => format!("{days}d"),
            rest => format!("{days}d{rest}h"),
        },
        _ if days < 365 * 2 => format!("{days}d"),
        _ if days < 365 * 8 => match days % 365 {
            0 => format!("{years}y"),
            rest => format!("{years}y{rest}d"),
        },
        _ => format!("{years}y"),
    }
}

/// The AGE cell: time since creation, `<unknown>` without a timestamp.
pub fn age(meta: &ObjectMeta, now: DateTime<Utc>) -> String {
    match &meta.creation_timestamp {
        Some(created) => human_duration((now - created.0).num_seconds()),
        None => "<unknown>".to_owned(),
    }
}

/// What a table row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }

    fn embed(self, object: &Value) -> Value {
        match self {
            Self::None => Value::Null,
            Self::Object => object.clone(),
            Self::Metadata => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object["metadata"],
            }),
        }
    }
}

/// A table of `rows` (each: cells and the object they came from).
pub fn table(
    columns: &[Column],
    rows: Vec<(Vec<Value>, &Value)>,
    include: IncludeObject,
    list_meta: Value,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns.iter().map(Column::definition).collect::<Vec<_>>(),
        "rows": rows.into_iter().map(|(cells, object)| {
            let mut row = json!({ "cells": cells });
            let embedded = include.embed(object);
            if !embedded.is_null() {
                row["object"] = embedded;
            }
            row
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn durations_read_like_kubectl() {
        for (seconds, expected) in [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 20 * 60, "3h20m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (40 * 86400, "40d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
        ] {
            assert_eq!(human_duration(seconds), expected, "{seconds}s");
        }
    }
}
