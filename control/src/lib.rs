//! wharf-control: the Kubernetes-compatible API server and its storage.

pub mod apiserver;
pub mod etcd_process;
pub mod pki;
pub mod store;
