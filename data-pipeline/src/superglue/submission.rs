//! Test predictions as the SuperGLUE leaderboard takes them: `<Task>.jsonl`, one object per
//! test item with its `idx` and `label` (label names as the task's files spell them: "true"/
//! "false" for BoolQ, WiC and WSC, class names for CB/RTE/AX, 0/1 for COPA, the entity text for
//! ReCoRD, MultiRC nested per passage, question and answer).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::read::Record;
use super::Task;
use crate::{DataError, Result};

/// The submission objects for decisions `pred` (in `decide`'s item order) on `records`.
pub fn lines(task: Task, records: &[Record], pred: &[usize]) -> Vec<Value> {
    let names = task.labels();
    let mut out = Vec::new();
    let mut i = 0;
    let mut next = || {
        i += 1;
        pred[i - 1]
    };
    for r in records {
        match r {
            Record::Pair(p) => out.push(json!({"idx": p.idx, "label": names[next()]})),
            Record::WiC(w) => out.push(json!({"idx": w.idx, "label": names[next()]})),
            Record::Wsc(w) => out.push(json!({"idx": w.idx, "label": names[next()]})),
            Record::Copa(c) => out.push(json!({"idx": c.idx, "label": next()})),
            Record::MultiRc(m) => {
                let questions: Vec<Value> = m
                    .questions
                    .iter()
                    .map(|q| {
                        let answers: Vec<Value> = q
                            .answers
                            .iter()
                            .map(|a| json!({"idx": a.idx, "label": next()}))
                            .collect();
                        json!({"idx": q.idx, "answers": answers})
                    })
                    .collect();
                out.push(json!({"idx": m.idx, "passage": {"questions": questions}}));
            }
            Record::ReCoRD(rc) => {
                for q in &rc.queries {
                    let choice = next();
                    out.push(json!({"idx": q.idx, "label": rc.entities.get(choice).cloned().unwrap_or_default()}));
                }
            }
        }
    }
    out
}

/// Write `<dir>/<Task>.jsonl` (temporary name, then renamed).
pub fn write(dir: &Path, task: Task, records: &[Record], pred: &[usize]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::output(dir, e.to_string()))?;
    let path = dir.join(format!("{}.jsonl", task.name()));
    let tmp = path.with_extension("jsonl.tmp");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| DataError::output(&tmp, e.to_string()))?);
    for l in lines(task, records, pred) {
        writeln!(f, "{l}").map_err(|e| DataError::output(&tmp, e.to_string()))?;
    }
    f.flush().map_err(|e| DataError::output(&tmp, e.to_string()))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| DataError::output(&path, e.to_string()))?;
    Ok(path)
}
