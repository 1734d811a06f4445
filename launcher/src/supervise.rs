//! The supervisor behind `deberta train`: runs `mpirun … deberta-worker train` in a session of
//! its own, streams every rank's output with a `[rank k]` prefix (all of it to
//! `<output_dir>/logs/attempt-N.log`), watches the ranks' heartbeat files, and when a rank dies
//! or stops beating for `run.hang_timeout` it ends the whole job and starts it again from the
//! newest complete checkpoint, up to `run.max_restarts` times with doubling backoff.
//!
//! SIGTERM or SIGINT to the launcher asks the ranks to checkpoint and exit (SIGUSR1 through
//! mpirun, which forwards it, and SIGTERM to the local ranks); a second one kills the job.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use deberta_worker::heartbeat::{self, Beat};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Everything the supervisor needs, already validated by the caller.
#[derive(Debug, Clone)]
pub struct Job {
    /// The worker's subcommand: `train` or `finetune`.
    pub command: &'static str,
    pub config: PathBuf,
    pub output_dir: PathBuf,
    pub np: usize,
    pub hostfile: Option<PathBuf>,
    pub mpirun: PathBuf,
    pub worker: PathBuf,
    /// `--resume auto` for the first attempt (restarts always resume).
    pub resume: bool,
    pub hang_timeout: Duration,
    pub max_restarts: u32,
    pub backoff: Duration,
}

/// How the supervised run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step done.
    Done { restarts: u32 },
    /// Stopped by a signal after checkpointing (or before any progress).
    Stopped { restarts: u32 },
    /// The worker refused its settings (exit 2): nothing to retry.
    Refused,
    /// Failures outlasted `run.max_restarts`.
    GaveUp { restarts: u32, last_failure: String },
}

/// Why one attempt ended.
#[derive(Debug)]
enum End {
    /// mpirun exited by itself.
    Exited(Option<i32>),
    /// Ranks without a heartbeat for `hang_timeout` (the job was killed).
    Hung(String),
    /// A rank's process vanished and mpirun did not end the job by itself.
    Died(String),
}

pub fn supervise(job: &Job) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor's runtime")?;
    rt.block_on(run(job))
}

struct Signals {
    term: Signal,
    int: Signal,
    /// Stop requests seen so far (the second one kills).
    count: u32,
}

impl Signals {
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        self.count += 1;
    }
}

fn say(msg: &str) {
    println!("[launcher] {msg}");
}

async fn run(job: &Job) -> Result<Outcome> {
    let mut signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        count: 0,
    };
    let mut restarts = 0u32;
    let mut resume = job.resume;
    loop {
        let end = attempt(job, restarts, resume, &mut signals).await?;
        let stopped = signals.count > 0;
        let failure = match end {
            End::Exited(Some(0)) => {
                let status = heartbeat::read_status(&job.output_dir);
                return Ok(match status {
                    Some(s) if s.state == "stopped" => Outcome::Stopped { restarts },
                    _ if stopped => Outcome::Stopped { restarts },
                    _ => Outcome::Done { restarts },
                });
            }
            _ if stopped => return Ok(Outcome::Stopped { restarts }),
            End::Exited(Some(2)) => return Ok(Outcome::Refused),
            End::Exited(code) => format!(
                "the job exited with {} (see the ranks' messages above)",
                code.map_or("a signal".to_string(), |c| format!("code {c}"))
            ),
            End::Hung(why) | End::Died(why) => why,
        };
        say(&format!("attempt {} failed: {failure}", restarts + 1));
        if restarts >= job.max_restarts {
            return Ok(Outcome::GaveUp {
                restarts,
                last_failure: failure,
            });
        }
        restarts += 1;
        resume = true;
        let wait = job
            .backoff
            .mul_f64(2f64.powi(restarts as i32 - 1))
            .min(Duration::from_secs(600));
        say(&format!(
            "restart {restarts}/{} from the newest checkpoint in {:.1} s",
            job.max_restarts,
            wait.as_secs_f64()
        ));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = signals.next() => return Ok(Outcome::Stopped { restarts: restarts - 1 }),
        }
    }
}

/// `[1,3]<stdout>:text` (mpirun --tag-output) → (3, false, "text"); untagged → None.
fn parse_tag(line: &str) -> Option<(usize, bool, &str)> {
    let rest = line.strip_prefix('[')?;
    let (ids, rest) = rest.split_once(']')?;
    let rank = ids.split(',').nth(1)?.parse().ok()?;
    let (stream, text) = rest.strip_prefix('<')?.split_once(">:")?;
    Some((rank, stream != "stdout", text))
}

/// What the console and the log show for one line of mpirun's output.
struct Shown {
    text: String,
    to_console: bool,
    is_err: bool,
}

/// Rank 0 in full; the other ranks' stderr and any line that looks like a warning or error;
/// mpirun's own lines. Every line goes to the log.
fn show(line: &str, from_stderr: bool) -> Shown {
    match parse_tag(line) {
        Some((rank, err, text)) => {
            let prefix = format!("[rank {rank}]");
            let text = if text.starts_with(&prefix) {
                text.to_string()
            } else {
                format!("{prefix} {text}")
            };
            let lower = text.to_lowercase();
            let loud = err || lower.contains("warn") || lower.contains("error");
            Shown {
                text,
                to_console: rank == 0 || loud,
                is_err: err,
            }
        }
        None => Shown {
            text: format!("[mpirun] {line}"),
            to_console: true,
            is_err: from_stderr,
        },
    }
}

fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by mpirun) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit_once(") ").map(|(_, r)| r.as_bytes()[0]), Some(b'Z' | b'X')),
        Err(_) => false,
    }
}

/// SIGKILL every process of session `sid` (mpirun made session leader, its daemons and ranks:
/// Open MPI gives each rank its own process group but not its own session).
fn kill_session(sid: u32) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After "(comm) ": state ppid pgrp session ...
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, r)| r.split(' ').collect())
            .unwrap_or_default();
        if fields.get(3).and_then(|s| s.parse::<u32>().ok()) == Some(sid) {
            // SAFETY: plain kill(2) on a pid read from /proc.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn send(pid: u32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Per-rank liveness as the heartbeat files show it.
struct Watch {
    started: SystemTime,
    host: String,
    beats: Vec<Option<(Beat, SystemTime)>>,
    /// First rank seen gone: (message, when).
    death: Option<(String, Instant)>,
}

impl Watch {
    fn refresh(&mut self, dir: &Path) {
        for (r, slot) in self.beats.iter_mut().enumerate() {
            if let Some(b) = heartbeat::read(dir, r) {
                *slot = Some(b);
            }
        }
    }

    /// Ranks whose last sign of life (heartbeat, or the launch for a rank that never beat) is
    /// older than `timeout`, oldest first, as a message.
    fn hung(&self, timeout: Duration) -> Option<String> {
        let now = SystemTime::now();
        let mut stale: Vec<(SystemTime, usize, String)> = Vec::new();
        for (r, b) in self.beats.iter().enumerate() {
            let (last, what) = match b {
                Some((beat, t)) => (
                    (*t).max(self.started),
                    format!("after step {} ({})", beat.step, beat.phase),
                ),
                None => (self.started, "before its first heartbeat".to_string()),
            };
            if now.duration_since(last).unwrap_or_default() > timeout {
                stale.push((last, r, what));
            }
        }
        stale.sort();
        let (_, first, what) = stale.first()?;
        let ranks: Vec<String> = stale
            .iter()
            .map(|(_, r, _)| r.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Some(format!(
            "no heartbeat for {:.0} s (run.hang_timeout) from rank(s) {}; the oldest is rank {first}'s, {what}",
            timeout.as_secs_f64(),
            ranks.join(",")
        ))
    }

    /// A local rank whose process is gone without its final "exit" beat.
    fn dead(&self) -> Option<String> {
        self.beats.iter().flatten().find_map(|(b, _)| {
            (b.host == self.host && b.phase != "exit" && !process_alive(b.pid)).then(|| {
                format!(
                    "rank {} (pid {} on {}) died after step {}",
                    b.rank, b.pid, b.host, b.step
                )
            })
        })
    }

    fn local_pids(&self) -> Vec<u32> {
        self.beats
            .iter()
            .flatten()
            .filter(|(b, _)| b.host == self.host)
            .map(|(b, _)| b.pid)
            .collect()
    }
}

async fn attempt(job: &Job, number: u32, resume: bool, signals: &mut Signals) -> Result<End> {
    let hb_dir = heartbeat::dir(&job.output_dir);
    if hb_dir.exists() {
        std::fs::remove_dir_all(&hb_dir).with_context(|| format!("clearing {}", hb_dir.display()))?;
    }
    let logs = job.output_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("attempt-{}.log", number + 1));
    let mut log = BufWriter::new(File::create(&log_path).with_context(|| log_path.display().to_string())?);

    let mut cmd = tokio::process::Command::new(&job.mpirun);
    cmd.arg("-np").arg(job.np.to_string()).arg("--tag-output");
    if let Some(h) = &job.hostfile {
        cmd.arg("--hostfile").arg(h);
    }
    // Remote ranks get the launcher's library path and the settings the tests and users pass.
    for (k, _) in std::env::vars() {
        if k == "LD_LIBRARY_PATH" || k.starts_with("NCCL_") || k.starts_with("DEBERTA_") {
            cmd.arg("-x").arg(k);
        }
    }
    cmd.arg(&job.worker).arg(job.command).arg(&job.config);
    if resume {
        cmd.args(["--resume", "auto"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: setsid is async-signal-safe; a session of its own keeps the terminal's Ctrl-C away
    // from the ranks and lets the launcher find every process of the job.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    say(&format!(
        "attempt {}: {} rank(s){}; log {}",
        number + 1,
        job.np,
        if resume {
            ", resuming from the newest checkpoint"
        } else {
            ""
        },
        log_path.display()
    ));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", job.mpirun.display()))?;
    let pid = child.id().context("mpirun has no pid")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut err = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let (mut out_open, mut err_open) = (true, true);
    let mut watch = Watch {
        started: SystemTime::now(),
        host: heartbeat::hostname(),
        beats: vec![None; job.np],
        death: None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut stop_sent_at: Option<Instant> = None;
    let end = loop {
        tokio::select! {
            line = out.next_line(), if out_open => match line? {
                Some(l) => emit(&mut log, &l, false),
                None => out_open = false,
            },
            line = err.next_line(), if err_open => match line? {
                Some(l) => emit(&mut log, &l, true),
                None => err_open = false,
            },
            status = child.wait() => {
                // Drain what is left of the output before reporting.
                while let Ok(Some(l)) = out.next_line().await { emit(&mut log, &l, false); }
                while let Ok(Some(l)) = err.next_line().await { emit(&mut log, &l, true); }
                break End::Exited(status?.code());
            }
            _ = signals.next() => {
                if signals.count == 1 {
                    say("stop requested: the ranks checkpoint and exit (send the signal again to kill them)");
                    send(pid, libc::SIGUSR1);
                    watch.refresh(&job.output_dir);
                    for p in watch.local_pids() { send(p, libc::SIGTERM); }
                    stop_sent_at = Some(Instant::now());
                } else {
                    say("second stop request: killing the job");
                    kill_session(pid);
                }
            }
            _ = tick.tick() => {
                watch.refresh(&job.output_dir);
                if let Some(why) = watch.hung(job.hang_timeout) {
                    say(&format!("{why}: ending the job"));
                    kill_session(pid);
                    let _ = child.wait().await;
                    break End::Hung(why);
                }
                if stop_sent_at.is_none() {
                    if let Some((why, at)) = &watch.death {
                        // mpirun normally ends the job itself within a second or two.
                        if at.elapsed() > Duration::from_secs(15) {
                            say(&format!("{why}; mpirun did not end the job: ending it"));
                            kill_session(pid);
                            let _ = child.wait().await;
                            break End::Died(why.clone());
                        }
                    } else if let Some(why) = watch.dead() {
                        say(&why);
                        watch.death = Some((why, Instant::now()));
                    }
                }
            }
        }
    };
    // Leave nothing behind (daemons, a rank that ignored its signal).
    kill_session(pid);
    log.flush().ok();
    Ok(match (end, watch.death) {
        (End::Exited(code), Some((why, _))) if code != Some(0) => {
            End::Died(format!("{why} (mpirun exit code {code:?})"))
        }
        (end, _) => end,
    })
}

fn emit(log: &mut impl Write, line: &str, from_stderr: bool) {
    let s = show(line, from_stderr);
    let _ = writeln!(log, "{}", s.text);
    if s.to_console {
        if s.is_err {
            eprintln!("{}", s.text);
        } else {
            println!("{}", s.text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_lines_get_one_rank_prefix() {
        let s = show("[1,0]<stdout>:[rank 0] step 3/10 loss 9.1", false);
        assert_eq!((s.text.as_str(), s.to_console), ("[rank 0] step 3/10 loss 9.1", true));
        let s = show("[1,2]<stdout>:resumed", false);
        assert_eq!((s.text.as_str(), s.to_console), ("[rank 2] resumed", false));
        let s = show("[1,2]<stderr>:libtorch warning", false);
        assert_eq!(
            (s.text.as_str(), s.to_console, s.is_err),
            ("[rank 2] libtorch warning", true, true)
        );
        let s = show("[1,3]<stdout>:Warning: slow", false);
        assert!(s.to_console);
        let s = show("mpirun noticed that process rank 1 exited", true);
        assert_eq!(s.text, "[mpirun] mpirun noticed that process rank 1 exited");
    }

    #[test]
    fn a_rank_that_never_beats_is_hung_after_the_timeout() {
        let w = Watch {
            started: SystemTime::now() - Duration::from_secs(10),
            host: "h".into(),
            beats: vec![
                Some((
                    Beat {
                        rank: 0,
                        pid: std::process::id(),
                        host: "h".into(),
                        step: 4,
                        phase: "train".into(),
                    },
                    SystemTime::now(),
                )),
                None,
            ],
            death: None,
        };
        let why = w.hung(Duration::from_secs(5)).unwrap();
        assert!(
            why.contains("from rank(s) 1; the oldest is rank 1's, before its first heartbeat"),
            "{why}"
        );
        assert!(w.hung(Duration::from_secs(60)).is_none());
        assert!(w.dead().is_none(), "this test process is alive");
    }
}
