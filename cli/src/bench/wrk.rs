//! Keep-alive HTTP load with wrk (Debian's `wrk` 4.1): its command line,
//! and its report read into a [`Summary`].

use std::{net::SocketAddr, time::Duration};

use super::load::Summary;

/// Where Debian installs wrk (pods run commands from the node's
/// filesystem, which is the host's).
pub const WRK: &str = "/usr/bin/wrk";

/// wrk's arguments: one thread, `connections` keep-alive connections,
/// latency percentiles on.
pub fn args(target: SocketAddr, connections: usize, duration: Duration) -> Vec<String> {
    vec![
        "--threads=1".into(),
        format!("--connections={connections}"),
        format!("--duration={}s", duration.as_secs().max(1)),
        "--timeout=2s".into(),
        "--latency".into(),
        format!("http://{target}/"),
    ]
}

/// Reads wrk's report: `N requests in T`, the socket errors and non-2xx
/// answers as errors, and the 50% and 99% lines of its latency
/// distribution. None if a figure is missing.
pub fn parse(report: &str) -> Option<Summary> {
    let mut requests = None;
    let mut seconds = None;
    let mut errors = 0;
    let (mut p50_us, mut p99_us) = (None, None);
    for line in report.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [count, "requests", "in", time, ..] => {
                requests = count.parse::<u64>().ok();
                seconds = time
                    .trim_end_matches(',')
                    .parse_duration_us()
                    .map(|us| us / 1e6);
            }
            ["50%", value] => p50_us = value.parse_duration_us(),
            ["99%", value] => p99_us = value.parse_duration_us(),
            ["Socket", "errors:", ..] => {
                errors += words[2..]
                    .chunks(2)
                    .filter_map(|pair| pair.get(1)?.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => errors += count.parse::<u64>().ok()?,
            _ => {}
        }
    }
    let (requests, seconds) = (requests?, seconds?);
    Some(Summary {
        requests,
        errors,
        seconds,
        per_s: requests as f64 / seconds,
        p50_us: p50_us?,
        p99_us: p99_us?,
    })
}

/// wrk's durations: `412.00us`, `1.23ms`, `5.00s`, `1.00m`.
trait ParseDuration {
    fn parse_duration_us(&self) -> Option<f64>;
}

impl ParseDuration for str {
    fn parse_duration_us(&self) -> Option<f64> {
        let split = self.find(|c: char| c.is_ascii_alphabetic())?;
        let (number, unit) = self.split_at(split);
        let number: f64 = number.parse().ok()?;
        let scale = match unit {
            "us" => 1.0,
            "ms" => 1e3,
            "s" => 1e6,
            "m" => 60e6,
            "h" => 3600e6,
            _ => return None,
        };
        Some(number * scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as wrk 4.1 prints it with `--latency`.
    const REPORT: &str = "Running 5s test @ http://10.96.0.12:80/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.31us  101.22us   4.91ms   91.20%
    Req/Sec    38.52k     1.13k   40.11k    78.00%
  Latency Distribution
     50%  398.00us
     75%  441.00us
     90%  502.00us
     99%    1.21ms
  191605 requests in 5.00s, 18.27MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  38321.00
Transfer/sec:      3.65MB
";

    #[test]
    fn reports_are_read_into_summaries() {
        let summary = parse(REPORT).expect("a whole report");
        assert_eq!(summary.requests, 191_605);
        assert_eq!(summary.seconds, 5.0);
        assert_eq!(summary.per_s, 38_321.0);
        assert_eq!(summary.errors, 7);
        assert_eq!(summary.p50_us, 398.0);
        assert_eq!(summary.p99_us, 1_210.0);
    }

    #[test]
    fn a_report_without_figures_is_refused() {
        assert_eq!(
            parse("unable to connect to 10.96.0.12:80 Connection refused"),
            None
        );
        let no_latency = REPORT.replace("     99%    1.21ms\n", "");
        assert_eq!(parse(&no_latency), None);
    }

    #[test]
    fn durations_carry_their_units() {
        assert_eq!("412.00us".parse_duration_us(), Some(412.0));
        assert_eq!("1.5ms".parse_duration_us(), Some(1_500.0));
        assert_eq!("2.00s".parse_duration_us(), Some(2e6));
        assert_eq!("1.00m".parse_duration_us(), Some(60e6));
        assert_eq!("12".parse_duration_us(), None);
        assert_eq!("3.0parsecs".parse_duration_us(), None);
    }

    #[test]
    fn the_command_asks_for_percentiles() {
        let args = args("10.96.0.1:80".parse().unwrap(), 16, Duration::from_secs(5));
        assert!(args.contains(&"--latency".to_string()));
        assert!(args.contains(&"--duration=5s".to_string()));
        assert_eq!(args.last().unwrap(), "http://10.96.0.1:80/");
    }
}
