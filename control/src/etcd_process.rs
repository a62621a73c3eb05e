//! Runs a single-member etcd server (Debian's `etcd`) as a child process on
//! loopback, for the store conformance suite, the end-to-end tests and the
//! benchmarks.

use std::{
    net::{Ipv4Addr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::store::{EtcdStore, Store as _};

/// How long a fresh etcd may take to answer (measured: 0.25 s here).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdProcessError {
    #[error("cannot pick a free loopback port: {0}")]
    Port(#[source] std::io::Error),
    #[error("cannot prepare etcd's data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {binary} (apt-get install etcd-server): {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd at {endpoint} did not become ready within {READY_TIMEOUT:?}")]
    NotReady { endpoint: String },
}

/// A running etcd; killed with SIGKILL when dropped (tokio reaps it).
#[derive(Debug)]
pub struct EtcdProcess {
    /// Held for `kill_on_drop`: etcd ends with this value.
    _child: Child,
    endpoint: String,
}

fn free_port() -> Result<u16, EtcdProcessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(EtcdProcessError::Port)?;
    Ok(listener
        .local_addr()
        .map_err(EtcdProcessError::Port)?
        .port())
}

impl EtcdProcess {
    /// Starts etcd with its data in `data_dir` and waits until it serves.
    pub async fn start(data_dir: &Path) -> Result<Self, EtcdProcessError> {
        prepare(data_dir)?;
        let binary = PathBuf::from("etcd");
        let client = format!("http://127.0.0.1:{}", free_port()?);
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let child = Command::new(&binary)
            .args(args(data_dir, &client, &peer))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EtcdProcessError::Spawn { binary, source })?;
        let process = Self {
            _child: child,
            endpoint: client,
        };
        wait_ready(&process.endpoint).await?;
        Ok(process)
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// Makes etcd's data directory, private: etcd warns about (and future
/// versions refuse) group-readable data.
pub fn prepare(data_dir: &Path) -> Result<(), EtcdProcessError> {
    let failed = |source| EtcdProcessError::DataDir {
        path: data_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(failed)?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}

/// The flags of a single-member etcd named `wharf` with its data in
/// `data_dir`, serving clients at `client` and itself at `peer`, logging
/// errors only.
pub fn args(data_dir: &Path, client: &str, peer: &str) -> Vec<String> {
    vec![
        "--name=wharf".into(),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=wharf={peer}"),
        "--logger=zap".into(),
        "--log-level=error".into(),
    ]
}

/// Waits until the etcd at `endpoint` answers a read.
pub async fn wait_ready(endpoint: &str) -> Result<(), EtcdProcessError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(store) = EtcdStore::connect(&[endpoint.to_string()]).await
            && store.revision().await.is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(EtcdProcessError::NotReady {
                endpoint: endpoint.into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
