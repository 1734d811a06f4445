//! Records → model examples, following the official DeBERTa recipe (spec §11):
//! `[CLS] s0 [SEP] s1 [SEP]`; segments tokenised separately; when too long, tokens are popped
//! from the longest segment, from the front or the back by a coin seeded by the example's index,
//! and (the official code's quirk, pitfall 16) a truncated pair comes back ordered longest first.
//!
//! Per task: BoolQ (passage, question); CB/RTE/AX (premise, hypothesis); COPA two binary
//! examples per item, "cause" → (option, premise), "effect" → (premise, option); MultiRC one
//! binary example per answer, (passage, question tokens ++ answer tokens); ReCoRD one binary
//! example per candidate entity, (passage, query with `@placeholder` filled by the entity) — the
//! per-candidate formulation, where the official code scores entity spans of one `[MASK]`ed query
//! (docs/superglue.md); WiC (sentence1, sentence2) with the target word's token span in each;
//! WSC the text with the spans of the candidate noun and of the pronoun. The span heads read the
//! pooled `[CLS]` and the mean of each span (the SuperGLUE baselines' formulation; the official
//! DeBERTa code has no runnable WiC/WSC recipe).

use super::read::Record;
use super::Task;
use crate::masking::IGNORE_LABEL;
use crate::rng::{key, Rng};
use crate::tokenizer::Vocab;
use crate::{DataError, Result};

/// One model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// `[CLS] ... [SEP]`, at most `max_len` ids.
    pub ids: Vec<u32>,
    /// Class index, or `IGNORE_LABEL` when unknown (test).
    pub label: i64,
    /// The prediction item it belongs to (`items` order of `decide`).
    pub item: usize,
    /// Its option within the item (COPA choice, ReCoRD candidate); 0 otherwise.
    pub option: usize,
    /// Token ranges [start, end) in `ids` (WiC: the word in each sentence; WSC: noun, pronoun).
    pub spans: Option<[(usize, usize); 2]>,
}

/// A segment and the char offsets of its tokens (for spans).
struct Segment {
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
}

fn tokenize(vocab: &Vocab, text: &str) -> Result<Segment> {
    let enc = vocab
        .tokenizer
        .encode_char_offsets(text, false)
        .map_err(|e| DataError::tokenizer(&vocab.path, format!("encode failed: {e}")))?;
    Ok(Segment {
        ids: enc.get_ids().to_vec(),
        offsets: enc.get_offsets().to_vec(),
    })
}

/// Token range of the chars [start, end) in `seg` (tokens that overlap it).
fn char_span(seg: &Segment, start: usize, end: usize) -> Option<(usize, usize)> {
    let hit: Vec<usize> = (0..seg.offsets.len())
        .filter(|&i| {
            let (s, e) = seg.offsets[i];
            s < end && e > start
        })
        .collect();
    Some((*hit.first()?, hit.last()? + 1))
}

/// The official truncation: while too long, sort the segments by length (longest first, stable)
/// and pop a token from the longest, at the front or the back by a fair coin. Returns, in the
/// final order, (original segment index, tokens popped from its front).
fn truncate(segs: &mut [(usize, Segment, usize)], max_tokens: usize, rng: &mut Rng) {
    while segs.iter().map(|s| s.1.ids.len()).sum::<usize>() > max_tokens {
        segs.sort_by_key(|s| std::cmp::Reverse(s.1.ids.len()));
        let (_, seg, front) = &mut segs[0];
        if rng.next_f64() < 0.5 {
            seg.ids.remove(0);
            seg.offsets.remove(0);
            *front += 1;
        } else {
            seg.ids.pop();
            seg.offsets.pop();
        }
    }
}

/// `[CLS] seg0 [SEP] seg1 [SEP]` from segments (after truncation), and where each original
/// segment starts in it.
fn assemble(vocab: &Vocab, segs: &[(usize, Segment, usize)]) -> (Vec<u32>, Vec<usize>) {
    let sp = vocab.special;
    let mut ids = vec![sp.cls];
    let mut starts = vec![0; segs.len()];
    for (orig, seg, _) in segs {
        starts[*orig] = ids.len();
        ids.extend(&seg.ids);
        ids.push(sp.sep);
    }
    (ids, starts)
}

/// A span (segment k, token range in the untruncated segment) mapped into `ids`; a span cut away
/// by truncation falls back to `[CLS]`.
fn place(segs: &[(usize, Segment, usize)], starts: &[usize], k: usize, span: (usize, usize)) -> (usize, usize) {
    let (_, seg, front) = segs.iter().find(|s| s.0 == k).expect("segment");
    let (s, e) = (
        span.0.saturating_sub(*front),
        span.1.saturating_sub(*front).min(seg.ids.len()),
    );
    if span.0 < *front || s >= e {
        (0, 1)
    } else {
        (starts[k] + s, starts[k] + e)
    }
}

struct Builder<'a> {
    vocab: &'a Vocab,
    max_len: usize,
    seed: u64,
    out: Vec<Example>,
}

impl Builder<'_> {
    /// Add one example from text segments (each tokenised separately), with optional char spans
    /// (segment, start, end) that must be found in the tokens.
    fn add(
        &mut self,
        segments: Vec<Segment>,
        label: Option<usize>,
        item: usize,
        option: usize,
        spans: Option<[(usize, (usize, usize)); 2]>,
    ) -> Result<()> {
        let n = segments.len();
        let max_tokens = self.max_len.checked_sub(n + 1).filter(|&m| m >= n).ok_or_else(|| {
            DataError::Config(format!(
                "max_seq_len = {} is too short for {n} segment(s)",
                self.max_len
            ))
        })?;
        let token_spans = match spans {
            Some(sp) => {
                let mut v = [(0usize, (0usize, 0usize)); 2];
                for (j, (k, (s, e))) in sp.iter().enumerate() {
                    let t = char_span(&segments[*k], *s, *e)
                        .ok_or_else(|| DataError::Config(format!("span {s}..{e} of segment {k} has no tokens")))?;
                    v[j] = (*k, t);
                }
                Some(v)
            }
            None => None,
        };
        let mut segs: Vec<(usize, Segment, usize)> = segments.into_iter().enumerate().map(|(i, s)| (i, s, 0)).collect();
        let mut rng = Rng::new(key(&[self.seed, self.out.len() as u64]));
        truncate(&mut segs, max_tokens, &mut rng);
        let (ids, starts) = assemble(self.vocab, &segs);
        let spans = token_spans.map(|v| v.map(|(k, t)| place(&segs, &starts, k, t)));
        self.out.push(Example {
            ids,
            label: label.map_or(IGNORE_LABEL, |l| l as i64),
            item,
            option,
            spans,
        });
        Ok(())
    }
}

/// "\n@highlight\n" separates ReCoRD's summary bullets; read them as sentences.
fn record_passage(text: &str) -> String {
    text.replace("\n@highlight\n", ". ")
}

/// Char offset of word `i` of `text.split(' ')` and of the end of the `n`-word span there.
fn word_chars(text: &str, i: usize, span_text: &str) -> (usize, usize) {
    let words: Vec<&str> = text.split(' ').collect();
    let start: usize = words[..i].iter().map(|w| w.chars().count() + 1).sum();
    let n = span_text.split(' ').count().max(1);
    let last = (i + n).min(words.len());
    let end = start + words[i..last].iter().map(|w| w.chars().count()).sum::<usize>() + (last - i - 1);
    (start, end.max(start + 1))
}

/// Examples of all records, in item order. `seed` seeds the truncation coins.
pub fn encode(task: Task, records: &[Record], vocab: &Vocab, max_len: usize, seed: u64) -> Result<Vec<Example>> {
    let mut b = Builder {
        vocab,
        max_len,
        seed,
        out: Vec::new(),
    };
    let tok = |t: &str| tokenize(vocab, t);
    let mut item = 0usize;
    for r in records {
        match (task, r) {
            (_, Record::Pair(p)) => {
                b.add(vec![tok(&p.a)?, tok(&p.b)?], p.label, item, 0, None)?;
                item += 1;
            }
            (_, Record::Copa(c)) => {
                for (k, choice) in c.choices.iter().enumerate() {
                    let segs = if c.question == "cause" {
                        vec![tok(choice)?, tok(&c.premise)?]
                    } else {
                        vec![tok(&c.premise)?, tok(choice)?]
                    };
                    b.add(segs, c.label.map(|l| usize::from(l == k)), item, k, None)?;
                }
                item += 1;
            }
            (_, Record::MultiRc(m)) => {
                for q in &m.questions {
                    for a in &q.answers {
                        let mut qa = tok(&q.question)?;
                        let ans = tok(&a.text)?;
                        qa.ids.extend(ans.ids);
                        qa.offsets.extend(ans.offsets);
                        b.add(vec![tok(&m.passage)?, qa], a.label, item, 0, None)?;
                        item += 1;
                    }
                }
            }
            (_, Record::ReCoRD(rc)) => {
                let passage = record_passage(&rc.passage);
                for q in &rc.queries {
                    for (k, e) in rc.entities.iter().enumerate() {
                        let filled = q.query.replace("@placeholder", e);
                        let label = (!q.answers.is_empty()).then(|| usize::from(q.answers.contains(e)));
                        b.add(vec![tok(&passage)?, tok(&filled)?], label, item, k, None)?;
                    }
                    item += 1;
                }
            }
            (_, Record::WiC(w)) => {
                let segs = vec![tok(&w.sentences[0])?, tok(&w.sentences[1])?];
                b.add(segs, w.label, item, 0, Some([(0, w.spans[0]), (1, w.spans[1])]))?;
                item += 1;
            }
            (_, Record::Wsc(w)) => {
                let spans = [0, 1].map(|k| (0, word_chars(&w.text, w.spans[k].0, &w.spans[k].1)));
                b.add(vec![tok(&w.text)?], w.label, item, 0, Some(spans))?;
                item += 1;
            }
        }
    }
    Ok(b.out)
}

/// Number of prediction items of `records` (what `decide` returns one answer for).
pub fn item_count(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| match r {
            Record::MultiRc(m) => m.questions.iter().map(|q| q.answers.len()).sum(),
            Record::ReCoRD(rc) => rc.queries.len(),
            _ => 1,
        })
        .sum()
}

/// One decision per item from per-example logits [n_examples][n_labels]: the argmax label, or
/// for multi-option items (COPA, ReCoRD) the option whose "1" logit margin is largest.
pub fn decide(task: Task, examples: &[Example], logits: &[Vec<f32>], items: usize) -> Vec<usize> {
    let multi = matches!(task, Task::Copa | Task::ReCoRD);
    let mut best: Vec<(f32, usize)> = vec![(f32::NEG_INFINITY, 0); items];
    for (ex, l) in examples.iter().zip(logits) {
        let (score, choice) = if multi {
            (l[1] - l[0], ex.option)
        } else {
            let (i, v) = l.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
            );
            (v, i)
        };
        if score > best[ex.item].0 {
            best[ex.item] = (score, choice);
        }
    }
    best.into_iter().map(|b| b.1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(n: usize) -> Segment {
        Segment {
            ids: (0..n as u32).collect(),
            offsets: (0..n).map(|i| (i, i + 1)).collect(),
        }
    }

    #[test]
    fn truncation_pops_the_longest_and_reorders_only_when_it_truncates() {
        let mut rng = Rng::new(1);
        let mut segs = vec![(0, seg(3), 0), (1, seg(10), 0)];
        truncate(&mut segs, 20, &mut rng);
        assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1], "untouched");
        truncate(&mut segs, 8, &mut rng);
        let lens: Vec<usize> = segs.iter().map(|s| s.1.ids.len()).collect();
        assert_eq!(lens.iter().sum::<usize>(), 8);
        assert_eq!(segs[0].0, 1, "the truncated pair comes back longest first");
        assert_eq!(lens, [5, 3]);
        // Both ends were popped over 5 tokens (the coin is fair and seeded).
        assert!(segs[0].2 > 0 && segs[0].2 < 5, "{}", segs[0].2);
    }

    #[test]
    fn word_spans_cover_multi_word_texts() {
        let t = "Bernard , who had not told the government official";
        assert_eq!(word_chars(t, 0, "Bernard"), (0, 7));
        let (s, e) = word_chars(t, 6, "the government official");
        assert_eq!(&t[s..e], "the government official");
    }

    #[test]
    fn decisions_take_the_argmax_or_the_best_option() {
        let ex = |item, option| Example {
            ids: vec![],
            label: 0,
            item,
            option,
            spans: None,
        };
        let exs = [ex(0, 0), ex(0, 1), ex(1, 0), ex(1, 1)];
        let logits = [vec![0.0, 1.0], vec![0.0, 2.0], vec![3.0, 1.0], vec![0.0, -1.0]];
        assert_eq!(decide(Task::Copa, &exs, &logits, 2), [1, 1]);
        let exs = [ex(0, 0), ex(1, 0)];
        assert_eq!(
            decide(Task::Cb, &exs, &[vec![0.0, 2.0, 1.0], vec![5.0, 0.0, 1.0]], 2),
            [1, 0]
        );
    }
}
