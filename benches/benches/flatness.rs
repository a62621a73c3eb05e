//! Is per-packet cost flat from 1 to 100k services? Measured in
//! interleaved rounds (every service count and hook once per round) and
//! compared by median: on a shared 2-core VM one configuration measured
//! twice in a row differs by up to ~20%, which sequential runs would
//! mistake for growth. Prints a table and writes
//! `$CARGO_TARGET_DIR/criterion/wharf-flatness.json`.

use std::{fs, path::PathBuf};

mod ping_pong;
use ping_pong::{REPEAT, SERVICE_COUNTS, fixtures};

const ROUNDS: usize = 31;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes every bench target
    }
    let (mut fixtures, frame) = fixtures("flat");
    let hooks = [("xdp", true), ("tc", false)];
    let mut samples = vec![vec![Vec::new(); SERVICE_COUNTS.len()]; hooks.len()];
    for _ in 0..ROUNDS {
        for (h, (_, xdp)) in hooks.iter().enumerate() {
            for (c, (_, fixture)) in fixtures.iter_mut().enumerate() {
                samples[h][c].push(fixture.time(*xdp, &frame, REPEAT));
            }
        }
    }
    let mut json = String::from("{");
    println!("median ns/packet over {ROUNDS} rounds of {REPEAT} runs");
    println!(
        "{:<6}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "hook", "1", "1k", "10k", "100k", "max/min"
    );
    for (h, (hook, _)) in hooks.iter().enumerate() {
        let medians: Vec<u64> = samples[h]
            .iter_mut()
            .map(|s| {
                s.sort_unstable();
                s[s.len() / 2]
            })
            .collect();
        let ratio = *medians.iter().max().unwrap() as f64 / *medians.iter().min().unwrap() as f64;
        println!(
            "{hook:<6}{}{ratio:>10.2}",
            medians
                .iter()
                .map(|m| format!("{m:>10}"))
                .collect::<String>()
        );
        let pairs: Vec<String> = SERVICE_COUNTS
            .iter()
            .zip(&medians)
            .map(|(c, m)| format!("\"{c}\": {m}"))
            .collect();
        json += &format!(
            "{}\"{hook}\": {{{}, \"max_over_min\": {ratio:.3}}}",
            if h > 0 { ", " } else { "" },
            pairs.join(", ")
        );
    }
    json += "}\n";
    let dir = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("criterion");
    fs::create_dir_all(&dir).expect("criterion directory");
    fs::write(dir.join("wharf-flatness.json"), json).expect("writing the results");
}
