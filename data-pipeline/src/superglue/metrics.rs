//! The metrics as SuperGLUE defines them, on per-item decisions (`encode::decide`): accuracy;
//! CB macro-F1; MultiRC F1a (binary F1 over all answer options) and EM (questions with every
//! answer right); ReCoRD max-over-gold token F1 and EM after the official normalisation (lower
//! case, no punctuation, no articles, single spaces); AX-b Matthews correlation; AX-g accuracy
//! and gender parity (pairs with equal predictions).

use std::collections::HashMap;

use super::read::Record;
use super::Task;

/// (name, value) with values in [0, 1] (MCC in [-1, 1]), the selection metric first.
pub type Scores = Vec<(&'static str, f64)>;

pub fn accuracy(gold: &[usize], pred: &[usize]) -> f64 {
    let right = gold.iter().zip(pred).filter(|(g, p)| g == p).count();
    right as f64 / gold.len().max(1) as f64
}

/// F1 of class `positive`.
pub fn f1_of(gold: &[usize], pred: &[usize], positive: usize) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
    for (&g, &p) in gold.iter().zip(pred) {
        match (g == positive, p == positive) {
            (true, true) => tp += 1.0,
            (false, true) => fp += 1.0,
            (true, false) => fn_ += 1.0,
            _ => {}
        }
    }
    if tp == 0.0 {
        0.0
    } else {
        2.0 * tp / (2.0 * tp + fp + fn_)
    }
}

/// Unweighted mean of the per-class F1 over the classes that occur in `gold` or `pred`
/// (scikit-learn's `f1_score(average="macro")`).
pub fn f1_macro(gold: &[usize], pred: &[usize]) -> f64 {
    let mut classes: Vec<usize> = gold.iter().chain(pred).copied().collect();
    classes.sort_unstable();
    classes.dedup();
    classes.iter().map(|&c| f1_of(gold, pred, c)).sum::<f64>() / classes.len().max(1) as f64
}

/// Matthews correlation of binary labels (0 when a margin is empty, as scikit-learn returns).
pub fn matthews(gold: &[usize], pred: &[usize]) -> f64 {
    let (mut tp, mut tn, mut fp, mut fn_) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&g, &p) in gold.iter().zip(pred) {
        match (g == 1, p == 1) {
            (true, true) => tp += 1.0,
            (false, false) => tn += 1.0,
            (false, true) => fp += 1.0,
            (true, false) => fn_ += 1.0,
        }
    }
    let den = ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt();
    if den == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fn_) / den
    }
}

/// The official ReCoRD/SQuAD answer normalisation.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Token-level F1 of two answers after normalisation.
pub fn token_f1(pred: &str, gold: &str) -> f64 {
    let (p, g) = (normalize_answer(pred), normalize_answer(gold));
    let (p, g): (Vec<&str>, Vec<&str>) = (p.split_whitespace().collect(), g.split_whitespace().collect());
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &g {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in &p {
        if let Some(c) = counts.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (precision, recall) = (common as f64 / p.len() as f64, common as f64 / g.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

pub fn exact_match(pred: &str, gold: &str) -> bool {
    normalize_answer(pred) == normalize_answer(gold)
}

/// ReCoRD: mean over queries of the max over gold answers.
pub fn record_f1_em(preds: &[String], golds: &[Vec<String>]) -> (f64, f64) {
    let (mut f1, mut em) = (0.0, 0.0);
    for (p, g) in preds.iter().zip(golds) {
        f1 += g.iter().map(|a| token_f1(p, a)).fold(0.0, f64::max);
        em += if g.iter().any(|a| exact_match(p, a)) { 1.0 } else { 0.0 };
    }
    let n = preds.len().max(1) as f64;
    (f1 / n, em / n)
}

/// MultiRC: F1a over all answer options, EM over questions. `question` groups the answers.
pub fn multirc_f1a_em(gold: &[usize], pred: &[usize], question: &[(i64, i64)]) -> (f64, f64) {
    let mut all_right: HashMap<(i64, i64), bool> = HashMap::new();
    for ((&g, &p), q) in gold.iter().zip(pred).zip(question) {
        let e = all_right.entry(*q).or_insert(true);
        *e &= g == p;
    }
    let em = all_right.values().filter(|&&r| r).count() as f64 / all_right.len().max(1) as f64;
    (f1_of(gold, pred, 1), em)
}

/// AX-g gender parity: the share of pairs (same `pair_id`) whose predictions agree.
pub fn gender_parity(pred: &[usize], pair_ids: &[i64]) -> f64 {
    let mut pairs: HashMap<i64, Vec<usize>> = HashMap::new();
    for (&p, &id) in pred.iter().zip(pair_ids) {
        pairs.entry(id).or_default().push(p);
    }
    let same = pairs.values().filter(|v| v.iter().all(|&p| p == v[0])).count();
    same as f64 / pairs.len().max(1) as f64
}

/// Gold decisions per item (None for unlabelled items), in `decide`'s item order. For COPA the
/// gold option; for ReCoRD the gold answer texts come from `record_golds`.
pub fn gold_items(records: &[Record]) -> Vec<Option<usize>> {
    let mut out = Vec::new();
    for r in records {
        match r {
            Record::Pair(p) => out.push(p.label),
            Record::Copa(c) => out.push(c.label),
            Record::WiC(w) => out.push(w.label),
            Record::Wsc(w) => out.push(w.label),
            Record::MultiRc(m) => out.extend(m.questions.iter().flat_map(|q| q.answers.iter().map(|a| a.label))),
            Record::ReCoRD(rc) => out.extend(rc.queries.iter().map(|_| None)),
        }
    }
    out
}

/// The task's metrics for decisions `pred` on labelled `records` (the selection metric first).
pub fn score(task: Task, records: &[Record], pred: &[usize]) -> Scores {
    let gold: Vec<usize> = gold_items(records)
        .into_iter()
        .map(|g| g.unwrap_or(usize::MAX))
        .collect();
    match task {
        Task::Cb => vec![("f1_macro", f1_macro(&gold, pred)), ("accuracy", accuracy(&gold, pred))],
        Task::AxB => vec![("mcc", matthews(&gold, pred)), ("accuracy", accuracy(&gold, pred))],
        Task::AxG => {
            let ids: Vec<i64> = records
                .iter()
                .map(|r| match r {
                    Record::Pair(p) => p.pair_id.unwrap_or(p.idx),
                    _ => 0,
                })
                .collect();
            vec![
                ("accuracy", accuracy(&gold, pred)),
                ("gender_parity", gender_parity(pred, &ids)),
            ]
        }
        Task::MultiRc => {
            let mut q = Vec::new();
            for r in records {
                if let Record::MultiRc(m) = r {
                    for question in &m.questions {
                        q.extend(question.answers.iter().map(|_| (m.idx, question.idx)));
                    }
                }
            }
            let (f1a, em) = multirc_f1a_em(&gold, pred, &q);
            vec![("f1a", f1a), ("em", em)]
        }
        Task::ReCoRD => {
            let (mut preds, mut golds) = (Vec::new(), Vec::new());
            let mut i = 0;
            for r in records {
                if let Record::ReCoRD(rc) = r {
                    for q in &rc.queries {
                        preds.push(rc.entities.get(pred[i]).cloned().unwrap_or_default());
                        golds.push(q.answers.clone());
                        i += 1;
                    }
                }
            }
            let (f1, em) = record_f1_em(&preds, &golds);
            vec![("f1", f1), ("em", em)]
        }
        _ => vec![("accuracy", accuracy(&gold, pred))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_normalisation_and_token_f1_by_hand() {
        assert_eq!(normalize_answer("The  Eiffel-Tower, Paris!"), "eiffeltower paris");
        assert_eq!(normalize_answer("An apple a day"), "apple day");
        // "the" is an article only as a word.
        assert_eq!(normalize_answer("Theresa May"), "theresa may");
        assert!(exact_match("the Blues", "Blues"));
        // pred {diego, costa}, gold {diego, costa, fernandes}: P 1, R 2/3 → F1 0.8.
        assert!((token_f1("Diego Costa", "Diego Costa Fernandes") - 0.8).abs() < 1e-12);
        assert_eq!(token_f1("Chelsea", "Zouma"), 0.0);
        // Max over golds: the second gold matches exactly.
        let (f1, em) = record_f1_em(
            &["Kurt Zouma".into(), "Costa".into()],
            &[vec!["Zouma".into(), "Kurt Zouma".into()], vec!["Diego Costa".into()]],
        );
        assert!((f1 - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12 && (em - 0.5).abs() < 1e-12);
    }

    #[test]
    fn multirc_f1a_and_em_by_hand() {
        // Question A: answers (1,1) (0,0) → all right. Question B: (1,0) (0,0) → wrong.
        let gold = [1, 0, 1, 0];
        let pred = [1, 0, 0, 0];
        let q = [(0, 0), (0, 0), (0, 1), (0, 1)];
        let (f1a, em) = multirc_f1a_em(&gold, &pred, &q);
        // tp 1, fn 1, fp 0 → F1 2/3; EM 1 of 2 questions.
        assert!((f1a - 2.0 / 3.0).abs() < 1e-12 && (em - 0.5).abs() < 1e-12);
    }

    #[test]
    fn gender_parity_counts_agreeing_pairs() {
        assert_eq!(gender_parity(&[1, 1, 0, 1, 0, 0], &[7, 7, 8, 8, 9, 9]), 2.0 / 3.0);
    }
}
