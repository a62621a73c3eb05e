//! IPVS where this host's kernel has no ip_vs: the same benchmark, run by
//! this very binary inside a VM booted from Debian's kernel
//! (`wharf_cli::vm`) with the workspace's binaries and wrk copied in, its
//! `results.json` sent back through the VM's outbox and its points taken
//! into this run. The VM is software-emulated (qemu TCG, tens of times
//! slower than the host), so its points are marked (`Point::vm`): their
//! absolute figures do not compare with the host's, their ratios to the
//! same VM's direct-to-pod baseline do.

use std::time::Duration;

use wharf_cli::vm::{IPVS_MODULES, Vm};

use super::{
    BenchError, BenchMode, RoutingArgs,
    report::{Point, Results},
    wrk,
};
use crate::{cluster::Host, progress::Progress};

/// Where the run inside keeps its clusters and writes its results.
const CLUSTERS: &str = "/tmp/clusters";
const OUT: &str = "/tmp/out";
/// Memory for a 2-node cluster at 10k services with the load running
/// (wharf-control holds every object; the agents their tables).
const MEMORY_MB: u32 = 6144;
/// Booting, `cluster up` and the servers, emulated.
const START_UP: Duration = Duration::from_secs(600);

/// The workspace binaries the cluster runs, beside `wharf` as on the host.
const BINARIES: [&str; 3] = ["wharf-control", "wharf-agent", "wharf-cni"];

/// Measures `points` (IPVS at each service count) in a VM; what fails is
/// written into the points.
pub async fn measure(
    host: &Host,
    args: &RoutingArgs,
    points: &mut [Point],
    progress: &mut Progress,
) {
    progress.done("ipvs: this kernel has no ip_vs; measuring it in a VM (software-emulated)");
    match run(host, args, points).await {
        Ok(inside) => {
            let machine = format!(
                "qemu TCG (software-emulated), Linux {}, {} vCPUs",
                inside.kernel, inside.cpus
            );
            for point in points.iter_mut() {
                match inside.points.iter().find(|p| p.services == point.services) {
                    Some(measured) => *point = measured.clone(),
                    None => point.error = Some("the run in the VM did not report it".into()),
                }
                point.vm = Some(machine.clone());
            }
            progress.done("ipvs: measured in the VM");
        }
        Err(error) => {
            progress.done(&format!("ipvs in the VM: {error}"));
            for point in points.iter_mut() {
                point.error = Some(format!("in the VM: {error}"));
            }
        }
    }
}

/// Boots the VM, runs the benchmark inside and reads its results.
async fn run(host: &Host, args: &RoutingArgs, points: &[Point]) -> Result<Results, BenchError> {
    let vm = vm(host)?;
    let (script, timeout) = (script(args, points), timeout(args, points.len()));
    let run = match tokio::task::spawn_blocking(move || vm.run(&script, timeout)).await {
        Ok(run) => run?,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };
    serde_json::from_slice(&run.outbox).map_err(|source| {
        let lines: Vec<&str> = run.console.lines().collect();
        BenchError::VmResults {
            status: run.status,
            source,
            console_tail: lines[lines.len().saturating_sub(20)..].join("\n"),
        }
    })
}

/// The VM: IPVS's modules, the bridge the underlay needs and the overlay
/// filesystem pods' roots are, `wharf` and the binaries it starts, and
/// wrk; its console echoed, indented.
fn vm(host: &Host) -> Result<Vm, BenchError> {
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        path: "/proc/self/exe".into(),
        source,
    })?;
    let mut vm = Vm::new()
        .modules(&IPVS_MODULES)
        .modules(&["bridge", "overlay"])
        .memory_mb(MEMORY_MB)
        .echo("    vm │ ")
        .file(exe, "/wharf/wharf")
        .file(wrk::WRK, wrk::WRK);
    for name in BINARIES {
        vm = vm.file(host.binary(name)?, &format!("/wharf/{name}"));
    }
    Ok(vm)
}

/// `wharf bench routing` inside, with this run's settings, its output
/// piped (a plain log rather than a redrawn terminal line) and its
/// results written to the outbox.
fn script(args: &RoutingArgs, points: &[Point]) -> String {
    let services: Vec<String> = points.iter().map(|p| p.services.to_string()).collect();
    format!(
        "set -o pipefail\n\
         /wharf/wharf --clusters-dir {CLUSTERS} bench routing --modes {} --services {} \
         --endpoints {} --duration {} --connections {} --threads {} --rounds {} --samples {} \
         --sync-timeout {} --out {OUT} 2>&1 | cat\n\
         status=$?\n\
         cat {OUT}/results.json > /dev/ttyS1\n\
         exit $status\n",
        BenchMode::Ipvs.name(),
        services.join(","),
        args.endpoints,
        args.duration,
        args.connections,
        args.threads,
        args.rounds,
        args.samples,
        args.sync_timeout,
    )
}

/// Long enough for every step of every count to run into its own
/// timeout inside.
fn timeout(args: &RoutingArgs, counts: usize) -> Duration {
    let loads = 3 * 2 * args.rounds.max(1) as u64 * (args.duration + 60);
    START_UP + Duration::from_secs(counts as u64 * (2 * args.sync_timeout + loads + 600))
}
