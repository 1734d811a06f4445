//! What a traced step's kernels cost, from the Chrome trace libtorch's profiler saves
//! (`deberta_model::profile::trace_stop`): each device event (kernel, copy, fill) is charged to
//! the first mark (`profile::mark`, a zero-length host range) after its launch, so to the part
//! of the step that launched it. Unlike the synchronised profile, nothing waits for the device:
//! the times are what the kernels take in a real step, and what the host's work costs shows as
//! the device's idle time in the span.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// A name's share: device milliseconds and how many events.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub name: String,
    pub ms: f64,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraceSummary {
    /// The device events' time, summed.
    pub busy_ms: f64,
    /// From the first device event's start to the last one's end.
    pub span_ms: f64,
    pub events: usize,
    pub marks: usize,
    /// By the part of the step that launched them, the largest first.
    pub parts: Vec<Share>,
    /// By kernel name (the first 100 characters), the largest first.
    pub kernels: Vec<Share>,
    /// By who wrote the kernel (`kernel_group`), the largest first.
    pub groups: Vec<Share>,
}

/// Who wrote a kernel, by its name: cuBLAS's GEMMs, ours (the NVRTC sources in
/// model/src/kernels), or libtorch's own (elementwise, reductions, copies, fills).
pub fn kernel_group(name: &str) -> &'static str {
    const OURS: [&str; 5] = ["dattn_", "rln_", "gelu_bwd_", "ce_", "adamw_"];
    if name.starts_with("nvjet") || name.contains("gemm") || name.contains("xmma") {
        "GEMMs (cuBLAS)"
    } else if OURS.iter().any(|p| name.starts_with(p)) {
        "ours (model/src/kernels)"
    } else {
        "libtorch's other kernels, copies and fills"
    }
}

struct DeviceEvent {
    name: String,
    ts: f64,
    dur: f64,
    correlation: Option<i64>,
}

/// The summary of the trace at `path`.
pub fn summarize(path: &Path) -> Result<TraceSummary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the trace {}", path.display()))?;
    let trace: Value =
        serde_json::from_str(&text).with_context(|| format!("the trace {} is not JSON", path.display()))?;
    let events = trace["traceEvents"]
        .as_array()
        .with_context(|| format!("the trace {} has no traceEvents list", path.display()))?;
    Ok(summarize_events(events))
}

fn summarize_events(events: &[Value]) -> TraceSummary {
    let mut device = Vec::new();
    let mut launches: HashMap<i64, f64> = HashMap::new();
    let mut marks: Vec<(f64, String)> = Vec::new();
    for e in events {
        let (Some(cat), Some(ts)) = (e["cat"].as_str(), e["ts"].as_f64()) else {
            continue;
        };
        let name = e["name"].as_str().unwrap_or("?");
        let correlation = e["args"]["correlation"].as_i64();
        match cat {
            "kernel" | "gpu_memcpy" | "gpu_memset" => device.push(DeviceEvent {
                name: name.chars().take(100).collect(),
                ts,
                dur: e["dur"].as_f64().unwrap_or(0.0),
                correlation,
            }),
            "cuda_runtime" | "cuda_driver" => {
                if let Some(c) = correlation {
                    launches.insert(c, ts);
                }
            }
            "user_annotation" => marks.push((ts, name.to_string())),
            _ => {}
        }
    }
    marks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let part_of = |e: &DeviceEvent| -> String {
        let Some(launch) = e.correlation.and_then(|c| launches.get(&c)) else {
            return "(launch not in the trace)".into();
        };
        let i = marks.partition_point(|(ts, _)| ts < launch);
        marks
            .get(i)
            .map_or_else(|| "(after the last mark)".into(), |(_, name)| name.clone())
    };
    let mut parts: HashMap<String, Share> = HashMap::new();
    let mut kernels: HashMap<String, Share> = HashMap::new();
    let mut groups: HashMap<String, Share> = HashMap::new();
    let add = |into: &mut HashMap<String, Share>, name: String, ms: f64| {
        let s = into.entry(name.clone()).or_insert(Share {
            name,
            ms: 0.0,
            count: 0,
        });
        s.ms += ms;
        s.count += 1;
    };
    let (mut first, mut last, mut busy) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
    for e in &device {
        add(&mut parts, part_of(e), e.dur / 1e3);
        add(&mut kernels, e.name.clone(), e.dur / 1e3);
        add(&mut groups, kernel_group(&e.name).to_string(), e.dur / 1e3);
        first = first.min(e.ts);
        last = last.max(e.ts + e.dur);
        busy += e.dur / 1e3;
    }
    let sorted = |m: HashMap<String, Share>| {
        let mut v: Vec<Share> = m.into_values().collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        v
    };
    TraceSummary {
        busy_ms: busy,
        span_ms: if device.is_empty() { 0.0 } else { (last - first) / 1e3 },
        events: device.len(),
        marks: marks.len(),
        parts: sorted(parts),
        kernels: sorted(kernels),
        groups: sorted(groups),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kernels_are_charged_to_the_first_mark_after_their_launch() {
        // Host: launch 1 at 10, mark "a" at 20, launch 2 at 30 and 3 at 35, mark "b" at 40,
        // launch 4 at 50 (after every mark); kernel 5's launch is missing.
        let launch = |c: i64, ts: f64| json!({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "args": {"correlation": c}});
        let kernel = |c: i64, name: &str, ts: f64, dur: f64| json!({"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": c}});
        let mark = |name: &str, ts: f64| json!({"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": 0});
        let events = vec![
            mark("b", 40.0),
            launch(1, 10.0),
            mark("a", 20.0),
            launch(2, 30.0),
            launch(3, 35.0),
            launch(4, 50.0),
            json!({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 30.0, "dur": 3}),
            kernel(1, "gemm", 100.0, 500.0),
            kernel(2, "gemm", 600.0, 1500.0),
            kernel(3, "softmax", 2100.0, 250.0),
            kernel(4, "adamw_step", 2400.0, 1000.0),
            json!({"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 3500.0, "dur": 100, "args": {"correlation": 5}}),
        ];
        let s = summarize_events(&events);
        assert_eq!((s.events, s.marks), (5, 2));
        assert!((s.busy_ms - 3.35).abs() < 1e-9, "{s:?}");
        assert!((s.span_ms - 3.5).abs() < 1e-9, "{s:?}");
        let part = |name: &str| s.parts.iter().find(|p| p.name == name).map(|p| (p.ms, p.count));
        assert_eq!(part("a"), Some((0.5, 1)));
        assert_eq!(part("b"), Some((1.75, 2)));
        assert_eq!(part("(after the last mark)"), Some((1.0, 1)));
        assert_eq!(part("(launch not in the trace)"), Some((0.1, 1)));
        assert_eq!(s.parts[0].name, "b");
        assert_eq!((s.kernels[0].name.as_str(), s.kernels[0].count), ("gemm", 2));
        assert!((s.kernels[0].ms - 2.0).abs() < 1e-9);
        let group = |name: &str| s.groups.iter().find(|g| g.name == name).map(|g| (g.ms, g.count));
        assert_eq!(group("GEMMs (cuBLAS)"), Some((2.0, 2)));
        assert_eq!(group("ours (model/src/kernels)"), Some((1.0, 1)));
        assert_eq!(group("libtorch's other kernels, copies and fills"), Some((0.35, 2)));
    }
}
