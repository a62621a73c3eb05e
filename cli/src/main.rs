//! `wharf`: local multi-node clusters on this Linux host.
//!
//! ```text
//! wharf cluster up --name N [--nodes K] [--proxy-mode M] [--store S] [--runtime R]
//! wharf cluster down --name N [--keep-data]
//! wharf cluster status [--name N]
//! wharf bench routing [--modes M,..] [--services 1,1000,10000] [--out DIR]
//! ```

mod bench;
mod cluster;
mod progress;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::cluster::{Host, Spec};

#[derive(Debug, Parser)]
#[command(
    name = "wharf",
    version,
    about = "wharf: local clusters and their benchmarks"
)]
struct Cli {
    /// Where clusters keep their state, logs and data, one directory
    /// each.
    #[arg(
        long,
        global = true,
        env = "WHARF_CLUSTERS_DIR",
        default_value = "/var/lib/wharf/clusters"
    )]
    clusters_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Local multi-node clusters: each node a network namespace of this
    /// host.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Benchmarks, and the load generator and servers they run in pods.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Service routing in every proxy mode side by side, on a local
    /// cluster per mode: rates and latencies through a ClusterIP against
    /// the direct-to-pod baseline, full sync and programming latency by
    /// service count. Writes JSON, markdown and SVG charts.
    Routing(bench::RoutingArgs),
    /// Answers HTTP (with its name) and UDP datagrams on a port, until
    /// killed: the benchmark's backend.
    Server {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Connect-request-close or UDP request/response load for a while;
    /// prints one JSON summary (requests, errors, rate, p50, p99).
    Client {
        #[arg(long, value_enum)]
        kind: bench::load::ClientKind,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Seconds.
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
    /// Asks a server for its name over and over; prints the monotonic
    /// time and the name whenever the answer changes.
    Probe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        interval_ms: u64,
        /// Seconds.
        #[arg(long, default_value_t = 60)]
        duration: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Builds a cluster (or finishes and restarts one) and waits until
    /// every node is Ready.
    Up {
        #[arg(long, default_value = "wharf")]
        name: String,
        #[command(flatten)]
        spec: Spec,
    },
    /// Removes every trace of a cluster: processes, pods, namespaces,
    /// links, routes, BPF pins, cgroups, rules and its directory.
    Down {
        #[arg(long, default_value = "wharf")]
        name: String,
        /// Keep the cluster's directory (logs, certificates, store).
        #[arg(long)]
        keep_data: bool,
    },
    /// Shows clusters, their modes and health; exits 1 if one is not
    /// healthy.
    Status {
        #[arg(long)]
        name: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What the benchmark runs in pods: plain threads (the server makes
    // its own runtime).
    if let Command::Bench { command } = &cli.command {
        let outcome = match command {
            BenchCommand::Routing(_) => None,
            BenchCommand::Server { name, port } => Some(bench::load::server(name, *port)),
            BenchCommand::Client {
                kind,
                target,
                threads,
                duration,
            } => Some(
                bench::load::client(*kind, *target, *threads, Duration::from_secs(*duration)).map(
                    |summary| {
                        println!("{}", serde_json::to_string(&summary).expect("plain data"));
                    },
                ),
            ),
            BenchCommand::Probe {
                target,
                interval_ms,
                duration,
            } => Some(bench::load::probe(
                *target,
                Duration::from_millis(*interval_ms),
                Duration::from_secs(*duration),
            )),
        };
        if let Some(outcome) = outcome {
            return match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("wharf bench: {error}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("wharf: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let host = Host::new(cli.clusters_dir)?;
    let command = match cli.command {
        Command::Cluster { command } => command,
        Command::Bench {
            command: BenchCommand::Routing(args),
        } => {
            let line: Vec<String> = std::iter::once("wharf".to_string())
                .chain(std::env::args().skip(1))
                .collect();
            let results = bench::routing(&host, &args, line.join(" ")).await?;
            print!("{}", results.markdown());
            println!("results in {}", args.out.display());
            let complete = results.points.iter().all(|p| p.error.is_none());
            return Ok(if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Bench { .. } => unreachable!("run in main without a runtime"),
    };
    match command {
        ClusterCommand::Up { name, spec } => {
            eprintln!("wharf: cluster {name} up");
            let nodes = spec.nodes;
            let layout = cluster::up(&host, &name, spec).await?;
            let kubeconfig = layout.kubeconfig();
            println!("cluster {name} is up: {nodes} node(s) Ready");
            println!("  kubeconfig: {}", kubeconfig.display());
            println!("next steps:");
            println!("  export KUBECONFIG={}", kubeconfig.display());
            println!("  kubectl get nodes -o wide");
            println!("  kubectl apply -f examples/demo/web.yaml");
            println!("  wharf cluster down --name {name}");
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Down { name, keep_data } => {
            eprintln!("wharf: cluster {name} down");
            cluster::down(&host, &name, keep_data)?;
            println!("cluster {name} removed");
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Status { name } => {
            let statuses = cluster::status(&host, name.as_deref()).await?;
            if statuses.is_empty() {
                println!("no clusters");
            }
            let mut healthy = true;
            for status in &statuses {
                print!("{}", status.render());
                healthy &= status.healthy();
            }
            Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
