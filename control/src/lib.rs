//! wharf-control: the Kubernetes-compatible API server and its storage.

pub mod etcd_process;
pub mod store;
