//! The `worker_rss_mb` case: this binary re-executed as a child
//! (`--child-rss`) that runs eight light projections through a catch-up
//! of the seeded events and prints its peak RSS.

use crate::projections::Light;
use crate::setup::{Bench, Seeded};
use crate::stats::{mark, median, round};
use projectionist::{EventStore, Registered, Runner, RunnerConfig, StoreConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

/// Projections run by the RSS child.
const RSS_PROJECTIONS: usize = 8;

/// Peak resident set size of this process, in kB.
fn vm_hwm_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The child's side (`--child-rss URL`): catches up with the light
/// projections, prints `VmHWM_KB=… handled=…`.
pub async fn child_rss(url: &str) -> ExitCode {
    let config = projectionist::parse_url(url).expect("child: invalid database URL");
    let store = EventStore::connect_config(config, StoreConfig::default())
        .expect("child: cannot build the store");
    let projections: Vec<Registered> = (0..RSS_PROJECTIONS)
        .map(|i| {
            Registered::new(Arc::new(Light {
                name: format!("bench_rss_{i}"),
                sum: AtomicI64::new(0),
            }))
            .expect("child: cannot register a projection")
        })
        .collect();
    let runner = Runner::new(store, RunnerConfig::default())
        .with_projections(&projections)
        .expect("child: cannot register the projections");
    runner.run_once().await.expect("child: catch-up failed");
    let handled = runner.progress().events_handled();
    match vm_hwm_kb() {
        Some(kb) => {
            println!("VmHWM_KB={kb} handled={handled}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("child: cannot read VmHWM from /proc/self/status");
            ExitCode::FAILURE
        }
    }
}

impl Bench {
    /// `worker_rss_mb`: the child's peak RSS over the repetitions.
    pub async fn worker_rss(&mut self, s: &Seeded) {
        // /proc/self/exe still runs this binary when a concurrent `cargo build`
        // has replaced (unlinked) the file on disk.
        let exe = Some(PathBuf::from("/proc/self/exe"))
            .filter(|p| p.exists())
            .or_else(|| std::env::current_exe().ok())
            .expect("cannot locate the bench binary");
        let mut mbs = Vec::new();
        for rep in 0..self.reps {
            s.client
                .execute(
                    "DELETE FROM projection_checkpoints WHERE projection_name LIKE 'bench\\_rss\\_%'",
                    &[],
                )
                .await
                .expect("cannot reset the RSS checkpoints");
            let out = tokio::process::Command::new(&exe)
                .arg("--child-rss")
                .arg(if self.args.tls {
                    s.db.url()
                } else {
                    format!("{} sslmode=disable", s.db.url())
                })
                .stderr(std::process::Stdio::inherit())
                .output()
                .await
                .expect("cannot run the RSS child");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "RSS child failed: {stdout}");
            let field = |key: &str| -> u64 {
                stdout
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("RSS child printed no {key}: {stdout}"))
            };
            let (kb, handled) = (field("VmHWM_KB="), field("handled="));
            let mb = kb as f64 / 1024.0;
            mbs.push(mb);
            self.progress(format!(
                "worker_rss_mb rep {}/{}: {mb:.1} MB peak RSS ({RSS_PROJECTIONS} projections, {handled} events handled)",
                rep + 1,
                self.reps
            ));
        }
        let m = median(&mbs);
        self.json.insert("worker_rss_mb".into(), round(m, 1));
        self.row(
            "worker_rss_mb",
            format!("{m:.1} MB"),
            "—".into(),
            "—".into(),
            format!("≤ 30 MB {}", mark(m <= 30.0)),
        );
    }
}
