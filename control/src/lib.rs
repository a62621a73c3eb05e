//! wharf-control: the Kubernetes-compatible API server and its storage,
//! the scheduler and the controllers.

pub mod apiserver;
pub mod budgets;
pub mod components;
pub mod controllers;
pub mod etcd_process;
pub mod events;
pub mod informer;
pub mod join;
pub mod labels;
pub mod leader;
pub mod pki;
pub mod pods;
pub mod resources;
pub mod scheduler;
pub mod store;
pub mod usage;
