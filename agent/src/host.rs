//! What the rule-based proxy modes do to the machine: run the rule tools
//! (`iptables-restore`, `nft -f`, ...) and forget conntrack flows. One
//! seam, so tests can record and fail both without touching the host.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use crate::{
    conntrack::{self, ConntrackError},
    proxy::StaleUdp,
};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

pub trait Host {
    /// Runs a program to completion, feeding it `stdin`; returns its
    /// stdout.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError>;

    /// Deletes the conntrack entries of these UDP flows; returns how many
    /// went.
    fn forget_udp(&self, stale: &[StaleUdp]) -> Result<usize, ConntrackError>;
}

/// The real thing: this machine (the calling thread's network namespace).
#[derive(Clone, Copy, Debug, Default)]
pub struct System;

impl Host for System {
    fn forget_udp(&self, stale: &[StaleUdp]) -> Result<usize, ConntrackError> {
        conntrack::forget_udp(stale)
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
        let spawn_error = |source| ExecError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that dies early closes its end: its exit status and
            // stderr below say why, so a broken pipe here is not the story.
            if let Err(e) = pipe.write_all(text.as_bytes())
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(spawn_error(e));
            }
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        if !output.status.success() {
            return Err(ExecError::Failed {
                program: program.to_string(),
                args: args.join(" "),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Whether `program` can be run at all (it is installed).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
