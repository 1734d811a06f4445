//! The official jsonl files into typed records. Every error names the file, the line and the
//! field; a final line without `\n` (several official test files) is read like any other.

use std::path::Path;

use serde_json::Value;

use super::{Split, Task};
use crate::{DataError, Result};

/// Two text segments and a label: BoolQ (passage, question), CB/RTE/AX-g (premise,
/// hypothesis), AX-b (sentence1, sentence2).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub idx: i64,
    pub a: String,
    pub b: String,
    pub label: Option<usize>,
    /// AX-g: the id shared by the two sentences that differ only in the pronoun's gender.
    pub pair_id: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Copa {
    pub idx: i64,
    pub premise: String,
    pub choices: [String; 2],
    /// "cause" or "effect".
    pub question: String,
    pub label: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MultiRcAnswer {
    pub idx: i64,
    pub text: String,
    pub label: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MultiRcQuestion {
    pub idx: i64,
    pub question: String,
    pub answers: Vec<MultiRcAnswer>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MultiRc {
    pub idx: i64,
    pub passage: String,
    pub questions: Vec<MultiRcQuestion>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReCoRDQuery {
    pub idx: i64,
    /// The cloze query, with `@placeholder` where the entity goes.
    pub query: String,
    /// Gold answer texts (empty on test).
    pub answers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReCoRD {
    pub idx: i64,
    pub passage: String,
    /// Candidate entities: distinct texts of the passage's entity spans, in first-seen order.
    pub entities: Vec<String>,
    pub queries: Vec<ReCoRDQuery>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WiC {
    pub idx: i64,
    pub word: String,
    pub sentences: [String; 2],
    /// Character ranges [start, end) of the word in each sentence.
    pub spans: [(usize, usize); 2],
    pub label: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Wsc {
    pub idx: i64,
    pub text: String,
    /// (word index in `text.split(' ')`, the span's text): the candidate noun, the pronoun.
    pub spans: [(usize, String); 2],
    pub label: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Pair(Pair),
    Copa(Copa),
    MultiRc(MultiRc),
    ReCoRD(ReCoRD),
    WiC(WiC),
    Wsc(Wsc),
}

/// One line's fields, with errors that say where.
struct Line<'a> {
    path: &'a Path,
    line: u64,
}

impl Line<'_> {
    fn err(&self, msg: impl Into<String>) -> DataError {
        DataError::line(self.path, self.line, msg)
    }

    fn get<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Value> {
        v.get(field).ok_or_else(|| self.err(format!("missing field `{field}`")))
    }

    fn str(&self, v: &Value, field: &str) -> Result<String> {
        self.get(v, field)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.err(format!("field `{field}` is not a string")))
    }

    fn int(&self, v: &Value, field: &str) -> Result<i64> {
        let x = self.get(v, field)?;
        // AX-b writes its idx as a string.
        x.as_i64()
            .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| self.err(format!("field `{field}` is not an integer: {x}")))
    }

    fn usize(&self, v: &Value, field: &str) -> Result<usize> {
        let x = self.int(v, field)?;
        usize::try_from(x).map_err(|_| self.err(format!("field `{field}` is negative: {x}")))
    }

    fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Vec<Value>> {
        self.get(v, field)?
            .as_array()
            .ok_or_else(|| self.err(format!("field `{field}` is not an array")))
    }

    /// The label: required on train/val, ignored on test. Strings are looked up in `names`;
    /// booleans map to false = 0, true = 1; integers must be in range.
    fn label(&self, v: &Value, field: &str, names: &[&str], split: Split) -> Result<Option<usize>> {
        if split == Split::Test {
            return Ok(None);
        }
        let x = self.get(v, field)?;
        let i = match x {
            Value::String(s) => names.iter().position(|n| n == s),
            Value::Bool(b) => Some(usize::from(*b)),
            Value::Number(n) => n.as_u64().map(|n| n as usize).filter(|&n| n < names.len()),
            _ => None,
        };
        i.map(Some).ok_or_else(|| {
            self.err(format!(
                "field `{field}`: unknown label {x} (expected one of {names:?})"
            ))
        })
    }
}

/// Read every record of a task's split.
pub fn read(task: Task, path: &Path, split: Split) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::input(path, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let l = Line {
            path,
            line: i as u64 + 1,
        };
        let v: Value = serde_json::from_str(raw).map_err(|e| l.err(format!("not JSON: {e}")))?;
        if !v.is_object() {
            return Err(l.err("not a JSON object"));
        }
        out.push(record(task, &l, &v, split)?);
    }
    if out.is_empty() {
        return Err(DataError::input(path, "no records"));
    }
    Ok(out)
}

fn record(task: Task, l: &Line, v: &Value, split: Split) -> Result<Record> {
    let labels = task.labels();
    // The diagnostics are test sets for the RTE model, but carry their gold labels.
    let label_split = if task.is_diagnostic() { Split::Val } else { split };
    Ok(match task {
        Task::BoolQ => Record::Pair(Pair {
            idx: l.int(v, "idx")?,
            a: l.str(v, "passage")?,
            b: l.str(v, "question")?,
            label: l.label(v, "label", labels, split)?,
            pair_id: None,
        }),
        Task::Cb | Task::Rte | Task::AxG => Record::Pair(Pair {
            idx: l.int(v, "idx")?,
            a: l.str(v, "premise")?,
            b: l.str(v, "hypothesis")?,
            label: l.label(v, "label", labels, label_split)?,
            pair_id: if task == Task::AxG {
                Some(l.int(v, "pair_id")?)
            } else {
                None
            },
        }),
        Task::AxB => Record::Pair(Pair {
            idx: l.int(v, "idx")?,
            a: l.str(v, "sentence1")?,
            b: l.str(v, "sentence2")?,
            label: l.label(v, "label", labels, label_split)?,
            pair_id: None,
        }),
        Task::Copa => {
            let question = l.str(v, "question")?;
            if question != "cause" && question != "effect" {
                return Err(l.err(format!(
                    "field `question`: {question:?} is neither \"cause\" nor \"effect\""
                )));
            }
            Record::Copa(Copa {
                idx: l.int(v, "idx")?,
                premise: l.str(v, "premise")?,
                choices: [l.str(v, "choice1")?, l.str(v, "choice2")?],
                question,
                label: l.label(v, "label", labels, split)?,
            })
        }
        Task::MultiRc => {
            let p = l.get(v, "passage")?;
            let mut questions = Vec::new();
            for q in l.array(p, "questions")? {
                let mut answers = Vec::new();
                for a in l.array(q, "answers")? {
                    answers.push(MultiRcAnswer {
                        idx: l.int(a, "idx")?,
                        text: l.str(a, "text")?,
                        label: l.label(a, "label", labels, split)?,
                    });
                }
                questions.push(MultiRcQuestion {
                    idx: l.int(q, "idx")?,
                    question: l.str(q, "question")?,
                    answers,
                });
            }
            Record::MultiRc(MultiRc {
                idx: l.int(v, "idx")?,
                passage: l.str(p, "text")?,
                questions,
            })
        }
        Task::ReCoRD => {
            let p = l.get(v, "passage")?;
            let passage = l.str(p, "text")?;
            let chars: Vec<char> = passage.chars().collect();
            let mut entities: Vec<String> = Vec::new();
            for e in l.array(p, "entities")? {
                // Official spans are inclusive of `end`, in characters.
                let (s, t) = (l.usize(e, "start")?, l.usize(e, "end")?);
                if s > t || t >= chars.len() {
                    return Err(l.err(format!(
                        "entity [{s}, {t}] is outside the passage ({} chars)",
                        chars.len()
                    )));
                }
                let text: String = chars[s..=t].iter().collect();
                if !entities.contains(&text) {
                    entities.push(text);
                }
            }
            let mut queries = Vec::new();
            for q in l.array(v, "qas")? {
                let query = l.str(q, "query")?;
                if !query.contains("@placeholder") {
                    return Err(l.err("field `query` has no @placeholder"));
                }
                let answers = if split == Split::Test {
                    Vec::new()
                } else {
                    let mut a = Vec::new();
                    for ans in l.array(q, "answers")? {
                        a.push(l.str(ans, "text")?);
                    }
                    a
                };
                queries.push(ReCoRDQuery {
                    idx: l.int(q, "idx")?,
                    query,
                    answers,
                });
            }
            Record::ReCoRD(ReCoRD {
                idx: l.int(v, "idx")?,
                passage,
                entities,
                queries,
            })
        }
        Task::WiC => {
            let sentences = [l.str(v, "sentence1")?, l.str(v, "sentence2")?];
            let spans = [
                (l.usize(v, "start1")?, l.usize(v, "end1")?),
                (l.usize(v, "start2")?, l.usize(v, "end2")?),
            ];
            for (k, (s, e)) in spans.iter().enumerate() {
                if s >= e || *e > sentences[k].chars().count() {
                    return Err(l.err(format!("span start{0}/end{0} = {s}/{e} is outside sentence{0}", k + 1)));
                }
            }
            Record::WiC(WiC {
                idx: l.int(v, "idx")?,
                word: l.str(v, "word")?,
                sentences,
                spans,
                label: l.label(v, "label", labels, split)?,
            })
        }
        Task::Wsc => {
            let text = l.str(v, "text")?;
            let t = l.get(v, "target")?;
            let words = text.split(' ').count();
            let mut spans = Vec::new();
            for k in [1, 2] {
                let (i, s) = (
                    l.usize(t, &format!("span{k}_index"))?,
                    l.str(t, &format!("span{k}_text"))?,
                );
                if i >= words {
                    return Err(l.err(format!("target.span{k}_index = {i} is beyond the text's {words} words")));
                }
                spans.push((i, s));
            }
            let [s1, s2]: [(usize, String); 2] = spans.try_into().expect("two spans");
            Record::Wsc(Wsc {
                idx: l.int(v, "idx")?,
                text,
                spans: [s1, s2],
                label: l.label(v, "label", labels, split)?,
            })
        }
    })
}
