//! What the `wharf` command shares with the test suites: a node's
//! containerd configuration and the images built for it, and the VMs
//! (Debian's kernel under qemu) that stand in for kernel features this
//! host lacks.

pub mod containerd;
pub mod vm;
