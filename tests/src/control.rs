//! A wharf-control process for end-to-end tests, on the embedded store or
//! on a real etcd started for it, and kubectl pointed at it.

use std::{
    io::Write as _,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use wharf_control::{etcd_process::EtcdProcess, pki::KubeconfigUser};

use crate::lab::workspace_binary;

/// Defines each listed case (a `fn(ControlPlane)`) as two tests, one on
/// each store: `embedded::case` and `etcd::case`.
#[macro_export]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $case() { super::$case($crate::control::ControlPlane::start($crate::control::StoreKind::Embedded)); } )*
        }
        mod etcd {
            $( #[test] fn $case() { super::$case($crate::control::ControlPlane::start($crate::control::StoreKind::Etcd)); } )*
        }
    };
}

/// Which store the server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    Etcd,
}

/// A running server; killed on drop (with its etcd).
#[derive(Debug)]
pub struct ControlPlane {
    child: Option<Child>,
    etcd: Option<EtcdProcess>,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    address: Ipv4Addr,
    port: u16,
    store: StoreKind,
    args: Vec<String>,
}

fn free_port(address: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((address, 0)).expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

impl ControlPlane {
    /// The API server alone: no scheduler or controllers act on what a
    /// test writes, so objects stay exactly as the API left them.
    pub fn start(store: StoreKind) -> Self {
        Self::start_with_args(store, &[])
    }

    /// The API server alone, with extra wharf-control flags.
    pub fn start_with_args(store: StoreKind, args: &[&str]) -> Self {
        let mut all = vec!["--without=scheduler,controllers"];
        all.extend_from_slice(args);
        Self::cluster(store, &all)
    }

    /// wharf-control as it runs by default (API server, scheduler and
    /// controllers), with extra flags.
    pub fn cluster(store: StoreKind, args: &[&str]) -> Self {
        Self::listening_on(Ipv4Addr::LOCALHOST, store, args)
    }

    /// wharf-control on one of this host's addresses other than loopback,
    /// so processes in network namespaces can reach it (see
    /// `Lab::uplink`), with extra flags.
    pub fn listening_on(address: Ipv4Addr, store: StoreKind, args: &[&str]) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        let etcd = match store {
            StoreKind::Embedded => None,
            StoreKind::Etcd => {
                let etcd_dir = dir.path().join("etcd");
                std::fs::create_dir(&etcd_dir).expect("etcd directory");
                Some(
                    runtime
                        .block_on(EtcdProcess::start(&etcd_dir))
                        .expect("start etcd"),
                )
            }
        };
        let mut plane = Self {
            child: None,
            etcd,
            runtime,
            dir,
            address,
            port: free_port(address),
            store,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        plane.launch();
        plane
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir().join("admin.kubeconfig")
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.address, self.port)
    }

    /// Starts the server process and waits until it answers /readyz.
    fn launch(&mut self) {
        let mut command = Command::new(workspace_binary("wharf-control"));
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(format!("{}:{}", self.address, self.port))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        if let Some(etcd) = &self.etcd {
            command.args(["--store", "etcd", "--etcd-endpoints", etcd.endpoint()]);
        }
        if let Some(tokens) = self.token_file() {
            command.arg("--token-auth-file").arg(tokens);
        }
        self.child = Some(command.spawn().expect("spawn wharf-control"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.kubeconfig().exists()
                && self
                    .kubectl(&["get", "--raw", "/readyz", "--request-timeout=2s"])
                    .status
                    .success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "wharf-control did not become ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn token_file(&self) -> Option<PathBuf> {
        let path = self.dir.path().join("tokens.csv");
        path.exists().then_some(path)
    }

    /// Restarts with a static token file (token,user,uid,"groups").
    pub fn restart_with_tokens(&mut self, tokens: &str) {
        std::fs::write(self.dir.path().join("tokens.csv"), tokens).expect("write token file");
        self.kill();
        self.launch();
    }

    /// SIGKILL, no chance to clean up: what a crash looks like.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data (and etcd).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn store(&self) -> StoreKind {
        self.store
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, None)
    }

    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl (preinstalled at /usr/bin/kubectl)");
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(input.as_bytes())
                .expect("write kubectl stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl, panics with its stderr if it fails, returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("kubectl output is UTF-8")
    }

    /// `kubectl apply -f -` of a YAML document.
    pub fn apply(&self, yaml: &str) -> String {
        let output = self.kubectl_with_input(&["apply", "-f", "-"], Some(yaml));
        assert!(
            output.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("kubectl output is UTF-8")
    }

    /// The store's raw bytes on disk (embedded store only).
    pub fn store_file(&self) -> PathBuf {
        self.data_dir().join("store.redb")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir().join("pki/ca.crt")
    }

    /// A kubeconfig that authenticates with a bearer token.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> PathBuf {
        let ca = std::fs::read_to_string(self.ca_file()).expect("read the CA");
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let config =
            wharf_control::pki::kubeconfig(&self.url(), &ca, name, &KubeconfigUser::Token(token));
        std::fs::write(&path, config).expect("write kubeconfig");
        path
    }

    /// A kubeconfig with a client certificate for `user` in `groups`,
    /// issued by the cluster CA (as a node's would be).
    pub fn kubeconfig_for_certificate(&self, user: &str, groups: &[&str]) -> PathBuf {
        let ca =
            wharf_control::pki::Authority::load_or_create(&self.data_dir()).expect("load the CA");
        let credential = ca
            .issue_client(user, groups)
            .expect("issue a client certificate");
        let path = self
            .dir
            .path()
            .join(format!("{}.kubeconfig", user.replace(':', "-")));
        let config = wharf_control::pki::kubeconfig(
            &self.url(),
            &ca.cert_pem,
            user,
            &KubeconfigUser::Certificate(&credential),
        );
        std::fs::write(&path, config).expect("write kubeconfig");
        path
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}
