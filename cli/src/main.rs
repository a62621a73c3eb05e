//! `wharf`: local multi-node clusters on this Linux host.
//!
//! ```text
//! wharf cluster up --name N [--nodes K] [--proxy-mode M] [--store S] [--runtime R]
//! wharf cluster down --name N [--keep-data]
//! wharf cluster status [--name N]
//! ```

mod cluster;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::cluster::{Host, Spec};

#[derive(Debug, Parser)]
#[command(name = "wharf", version, about = "wharf: local clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Local multi-node clusters: each node a network namespace of this
    /// host.
    Cluster {
        /// Where clusters keep their state, logs and data, one directory
        /// each.
        #[arg(
            long,
            env = "WHARF_CLUSTERS_DIR",
            default_value = "/var/lib/wharf/clusters"
        )]
        clusters_dir: PathBuf,
        #[command(subcommand)]
        command: ClusterCommand,
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
    let Command::Cluster {
        clusters_dir,
        command,
    } = cli.command;
    let host = Host::new(clusters_dir)?;
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
