//! What the `wharf` command shares with the test suites: a node's
//! containerd configuration and the images built for it.

pub mod containerd;
