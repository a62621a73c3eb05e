//! Kubernetes Service and EndpointSlice objects to desired state, with
//! kube-proxy's semantics, and the YAML files standalone mode reads them
//! from.

mod files;
mod translate;

pub use files::{ManifestError, load_path};
pub use translate::{Locality, TranslateError, Translation, ZONE_LABEL, desired_state, translate};
