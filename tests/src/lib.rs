//! Helpers shared by wharf's integration suites and benchmarks: frames
//! built and checked independently of the dataplane's own code, a loaded
//! dataplane with private pins, network-namespace plumbing, a wharf-control
//! process with kubectl pointed at it, and a containerd of a test's own.

pub mod cluster;
pub mod containerd;
pub mod control;
pub mod fixture;
pub mod frame;
pub mod lab;
pub mod node;
pub mod services;
pub mod simnodes;
pub mod vm;
