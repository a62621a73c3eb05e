//! What `cluster up|down` and `bench` show while they work, on stderr:
//! one line per finished step with its time, and on a terminal the step
//! under way redrawn in place (waiting for nodes: `2/3 Ready`).

use std::{
    io::{IsTerminal as _, Write as _},
    time::Instant,
};

#[derive(Debug)]
pub struct Progress {
    terminal: bool,
    step: Instant,
    /// Whether a live line is on screen (to be cleared before the next).
    live: bool,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            step: Instant::now(),
            live: false,
        }
    }

    /// Shows what the current step is doing now (terminals only).
    pub fn update(&mut self, what: &str) {
        if self.terminal {
            eprint!("\r\x1b[K  … {what}");
            let _ = std::io::stderr().flush();
            self.live = true;
        }
    }

    /// Ends the current step with `what` and its duration.
    pub fn done(&mut self, what: &str) {
        if self.live {
            eprint!("\r\x1b[K");
            self.live = false;
        }
        eprintln!("  ✓ {what} ({:.1} s)", self.step.elapsed().as_secs_f64());
        self.step = Instant::now();
    }
}
