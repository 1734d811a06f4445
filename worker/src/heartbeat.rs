//! Liveness files the launcher watches: each rank rewrites `<output_dir>/heartbeat/rank-KKKKK`
//! after every step (and every evaluation and checkpoint). A rank whose file stops changing for
//! `run.hang_timeout` is hung; one whose pid is gone has died. The file also says where the rank
//! runs, so the launcher can signal or kill it, and how far it got.
//!
//! Also the end-of-run record `<output_dir>/status.json` (done or stopped by a signal), which the
//! launcher's summary and the SLURM batch script (requeue when stopped) read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beat {
    pub rank: usize,
    pub pid: u32,
    pub host: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// setup | train | eval | checkpoint
    pub phase: String,
}

pub fn dir(output_dir: &Path) -> PathBuf {
    output_dir.join("heartbeat")
}

pub fn path(output_dir: &Path, rank: usize) -> PathBuf {
    dir(output_dir).join(format!("rank-{rank:05}"))
}

/// The host name as `hostname -s` prints it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    };
    name.split('.').next().unwrap_or_default().to_string()
}

pub struct Heartbeat {
    path: PathBuf,
    beat: Beat,
}

impl Heartbeat {
    pub fn new(output_dir: &Path, rank: usize) -> std::io::Result<Heartbeat> {
        std::fs::create_dir_all(dir(output_dir))?;
        let hb = Heartbeat {
            path: path(output_dir, rank),
            beat: Beat {
                rank,
                pid: std::process::id(),
                host: hostname(),
                step: 0,
                phase: "setup".into(),
            },
        };
        hb.write();
        Ok(hb)
    }

    /// Record progress. Written to a temporary name and renamed, so readers never see half a
    /// file; a failed write is not fatal to training (the launcher would call it a hang).
    pub fn beat(&mut self, step: u64, phase: &str) {
        self.beat.step = step;
        self.beat.phase = phase.to_string();
        self.write();
    }

    fn write(&self) {
        let tmp = self.path.with_extension("tmp");
        let text = serde_json::to_string(&self.beat).unwrap_or_default();
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .is_err()
        {
            eprintln!(
                "[rank {}] warning: cannot write {}",
                self.beat.rank,
                self.path.display()
            );
        }
    }
}

pub fn read(output_dir: &Path, rank: usize) -> Option<(Beat, std::time::SystemTime)> {
    let p = path(output_dir, rank);
    let modified = std::fs::metadata(&p).ok()?.modified().ok()?;
    let beat = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
    Some((beat, modified))
}

/// How a run ended, written by rank 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `done` (all steps) or `stopped` (SIGTERM/SIGUSR1, checkpoint written).
    pub state: String,
    pub step: u64,
    pub steps: u64,
}

pub fn status_path(output_dir: &Path) -> PathBuf {
    output_dir.join("status.json")
}

pub fn write_status(output_dir: &Path, status: &Status) -> std::io::Result<()> {
    let p = status_path(output_dir);
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string(status)?)?;
    std::fs::rename(tmp, p)
}

pub fn read_status(output_dir: &Path) -> Option<Status> {
    serde_json::from_str(&std::fs::read_to_string(status_path(output_dir)).ok()?).ok()
}

/// Test hook for the launcher's hang detection: `DEBERTA_TEST_HANG=RANK:STEP:MARKER` makes rank
/// RANK sleep forever once it has completed STEP steps, the first time only (it creates MARKER,
/// so the restarted job runs through).
pub fn test_hang_point(rank: usize, step: u64) {
    let Ok(spec) = std::env::var("DEBERTA_TEST_HANG") else {
        return;
    };
    let parts: Vec<&str> = spec.splitn(3, ':').collect();
    if parts.len() != 3 || parts[0].parse() != Ok(rank) || parts[1].parse() != Ok(step) {
        return;
    }
    let marker = Path::new(parts[2]);
    if marker.exists() || std::fs::write(marker, b"hung\n").is_err() {
        return;
    }
    eprintln!("[rank {rank}] DEBERTA_TEST_HANG: hanging after step {step}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
