//! wharf-cni: a CNI 1.1 plugin (ADD, DEL, CHECK, VERSION, GC, STATUS)
//! for flat, routable pod networking. Addresses come from the node agent
//! over its UNIX socket (never guessed: an agent that is down is an
//! error the runtime retries); the pod's veth, address and routes are
//! set up by `wharf_agent::podnet`. Results and errors go to stdout as
//! the spec says, errors with a non-zero exit.

mod spec;

use std::{io::Read as _, net::Ipv4Addr, path::Path, process::ExitCode};

use spec::{Attached, CniError, Code, Command, Invocation, NetConf};
use wharf_agent::podnet::{self, Wiring};
use wharf_proto::{AgentClient, Attachment, PodLink, StatusRequest, ValidAttachments};

/// The pods' MTU unless the configuration says.
const DEFAULT_MTU: u32 = 1500;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors carry the configuration's version when it has a valid one.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::LATEST.to_string());
    let outcome = match read {
        Ok(_) => run(&stdin),
        Err(e) => Err(CniError::new(Code::Io, "cannot read stdin", e.to_string())),
    };
    match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            println!("{}", error.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// Runs the verb the environment names; returns what to print.
fn run(stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    let invocation = Invocation::from_env(|name| std::env::var(name).ok())?;
    if invocation.command == Command::Version {
        return Ok(Some(spec::version_info(stdin)));
    }
    let conf = NetConf::parse(stdin, invocation.command)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(Code::Io, "cannot start", e.to_string()))?;
    runtime.block_on(async {
        match invocation.command {
            Command::Add => add(&invocation, &conf).await.map(Some),
            Command::Del => del(&invocation, &conf).await.map(|()| None),
            Command::Check => check(&invocation, &conf).map(|()| None),
            Command::Gc => gc(&conf).await.map(|()| None),
            Command::Status => status(&conf).await.map(|()| None),
            Command::Version => unreachable!("answered above"),
        }
    })
}

async fn agent(conf: &NetConf) -> Result<AgentClient, CniError> {
    let socket = conf.agent_socket();
    wharf_proto::connect(&socket).await.map_err(|e| {
        CniError::new(
            Code::TryAgainLater,
            "the wharf agent is not reachable",
            format!("{}: {e}", socket.display()),
        )
    })
}

/// Maps an agent's answer to the spec's codes.
fn agent_error(status: tonic::Status) -> CniError {
    let code = match status.code() {
        tonic::Code::Unavailable => Code::TryAgainLater,
        tonic::Code::ResourceExhausted => Code::PoolExhausted,
        _ => Code::Io,
    };
    CniError::new(
        code,
        "the wharf agent refused",
        status.message().to_string(),
    )
}

fn attachment(container_id: &str, ifname: &str) -> Attachment {
    Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    }
}

fn wiring(invocation: &Invocation, conf: &NetConf, address: Ipv4Addr, gateway: Ipv4Addr) -> Wiring {
    Wiring {
        host_ifname: podnet::host_ifname(&invocation.container_id, &invocation.ifname),
        pod_ifname: invocation.ifname.clone(),
        address,
        gateway,
        mtu: conf.mtu.unwrap_or(DEFAULT_MTU),
        alias: podnet::alias(&invocation.container_id, &invocation.ifname),
    }
}

fn netns(invocation: &Invocation) -> Result<&Path, CniError> {
    let netns = invocation.netns.as_deref().ok_or_else(|| {
        CniError::new(
            Code::InvalidEnvironment,
            "invalid necessary environment variables",
            "CNI_NETNS is not set",
        )
    })?;
    if !netns.exists() {
        return Err(CniError::new(
            Code::UnknownContainer,
            "the container's network namespace does not exist",
            netns.display().to_string(),
        ));
    }
    Ok(netns)
}

async fn add(invocation: &Invocation, conf: &NetConf) -> Result<serde_json::Value, CniError> {
    let netns = netns(invocation)?;
    let mut agent = agent(conf).await?;
    let assigned = agent
        .ipam
        .allocate(attachment(&invocation.container_id, &invocation.ifname))
        .await
        .map_err(agent_error)?
        .into_inner();
    let parse = |text: &str| {
        text.parse::<Ipv4Addr>().map_err(|_| {
            CniError::new(
                Code::Io,
                "the wharf agent answered nonsense",
                text.to_string(),
            )
        })
    };
    let (address, gateway) = (parse(&assigned.address)?, parse(&assigned.gateway)?);
    let wiring = wiring(invocation, conf, address, gateway);
    let macs = match podnet::attach(netns, &wiring) {
        Ok(macs) => macs,
        Err(error) => {
            // Leave nothing behind: the runtime will retry ADD or DEL.
            let _ = podnet::detach(&wiring.host_ifname);
            let _ = agent
                .ipam
                .release(attachment(&invocation.container_id, &invocation.ifname))
                .await;
            return Err(CniError::new(
                Code::Wiring,
                "setting up the pod's interface failed",
                error.to_string(),
            ));
        }
    };
    // The node's per-packet programs on the pod's link before the pod
    // runs: replies to clients outside the node are translated there.
    if let Err(status) = agent
        .datapath
        .attach_pod_link(PodLink {
            name: wiring.host_ifname.clone(),
        })
        .await
    {
        let _ = podnet::detach(&wiring.host_ifname);
        let _ = agent
            .ipam
            .release(attachment(&invocation.container_id, &invocation.ifname))
            .await;
        return Err(agent_error(status));
    }
    Ok(spec::result(
        &conf.cni_version,
        &Attached {
            host_ifname: wiring.host_ifname,
            host_mac: macs.host,
            pod_ifname: wiring.pod_ifname,
            pod_mac: macs.pod,
            sandbox: netns.to_path_buf(),
            address: format!("{address}/32"),
            gateway: gateway.to_string(),
            mtu: wiring.mtu,
        },
    ))
}

/// Removes the node end (and so the pod end) first, then frees the
/// address, so it is never handed out while still on an interface. Both
/// are no-ops when already done: DEL is idempotent.
async fn del(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let host = podnet::host_ifname(&invocation.container_id, &invocation.ifname);
    podnet::detach(&host).map_err(|e| {
        CniError::new(
            Code::Io,
            "removing the pod's interface failed",
            e.to_string(),
        )
    })?;
    agent(conf)
        .await?
        .ipam
        .release(attachment(&invocation.container_id, &invocation.ifname))
        .await
        .map_err(agent_error)?;
    Ok(())
}

fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let netns = netns(invocation)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "invalid network configuration",
            "CHECK needs prevResult",
        )
    })?;
    let address = spec::previous_address(prev).ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "invalid network configuration",
            "prevResult has no IPv4 address",
        )
    })?;
    // The gateway does not matter to what is checked.
    let wiring = wiring(invocation, conf, address, Ipv4Addr::UNSPECIFIED);
    let problems = podnet::check(netns, &wiring).map_err(|e| {
        CniError::new(
            Code::CheckFailed,
            "checking the pod's interface failed",
            e.to_string(),
        )
    })?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            Code::CheckFailed,
            "the pod's interface is not as ADD left it",
            problems.join("; "),
        ))
    }
}

/// Removes the node end of, then frees the address of, every attachment
/// not in `cni.dev/valid-attachments` (the order DEL keeps). A node end
/// that cannot be removed does not stop the rest; the first failure is
/// reported at the end.
async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let keep: Vec<String> = valid
        .iter()
        .map(|a| podnet::alias(&a.container_id, &a.ifname))
        .collect();
    let io = |e: podnet::PodnetError| {
        CniError::new(Code::Io, "removing leaked interfaces failed", e.to_string())
    };
    let mut failure = None;
    for (name, alias) in podnet::attached().map_err(io)? {
        if !keep.contains(&alias)
            && let Err(error) = podnet::detach(&name)
        {
            failure.get_or_insert(io(error));
        }
    }
    let attachments = valid
        .iter()
        .map(|a| attachment(&a.container_id, &a.ifname))
        .collect();
    agent(conf)
        .await?
        .ipam
        .collect(ValidAttachments { attachments })
        .await
        .map_err(agent_error)?;
    failure.map_or(Ok(()), Err)
}

/// Ready when the agent answers and has a podCIDR to hand out from.
async fn status(conf: &NetConf) -> Result<(), CniError> {
    let not_available =
        |details: String| CniError::new(Code::NotAvailable, "the plugin is not available", details);
    let mut agent = agent(conf)
        .await
        .map_err(|e| not_available(e.to_string()))?;
    agent
        .ipam
        .status(StatusRequest {})
        .await
        .map_err(|e| not_available(e.message().to_string()))?;
    Ok(())
}
