//! Reading Service and EndpointSlice manifests from a file or a directory
//! of YAML (or JSON) files, several documents per file allowed.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize as _;

use super::translate::{Locality, TranslateError, desired_state};
use crate::proxy::DesiredState;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: document {document}: {reason}")]
    Parse {
        path: PathBuf,
        document: usize,
        reason: String,
    },
    #[error("{path}: {object}: {reason}")]
    Object {
        path: PathBuf,
        object: String,
        reason: String,
    },
    #[error(transparent)]
    Translate(#[from] TranslateError),
}

/// Reads every manifest under `path` into node `node`'s desired state.
/// Any invalid manifest fails the whole load: a partial state would
/// silently drop services that are still meant to exist.
pub fn load_path(path: &Path, node: &str) -> Result<DesiredState, ManifestError> {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    // Which file each object came from, to say where a bad one is.
    let mut origins: HashMap<String, PathBuf> = HashMap::new();
    for file in manifest_files(path)? {
        let text = fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            path: file.clone(),
            source,
        })?;
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| ManifestError::Parse {
                    path: file.clone(),
                    document: index + 1,
                    reason: e.to_string(),
                })?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(serde_yaml::Value::as_str)
                .unwrap_or_default()
                .to_string();
            let object = describe(&value, &kind);
            origins.insert(object.clone(), file.clone());
            let error = |reason: String| ManifestError::Object {
                path: file.clone(),
                object: object.clone(),
                reason,
            };
            match kind.as_str() {
                "Service" => services.push(
                    serde_yaml::from_value::<Service>(value).map_err(|e| error(e.to_string()))?,
                ),
                "EndpointSlice" => slices.push(
                    serde_yaml::from_value::<EndpointSlice>(value)
                        .map_err(|e| error(e.to_string()))?,
                ),
                "List" => {
                    return Err(error(
                        "List objects are not supported; use one document per object".into(),
                    ));
                }
                "" => return Err(error("no kind".into())),
                // Other objects (Deployments next to their Service) are
                // not this mode's business.
                _ => tracing::debug!(file = %file.display(), %object, "ignored"),
            }
        }
    }
    desired_state(&services, &slices, &Locality::node(node)).map_err(|error| {
        let TranslateError::Invalid {
            object,
            field,
            reason,
        } = &error;
        match origins.get(object) {
            Some(path) => ManifestError::Object {
                path: path.clone(),
                object: object.clone(),
                reason: format!("{field}: {reason}"),
            },
            None => ManifestError::Translate(error),
        }
    })
}

/// `Kind namespace/name` for messages.
fn describe(value: &serde_yaml::Value, kind: &str) -> String {
    let metadata = value.get("metadata");
    let field = |name| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(serde_yaml::Value::as_str)
    };
    format!(
        "{} {}/{}",
        if kind.is_empty() { "object" } else { kind },
        field("namespace").unwrap_or("default"),
        field("name").unwrap_or("?")
    )
}

/// The file itself, or a directory's `*.yaml`, `*.yml` and `*.json` files
/// (not recursive, sorted, hidden files skipped: editors' swap files).
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !fs::metadata(path).map_err(read_error)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_error)? {
        let file = entry.map_err(read_error)?.path();
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if manifest && !name.starts_with('.') && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n";

    #[test]
    fn reads_a_directory_of_multi_document_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.yaml"),
            format!(
                "{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n"
            ),
        )
        .unwrap();
        fs::write(
            dir.path().join("b.yml"),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.5]}]\n",
        )
        .unwrap();
        fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        let state = load_path(dir.path(), "node").unwrap();
        let forwarding = state.forwarding();
        let (_, backends) = forwarding.iter().next().unwrap();
        assert_eq!(
            backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.0.0.5:8080"]
        );
    }

    #[test]
    fn invalid_field_values_name_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("svc.yaml"),
            SERVICE.replace("10.96.0.1", "nope"),
        )
        .unwrap();
        let error = load_path(dir.path(), "node").unwrap_err().to_string();
        assert!(
            error.contains("svc.yaml") && error.contains("spec.clusterIP"),
            "{error}"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.yaml");
        fs::write(
            &file,
            SERVICE.replace("ports: [{port: 80}]", "ports: [{port: eighty}]"),
        )
        .unwrap();
        let error = load_path(dir.path(), "node").unwrap_err().to_string();
        assert!(
            error.contains("bad.yaml") && error.contains("Service default/web"),
            "{error}"
        );

        fs::write(&file, "kind: Service\nmetadata: [unclosed\n").unwrap();
        let error = load_path(&file, "node").unwrap_err().to_string();
        assert!(error.contains("bad.yaml: document 1"), "{error}");
    }
}
