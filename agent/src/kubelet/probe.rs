//! Container probes as kubelet runs them: `exec` (a command inside the
//! container, success on exit 0), `httpGet` (from the node to the pod's
//! address, success on 200-399, redirects not followed) and `tcpSocket`
//! (a connection opens), each bounded by `timeoutSeconds`; and the
//! schedule around them (`initialDelaySeconds`, `periodSeconds`,
//! `successThreshold`, `failureThreshold`) that turns results into
//! transitions.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
}

/// How a probe is checked, with its target resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Exec(Vec<String>),
    Http {
        address: SocketAddr,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp(SocketAddr),
}

/// A probe's schedule, with kubelet's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Schedule {
    pub fn of(probe: &Probe) -> Self {
        let seconds = |value: Option<i32>, default: u64| {
            Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
        };
        let count = |value: Option<i32>, default: u32| {
            value
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        Self {
            initial_delay: seconds(probe.initial_delay_seconds, 0),
            period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// A named container port (`port: http`) or a number.
fn port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

fn http(container: &Container, get: &HTTPGetAction, pod_ip: IpAddr) -> Result<Check, String> {
    if get
        .scheme
        .as_deref()
        .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
    {
        return Err("only HTTP probes are supported (not HTTPS)".into());
    }
    let ip = match get.host.as_deref().filter(|h| !h.is_empty()) {
        Some(host) => host
            .parse()
            .map_err(|_| format!("probe host {host:?} is not an IP address"))?,
        None => pod_ip,
    };
    let mut path = get.path.clone().unwrap_or_default();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    Ok(Check::Http {
        address: SocketAddr::new(ip, port(container, &get.port)?),
        path,
        headers: get
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

/// What `probe` checks, for `container` at `pod_ip`.
pub fn check(container: &Container, probe: &Probe, pod_ip: IpAddr) -> Result<Check, String> {
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err("exec probe without a command".into());
        }
        return Ok(Check::Exec(command));
    }
    if let Some(get) = &probe.http_get {
        return http(container, get, pod_ip);
    }
    if let Some(tcp) = &probe.tcp_socket {
        let ip = match tcp.host.as_deref().filter(|h| !h.is_empty()) {
            Some(host) => host
                .parse()
                .map_err(|_| format!("probe host {host:?} is not an IP address"))?,
            None => pod_ip,
        };
        return Ok(Check::Tcp(SocketAddr::new(ip, port(container, &tcp.port)?)));
    }
    Err("the probe has no handler (exec, httpGet or tcpSocket; gRPC is not supported)".into())
}

/// The most of a response read to find its status line.
const STATUS_LINE_LIMIT: usize = 4096;

/// An HTTP GET (HTTP/1.1, `Connection: close`, kubelet's User-Agent);
/// success on 200-399.
pub async fn http_get(
    address: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Outcome {
    let attempt = async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buffer.contains(&b'\n') && buffer.len() < STATUS_LINE_LIMIT {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buffer);
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("malformed response {:?}", line.lines().next().unwrap_or("")))?;
        Ok::<u16, String>(code)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Outcome::Failure(format!(
            "Get \"http://{address}{path}\": context deadline exceeded"
        )),
        Ok(Err(error)) => Outcome::Failure(format!("Get \"http://{address}{path}\": {error}")),
        Ok(Ok(code)) if (200..400).contains(&code) => Outcome::Success,
        Ok(Ok(code)) => Outcome::Failure(format!("HTTP probe failed with statuscode: {code}")),
    }
}

/// A TCP connection opens within `timeout`.
pub async fn tcp(address: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(_)) => Outcome::Success,
        Ok(Err(error)) => Outcome::Failure(format!("dial tcp {address}: {error}")),
        Err(_) => Outcome::Failure(format!("dial tcp {address}: i/o timeout")),
    }
}

/// Counts consecutive results against a probe's thresholds and reports
/// when the probed state flips.
#[derive(Debug)]
pub struct Tally {
    schedule: Schedule,
    /// The state last reported (None: nothing yet).
    state: Option<bool>,
    successes: u32,
    failures: u32,
}

impl Tally {
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            state: None,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one result; returns the new state when it changed.
    pub fn record(&mut self, outcome: &Outcome) -> Option<bool> {
        let next = match outcome {
            Outcome::Success => {
                self.failures = 0;
                self.successes += 1;
                (self.successes >= self.schedule.success_threshold).then_some(true)
            }
            Outcome::Failure(_) => {
                self.successes = 0;
                self.failures += 1;
                (self.failures >= self.schedule.failure_threshold).then_some(false)
            }
        }?;
        if self.state == Some(next) {
            return None;
        }
        self.state = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(
            json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}),
        )
        .unwrap()
    }

    #[test]
    fn probes_resolve_their_targets() {
        let ip: IpAddr = "10.244.1.5".parse().unwrap();
        let probe: Probe =
            serde_json::from_value(json!({"httpGet": {"port": "http", "path": "healthz"}}))
                .unwrap();
        assert_eq!(
            check(&container(), &probe, ip).unwrap(),
            Check::Http {
                address: "10.244.1.5:8080".parse().unwrap(),
                path: "/healthz".into(),
                headers: vec![],
            }
        );
        let probe: Probe = serde_json::from_value(json!({"tcpSocket": {"port": 9000}})).unwrap();
        assert_eq!(
            check(&container(), &probe, ip).unwrap(),
            Check::Tcp("10.244.1.5:9000".parse().unwrap())
        );
        let probe: Probe = serde_json::from_value(json!({"tcpSocket": {"port": "nope"}})).unwrap();
        assert!(check(&container(), &probe, ip).is_err());
        let probe: Probe =
            serde_json::from_value(json!({"httpGet": {"port": 80, "scheme": "HTTPS"}})).unwrap();
        assert!(check(&container(), &probe, ip).is_err());
        let probe: Probe = serde_json::from_value(json!({"exec": {"command": ["true"]}})).unwrap();
        assert_eq!(
            check(&container(), &probe, ip).unwrap(),
            Check::Exec(vec!["true".into()])
        );
    }

    #[test]
    fn schedules_take_kubelets_defaults() {
        let schedule = Schedule::of(&Probe::default());
        assert_eq!(schedule.period, Duration::from_secs(10));
        assert_eq!(schedule.timeout, Duration::from_secs(1));
        assert_eq!(
            (schedule.success_threshold, schedule.failure_threshold),
            (1, 3)
        );
    }

    #[test]
    fn the_tally_flips_at_the_thresholds() {
        let probe: Probe =
            serde_json::from_value(json!({"successThreshold": 2, "failureThreshold": 2})).unwrap();
        let mut tally = Tally::new(Schedule::of(&probe));
        let fail = Outcome::Failure("x".into());
        assert_eq!(tally.record(&Outcome::Success), None);
        assert_eq!(tally.record(&Outcome::Success), Some(true));
        assert_eq!(tally.record(&Outcome::Success), None);
        assert_eq!(tally.record(&fail), None);
        assert_eq!(
            tally.record(&Outcome::Success),
            None,
            "the failure count restarts"
        );
        assert_eq!(tally.record(&fail), None);
        assert_eq!(tally.record(&fail), Some(false));
        assert_eq!(tally.record(&fail), None);
    }

    #[tokio::test]
    async fn http_and_tcp_probes_judge_real_servers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).await.unwrap();
                assert!(
                    String::from_utf8_lossy(&request[..n]).starts_with("GET /ready HTTP/1.1\r\n")
                );
                let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let second = Duration::from_secs(1);
        assert_eq!(
            http_get(address, "/ready", &[], second).await,
            Outcome::Success
        );
        assert!(
            matches!(http_get(address, "/ready", &[], second).await, Outcome::Failure(m) if m.contains("503"))
        );
        // The listener is gone: refused.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(tcp(address, second).await, Outcome::Failure(_)));
    }
}
