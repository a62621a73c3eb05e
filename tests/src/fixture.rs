//! A loaded dataplane with pins of its own, removed when dropped.

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use wharf_agent::{
    ebpf::{Dataplane, Reconciler},
    proxy::DesiredState,
};

/// bpffs mount used by the suites (the agent's default).
pub const BPFFS: &str = "/sys/fs/bpf";

/// Fails a test that needs root with a message that says so, instead of an
/// obscure EPERM from the kernel.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and must run as root"
    );
}

pub struct Fixture {
    pub dataplane: Dataplane,
    pub reconciler: Reconciler,
    node: String,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Verdicts of a test run.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

impl Fixture {
    /// Loads the programs under a node name unique to this process and
    /// `name`, starting from empty maps.
    pub fn load(name: &str) -> Self {
        require_root();
        let node = format!("test-{name}-{}", std::process::id());
        let bpffs = std::path::Path::new(BPFFS);
        Dataplane::teardown(bpffs, &node).expect("removing stale pins");
        let mut dataplane = Dataplane::load(bpffs, &node).unwrap_or_else(|error| {
            // Maps are pinned before the programs load: leave none behind.
            let _ = Dataplane::teardown(bpffs, &node);
            panic!("loading the dataplane: {error}");
        });
        let reconciler = Reconciler::new(dataplane.maps().expect("maps")).expect("reconciler");
        Self {
            dataplane,
            reconciler,
            node,
        }
    }

    pub fn sync(&mut self, desired: &DesiredState) {
        self.reconciler.sync(desired).expect("sync");
    }

    /// Runs the XDP program once on `frame`: (verdict, frame after),
    /// without the XDP metadata the program may have added (see
    /// [`Fixture::run_xdp_with_metadata`]).
    pub fn run_xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, _metadata, out) = self.run_xdp_with_metadata(frame);
        (verdict, out)
    }

    /// Runs the XDP program once: (verdict, metadata, frame after). The
    /// kernel returns metadata and frame together; the programs never
    /// change a frame's length, so whatever precedes it is metadata.
    pub fn run_xdp_with_metadata(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<u8>) {
        let program: &mut Xdp = self.dataplane.program("wharf_xdp").expect("xdp program");
        let (verdict, mut out) = run(program, frame);
        let metadata = out.drain(..out.len().saturating_sub(frame.len())).collect();
        (verdict, metadata, out)
    }

    /// Every conntrack entry, read from the kernel map.
    pub fn conntrack(&mut self) -> Vec<(dataplane_common::CtKey, dataplane_common::CtValue)> {
        self.dataplane
            .maps()
            .expect("maps")
            .conntrack
            .entries()
            .expect("conntrack")
    }

    /// Runs the TC program once on `frame`: (verdict, frame after).
    pub fn run_tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut SchedClassifier = self.dataplane.program("wharf_tc").expect("tc program");
        run(program, frame)
    }

    /// Average nanoseconds per run of the XDP (`xdp`) or TC program over
    /// `repeat` runs of `frame`, as the kernel measures it.
    pub fn time(&mut self, xdp: bool, frame: &[u8], repeat: u32) -> u64 {
        let mut out = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let result = if xdp {
            self.dataplane
                .program::<Xdp>("wharf_xdp")
                .expect("xdp")
                .test_run(options)
        } else {
            self.dataplane
                .program::<SchedClassifier>("wharf_tc")
                .expect("tc")
                .test_run(options)
        };
        result.expect("test run").duration.as_nanos() as u64
    }
}

fn run<P>(program: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    for<'a> P: aya::programs::TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let options = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let result = program.test_run(options).expect("test run");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Dataplane::teardown(std::path::Path::new(BPFFS), &self.node);
    }
}
