//! What `bench routing` measured, as data (`results.json`, every sample),
//! a markdown table (`results.md`) and SVG line charts, one file each.

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use super::load::{Summary, percentile};

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// The command line that produced it.
    pub command: String,
    /// When it started, seconds since the epoch.
    pub started_unix: u64,
    /// `uname -r` and the CPUs the run shared.
    pub kernel: String,
    pub cpus: usize,
    pub settings: Settings,
    pub points: Vec<Point>,
}

/// The knobs a run was given.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub duration_s: u64,
    /// wrk's keep-alive connections.
    pub connections: usize,
    /// The CRR and UDP client's threads.
    pub threads: usize,
    /// Rounds of each load (the median is reported).
    pub rounds: usize,
    /// Endpoint changes timed per point.
    pub samples: usize,
    /// Endpoints of each filler service.
    pub endpoints: u32,
}

/// One mode at one service count.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Point {
    pub mode: String,
    pub services: u32,
    /// The machine the point was measured on when not this host: a
    /// software-emulated VM (IPVS where the host has no ip_vs), tens of
    /// times slower, so only its ratios to its own direct baseline
    /// compare with the other modes'. Left out of the charts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Why the point is incomplete, if it is.
    pub error: Option<String>,
    /// From the first filler created to the client's node having
    /// programmed them all (the API server's writes included).
    pub fill_s: Option<f64>,
    /// The client node's first sync after its agent restarted on a
    /// cleaned node (the agent's own `elapsed_us`).
    pub full_sync_ms: Option<f64>,
    /// One endpoint change, from the API write to the first answer from
    /// the new backend, each sample.
    pub programming_ms: Vec<f64>,
    pub loads: Vec<Load>,
}

/// How a load run talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadKind {
    /// HTTP on long-lived connections (wrk).
    KeepAlive,
    /// A new connection per request.
    Crr,
    /// UDP request and answer.
    Udp,
}

/// Where a load run sends its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The server's pod IP: the baseline, no service translation.
    Direct,
    /// The ClusterIP of the server's service.
    Service,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Load {
    pub kind: LoadKind,
    pub target: Target,
    /// Rounds alternate direct and service runs.
    pub round: usize,
    #[serde(flatten)]
    pub summary: Summary,
}

impl Point {
    /// The mode, marked `(VM)` when measured in one.
    fn label(&self) -> String {
        match self.vm {
            Some(_) => format!("{} (VM)", self.mode),
            None => self.mode.clone(),
        }
    }

    /// The median round (by rate) of `kind` load to `target`.
    pub fn load(&self, kind: LoadKind, target: Target) -> Option<&Summary> {
        let mut runs: Vec<&Summary> = self
            .loads
            .iter()
            .filter(|l| l.kind == kind && l.target == target)
            .map(|l| &l.summary)
            .collect();
        runs.sort_by(|a, b| a.per_s.total_cmp(&b.per_s));
        runs.get(runs.len() / 2).copied()
    }

    /// The service's rate over the direct baseline's, in the same run.
    pub fn ratio(&self, kind: LoadKind) -> Option<f64> {
        let direct = self.load(kind, Target::Direct)?.per_s;
        (direct > 0.0).then(|| self.load(kind, Target::Service).map(|s| s.per_s / direct))?
    }

    /// The programming latency's p50 and p99 in ms.
    pub fn programming(&self) -> Option<(f64, f64)> {
        if self.programming_ms.is_empty() {
            return None;
        }
        let mut sorted = self.programming_ms.clone();
        sorted.sort_by(f64::total_cmp);
        Some((percentile(&sorted, 0.5), percentile(&sorted, 0.99)))
    }
}

impl Results {
    /// Writes `results.json`, `results.md` and the charts into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let mut files = vec![
            (
                "results.json".to_string(),
                serde_json::to_string_pretty(self).expect("plain data"),
            ),
            ("results.md".to_string(), self.markdown()),
        ];
        files.extend(self.measured_here().charts());
        for (name, text) in &files {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(files.into_iter().map(|(name, _)| name).collect())
    }

    /// The run without the points measured in a VM, whose emulated
    /// scale would flatten the host's lines in a chart.
    fn measured_here(&self) -> Self {
        Self {
            points: self
                .points
                .iter()
                .filter(|p| p.vm.is_none())
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    fn modes(&self) -> Vec<String> {
        let mut modes: Vec<String> = Vec::new();
        for point in &self.points {
            if !modes.contains(&point.mode) {
                modes.push(point.mode.clone());
            }
        }
        modes
    }

    fn sizes(&self) -> Vec<u32> {
        let mut sizes: Vec<u32> = self.points.iter().map(|p| p.services).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    fn point(&self, mode: &str, services: u32) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.mode == mode && p.services == services)
    }

    /// One row per point: each rate with its ratio to the direct
    /// baseline, latencies, sync and programming times.
    pub fn markdown(&self) -> String {
        let mut text = format!(
            "`{}`\n\nLinux {}, {} CPUs; the median of {} rounds of {} s per load, wrk with {} \
             keep-alive connections, the CRR and UDP client with {} threads, {} endpoint changes \
             per point, filler services of {} endpoints. Rates are the service's, with its ratio \
             to the same run's direct-to-pod baseline in brackets; latencies are p50 / p99.\n\n",
            self.command,
            self.kernel,
            self.cpus,
            self.settings.rounds,
            self.settings.duration_s,
            self.settings.connections,
            self.settings.threads,
            self.settings.samples,
            self.settings.endpoints,
        );
        text.push_str(
            "| mode | services | keep-alive req/s | keep-alive µs | CRR conn/s | CRR µs | UDP req/s | UDP µs | full sync ms | endpoint change ms |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for point in &self.points {
            let _ = write!(text, "| {} | {} |", point.label(), point.services);
            for kind in [LoadKind::KeepAlive, LoadKind::Crr, LoadKind::Udp] {
                match point.load(kind, Target::Service) {
                    Some(s) => {
                        let ratio = point
                            .ratio(kind)
                            .map_or(String::new(), |r| format!(" ({r:.2})"));
                        let _ = write!(
                            text,
                            " {}{ratio} | {:.0} / {:.0} |",
                            thousands(s.per_s),
                            s.p50_us,
                            s.p99_us
                        );
                    }
                    None => text.push_str(" – | – |"),
                }
            }
            match point.full_sync_ms {
                Some(ms) => {
                    let _ = write!(text, " {ms:.1} |");
                }
                None => text.push_str(" – |"),
            }
            match point.programming() {
                Some((p50, p99)) => {
                    let _ = write!(text, " {p50:.1} / {p99:.1} |");
                }
                None => text.push_str(" – |"),
            }
            text.push('\n');
        }
        let mut machines: Vec<&str> = self.points.iter().filter_map(|p| p.vm.as_deref()).collect();
        machines.dedup();
        for machine in machines {
            let _ = writeln!(
                text,
                "\nRows marked (VM) were measured in a VM, {machine}, as this host's kernel has \
                 no ip_vs: emulation makes every figure there tens of times slower, so only their \
                 ratios to the VM's own direct baseline compare with the other rows. The charts \
                 leave them out."
            );
        }
        let errors: Vec<&Point> = self.points.iter().filter(|p| p.error.is_some()).collect();
        if !errors.is_empty() {
            text.push_str("\nIncomplete points:\n\n");
            for point in errors {
                let _ = writeln!(
                    text,
                    "- {} at {} services: {}",
                    point.label(),
                    point.services,
                    point.error.as_deref().unwrap_or_default()
                );
            }
        }
        text
    }

    /// The charts: rates, p99 latencies, full sync and programming
    /// latency against the service count, one line per mode (and the
    /// direct baseline, dashed, averaged over the modes' runs).
    fn charts(&self) -> Vec<(String, String)> {
        let modes = self.modes();
        let sizes = self.sizes();
        let by_mode = |value: &dyn Fn(&Point) -> Option<f64>| -> Vec<Series> {
            modes
                .iter()
                .map(|mode| Series {
                    name: mode.clone(),
                    values: sizes
                        .iter()
                        .map(|&n| self.point(mode, n).and_then(value))
                        .collect(),
                    dashed: false,
                })
                .collect()
        };
        let direct = |value: &dyn Fn(&Summary) -> f64, kind: LoadKind| Series {
            name: "direct to pod".into(),
            values: sizes
                .iter()
                .map(|&n| {
                    let seen: Vec<f64> = self
                        .points
                        .iter()
                        .filter(|p| p.services == n)
                        .filter_map(|p| p.load(kind, Target::Direct).map(value))
                        .collect();
                    (!seen.is_empty()).then(|| seen.iter().sum::<f64>() / seen.len() as f64)
                })
                .collect(),
            dashed: true,
        };
        let mut charts = Vec::new();
        for (kind, file, what) in [
            (
                LoadKind::KeepAlive,
                "keepalive",
                "Keep-alive HTTP requests/s",
            ),
            (
                LoadKind::Crr,
                "crr",
                "New connections/s (connect, request, close)",
            ),
            (LoadKind::Udp, "udp", "UDP requests/s"),
        ] {
            let mut rates = by_mode(&|p| p.load(kind, Target::Service).map(|s| s.per_s));
            rates.push(direct(&|s| s.per_s, kind));
            charts.push((
                format!("{file}-rate.svg"),
                line_chart(
                    &format!("{what} through a ClusterIP"),
                    "per second",
                    &sizes,
                    &rates,
                    Scale::Linear,
                ),
            ));
            let mut p99 = by_mode(&|p| p.load(kind, Target::Service).map(|s| s.p99_us));
            p99.push(direct(&|s| s.p99_us, kind));
            charts.push((
                format!("{file}-p99.svg"),
                line_chart(
                    &format!("{what}: p99 latency"),
                    "µs",
                    &sizes,
                    &p99,
                    Scale::Linear,
                ),
            ));
        }
        charts.push((
            "full-sync.svg".into(),
            line_chart(
                "Full sync of a cleaned node",
                "ms (log)",
                &sizes,
                &by_mode(&|p| p.full_sync_ms),
                Scale::Log,
            ),
        ));
        let mut programming = by_mode(&|p| p.programming().map(|(p50, _)| p50));
        for series in &mut programming {
            series.name.push_str(" p50");
        }
        for mut series in by_mode(&|p| p.programming().map(|(_, p99)| p99)) {
            series.name.push_str(" p99");
            series.dashed = true;
            programming.push(series);
        }
        charts.push((
            "programming.svg".into(),
            line_chart(
                "One endpoint change: API write to the new backend answering",
                "ms (log)",
                &sizes,
                &programming,
                Scale::Log,
            ),
        ));
        charts
    }
}

/// `38321` as `38,321`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One line of a chart; `None` where the point has no figure.
#[derive(Clone, Debug)]
struct Series {
    name: String,
    values: Vec<Option<f64>>,
    dashed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scale {
    Linear,
    Log,
}

/// Colours by series order (a colour-blind-safe palette, Okabe–Ito).
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
];
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
/// The plot area's margins: left (axis labels), right (legend), top, bottom.
const MARGINS: (f64, f64, f64, f64) = (70.0, 170.0, 40.0, 50.0);

/// A line chart of `series` over the service counts `sizes`, evenly
/// spaced (1, 1k, 10k are a log scale already), y from 0 (linear) or
/// from the decade below the smallest value (log).
fn line_chart(title: &str, unit: &str, sizes: &[u32], series: &[Series], scale: Scale) -> String {
    let values = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied());
    let (low, high) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (left, right, top, bottom) = MARGINS;
    let (plot_w, plot_h) = (WIDTH - left - right, HEIGHT - top - bottom);
    let (y_min, y_max) = match scale {
        Scale::Linear => (0.0, if high > 0.0 { high * 1.1 } else { 1.0 }),
        Scale::Log => {
            let low = if low > 0.0 && low < f64::MAX {
                low
            } else {
                0.1
            };
            (
                10f64.powf(low.log10().floor()),
                10f64.powf(high.max(low * 10.0).log10().ceil()),
            )
        }
    };
    let y_of = |v: f64| -> f64 {
        let fraction = match scale {
            Scale::Linear => (v - y_min) / (y_max - y_min),
            Scale::Log => (v.max(y_min).log10() - y_min.log10()) / (y_max.log10() - y_min.log10()),
        };
        top + plot_h * (1.0 - fraction)
    };
    let x_of = |i: usize| -> f64 {
        if sizes.len() < 2 {
            left + plot_w / 2.0
        } else {
            left + plot_w * i as f64 / (sizes.len() - 1) as f64
        }
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
    let ticks: Vec<f64> = match scale {
        Scale::Linear => (0..=5).map(|i| y_max * f64::from(i) / 5.0).collect(),
        Scale::Log => {
            let decades = (y_max.log10() - y_min.log10()).round() as i32;
            (0..=decades).map(|d| y_min * 10f64.powi(d)).collect()
        }
    };
    for tick in ticks {
        let y = y_of(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 6.0,
            y + 4.0,
            tick_label(tick)
        );
    }
    for (i, size) in sizes.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x_of(i),
            top + plot_h + 18.0,
            thousands(f64::from(*size))
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">services</text>\n\
         <text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">{}</text>\n\
         <rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#888\"/>",
        left + plot_w / 2.0,
        HEIGHT - 10.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(unit)
    );
    for (index, line) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let dash = if line.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let points: Vec<(f64, f64)> = line
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (x_of(i), y_of(v))))
            .collect();
        if points.len() > 1 {
            let path: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                path.join(" ")
            );
        }
        for (x, y) in &points {
            let _ = writeln!(
                svg,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\"/>"
            );
        }
        let legend_y = top + 10.0 + 18.0 * index as f64;
        let legend_x = left + plot_w + 14.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{legend_x:.1}\" y1=\"{legend_y:.1}\" x2=\"{:.1}\" y2=\"{legend_y:.1}\" \
             stroke=\"{colour}\" stroke-width=\"2\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            legend_x + 24.0,
            legend_x + 30.0,
            legend_y + 4.0,
            escape(&line.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// 1200 as `1.2k`, 0.5 as `0.5`.
fn tick_label(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", trim(value / 1e6))
    } else if value >= 1e3 {
        format!("{}k", trim(value / 1e3))
    } else {
        trim(value)
    }
}

fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(per_s: f64, p50_us: f64, p99_us: f64) -> Summary {
        Summary {
            requests: (per_s * 5.0) as u64,
            errors: 0,
            seconds: 5.0,
            per_s,
            p50_us,
            p99_us,
        }
    }

    fn results() -> Results {
        let point = |mode: &str, services: u32, service: f64| Point {
            mode: mode.into(),
            services,
            vm: None,
            error: None,
            fill_s: Some(0.5),
            full_sync_ms: Some(f64::from(services) / 10.0 + 1.0),
            programming_ms: vec![3.0, 1.0, 2.0, 40.0],
            loads: vec![
                Load {
                    kind: LoadKind::KeepAlive,
                    target: Target::Direct,
                    round: 0,
                    summary: summary(40_000.0, 380.0, 900.0),
                },
                Load {
                    kind: LoadKind::KeepAlive,
                    target: Target::Service,
                    round: 0,
                    summary: summary(service, 400.0, 1_000.0),
                },
                Load {
                    kind: LoadKind::KeepAlive,
                    target: Target::Service,
                    round: 1,
                    summary: summary(service / 2.0, 800.0, 2_000.0),
                },
                Load {
                    kind: LoadKind::KeepAlive,
                    target: Target::Service,
                    round: 2,
                    summary: summary(service * 2.0, 200.0, 500.0),
                },
            ],
        };
        Results {
            command: "wharf bench routing --services 1,1000".into(),
            started_unix: 0,
            kernel: "6.18".into(),
            cpus: 2,
            settings: Settings {
                duration_s: 5,
                rounds: 3,
                connections: 16,
                threads: 4,
                samples: 4,
                endpoints: 10,
            },
            points: vec![
                point("ebpf", 1, 39_000.0),
                point("iptables", 1, 36_000.0),
                point("ebpf", 1_000, 38_000.0),
                Point {
                    error: Some("not programmed within 300 s".into()),
                    ..point("iptables", 1_000, 30_000.0)
                },
                Point {
                    vm: Some("qemu TCG".into()),
                    ..point("ipvs", 1, 1_000.0)
                },
            ],
        }
    }

    #[test]
    fn ratios_and_percentiles_come_from_the_same_point() {
        let results = results();
        let point = &results.points[0];
        assert_eq!(
            point
                .load(LoadKind::KeepAlive, Target::Service)
                .unwrap()
                .per_s,
            39_000.0,
            "the median round"
        );
        assert_eq!(point.ratio(LoadKind::KeepAlive), Some(39_000.0 / 40_000.0));
        assert_eq!(point.ratio(LoadKind::Crr), None);
        assert_eq!(point.programming(), Some((2.0, 40.0)));
        assert_eq!(Point::default().programming(), None);
    }

    #[test]
    fn the_table_has_a_row_per_point_and_lists_what_is_incomplete() {
        let table = results().markdown();
        assert!(
            table.contains(
                "| ebpf | 1 | 39,000 (0.97) | 400 / 1000 | – | – | – | – | 1.1 | 2.0 / 40.0 |"
            ),
            "{table}"
        );
        assert_eq!(
            table
                .lines()
                .filter(|l| l.starts_with("| iptables |"))
                .count(),
            2
        );
        assert!(table.contains("- iptables at 1000 services: not programmed within 300 s"));
        assert!(
            table.contains("| ipvs (VM) | 1 | 1,000 (0.03) |")
                && table.contains("measured in a VM, qemu TCG,"),
            "{table}"
        );
    }

    #[test]
    fn charts_draw_a_line_per_mode_and_the_baseline() {
        let charts = results().measured_here().charts();
        let names: Vec<&str> = charts.iter().map(|(name, _)| name.as_str()).collect();
        assert!(names.contains(&"keepalive-rate.svg") && names.contains(&"programming.svg"));
        let (_, keep_alive) = charts
            .iter()
            .find(|(n, _)| n == "keepalive-rate.svg")
            .unwrap();
        // ebpf, iptables and the dashed baseline: three lines of two points.
        assert_eq!(keep_alive.matches("<polyline").count(), 3);
        assert_eq!(
            keep_alive.matches("stroke-dasharray").count(),
            2,
            "line and legend"
        );
        assert!(keep_alive.contains(">direct to pod</text>"));
        for (name, svg) in &charts {
            assert!(!svg.contains(">ipvs"), "{name} leaves the VM's points out");
            assert!(
                svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
                "{name}"
            );
            assert!(
                !svg.contains("NaN") && !svg.contains("inf"),
                "{name}: {svg}"
            );
        }
    }

    #[test]
    fn log_charts_span_whole_decades() {
        let series = [Series {
            name: "a".into(),
            values: vec![Some(2.0), Some(3_000.0)],
            dashed: false,
        }];
        let svg = line_chart("t", "ms", &[1, 10], &series, Scale::Log);
        for label in [
            ">1</text>",
            ">10</text>",
            ">100</text>",
            ">1k</text>",
            ">10k</text>",
        ] {
            assert!(svg.contains(label), "{label} in {svg}");
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(38_321.4), "38,321");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(tick_label(1_200.0), "1.2k");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(2e6), "2M");
    }
}
