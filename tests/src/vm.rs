//! The VMs the suites run their IPVS cases in: `wharf_cli::vm` (Debian's
//! kernel under qemu) carrying the calling test binary.

use std::time::Duration;

pub use wharf_cli::vm::{IPVS_MODULES, Vm, VmRun};

/// A VM for running the calling test or benchmark binary again inside
/// (as `/wharf/deps/<name>`, next to `/wharf/wharf-agent` and
/// `/wharf/wharf-probe`, where `lab::workspace_binary` looks), with the
/// modules IPVS mode needs.
pub fn for_this_binary(name: &str) -> Vm {
    Vm::new()
        .modules(&IPVS_MODULES)
        .file(
            std::env::current_exe().expect("own path"),
            &format!("/wharf/deps/{name}"),
        )
        .file(
            crate::lab::workspace_binary("wharf-agent"),
            "/wharf/wharf-agent",
        )
        .file(
            crate::lab::workspace_binary("wharf-probe"),
            "/wharf/wharf-probe",
        )
}

/// Runs `script` in `vm`, panicking with the console if it never
/// reported its exit.
pub fn run(vm: &Vm, script: &str, timeout: Duration) -> VmRun {
    vm.run(script, timeout).unwrap_or_else(|e| panic!("{e}"))
}
