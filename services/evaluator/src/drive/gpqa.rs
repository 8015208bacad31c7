//! GPQA (Rein et al. 2023) from its published CSV (`gpqa_main.csv`, `gpqa_diamond.csv`, ...;
//! the columns read are `Question`, `Correct Answer`, `Incorrect Answer 1..3`).
//!
//! The four answers of each question are ordered by SHA-256 of (seed, row, answer text): a
//! fixed shuffle that needs no random generator whose sequence could change with a library
//! version. The text is cleaned as lm-eval's `gpqa` task does (`preprocess`), and the prompt is
//! its zero-shot one.
//!
//! * loglikelihood: the choice `(A)`..`(D)` whose continuation after `Answer:` is most likely
//!   (lm-eval's `gpqa_main_zeroshot`), through `/completions` with `echo` and `logprobs`;
//! * generative: the model is asked to end with "The answer is (X)", and the letter is read
//!   by [`crate::scoring::extract_choice`].
use super::client::{Endpoint, Sampling};
use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;

pub const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

/// lm-eval's zero-shot GPQA prompt.
pub const TEMPLATE: &str = "What is the correct answer to this question:{question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\nAnswer:";

/// Appended for generative scoring.
pub const GENERATIVE_SUFFIX: &str = "\nThink step by step, then finish with \"The answer is (X)\" where X is the letter of the correct choice.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// Row number in the CSV (from 0), the question's id.
    pub row: usize,
    pub question: String,
    pub correct: String,
    pub incorrect: [String; 3],
}

/// Reads the published CSV; a missing column is an error naming it.
pub fn load_csv(path: &Path) -> anyhow::Result<(Vec<Question>, String)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sha = super::sha256_hex(&bytes);
    let mut r = csv::Reader::from_reader(bytes.as_slice());
    let headers = r
        .headers()
        .with_context(|| format!("{}: no CSV header", path.display()))?
        .clone();
    let col = |name: &str| {
        headers.iter().position(|h| h.trim() == name).with_context(|| {
            format!(
                "{}: no `{name}` column (GPQA's CSV has Question, Correct Answer, Incorrect Answer 1-3)",
                path.display()
            )
        })
    };
    let (q, c, i1, i2, i3) = (
        col("Question")?,
        col("Correct Answer")?,
        col("Incorrect Answer 1")?,
        col("Incorrect Answer 2")?,
        col("Incorrect Answer 3")?,
    );
    let mut out = Vec::new();
    for (row, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {row}", path.display()))?;
        let get = |i: usize| rec.get(i).unwrap_or_default().to_string();
        out.push(Question {
            row,
            question: get(q),
            correct: get(c),
            incorrect: [get(i1), get(i2), get(i3)],
        });
    }
    anyhow::ensure!(!out.is_empty(), "{}: no questions", path.display());
    Ok((out, sha))
}

/// lm-eval's `preprocess`: trim, ` [title]` → `. `, drop `[...]`, collapse double spaces.
pub fn preprocess(text: &str) -> String {
    static BRACKETS: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"\[.*?\]").expect("valid regex"));
    let t = text.trim().replace(" [title]", ". ");
    BRACKETS.replace_all(&t, "").replace("  ", " ")
}

/// A question with its answers in the shuffled order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub row: usize,
    pub question: String,
    pub choices: Vec<String>,
    /// Index of the correct answer in `choices`.
    pub gold: usize,
}

pub fn shuffle(q: &Question, seed: u64) -> Item {
    let mut answers: Vec<(String, bool)> = std::iter::once((preprocess(&q.correct), true))
        .chain(q.incorrect.iter().map(|a| (preprocess(a), false)))
        .collect();
    answers.sort_by_cached_key(|(a, _)| {
        super::sha256_hex(format!("{seed}\0{}\0{a}", q.row).as_bytes())
    });
    Item {
        row: q.row,
        question: preprocess(&q.question),
        gold: answers
            .iter()
            .position(|a| a.1)
            .expect("the correct answer is there"),
        choices: answers.into_iter().map(|a| a.0).collect(),
    }
}

pub fn prompt(item: &Item) -> String {
    let mut p = TEMPLATE.replace("{question}", &item.question);
    for (l, c) in LETTERS.iter().zip(&item.choices) {
        p = p.replace(&format!("{{{l}}}"), c);
    }
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Loglikelihood,
    Generative,
}

/// One graded question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub row: usize,
    pub gold: char,
    /// The chosen letter (None: no letter could be read from the output).
    pub pred: Option<char>,
    pub correct: bool,
    /// Loglikelihood of each choice's continuation (loglikelihood mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loglikelihoods: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// The prompt template of `mode`, as its provenance hashes it.
pub fn template(mode: Mode) -> String {
    match mode {
        Mode::Loglikelihood => TEMPLATE.to_string(),
        Mode::Generative => format!("{TEMPLATE}{GENERATIVE_SUFFIX}"),
    }
}

/// The report's scores: accuracy, and the answers without a readable letter.
pub fn scores(results: &[ItemResult], mode: Mode) -> serde_json::Value {
    let correct = results.iter().filter(|r| r.correct).count();
    let unparsed = results.iter().filter(|r| r.pred.is_none()).count();
    json!({"mode": format!("{mode:?}").to_lowercase(), "questions": results.len(),
           "correct": correct, "unparsed": unparsed,
           "accuracy": correct as f64 / results.len().max(1) as f64})
}

/// Grades every item; `chat` sends generative prompts as a user message instead of a raw
/// completion prompt.
pub async fn evaluate(
    ep: &Endpoint,
    items: &[Item],
    mode: Mode,
    sampling: &Sampling,
    chat: bool,
    on_done: &(dyn Fn(&ItemResult) + Send + Sync),
) -> anyhow::Result<Vec<ItemResult>> {
    let results: Vec<anyhow::Result<ItemResult>> = futures::stream::iter(items)
        .map(|it| async move {
            let p = prompt(it);
            let gold = LETTERS[it.gold];
            let r = match mode {
                Mode::Loglikelihood => {
                    let mut lls = Vec::with_capacity(4);
                    for l in LETTERS {
                        lls.push(ep.loglikelihood(&p, &format!(" ({l})")).await?);
                    }
                    let best = (0..lls.len())
                        .max_by(|&a, &b| lls[a].total_cmp(&lls[b]).then(b.cmp(&a)))
                        .expect("four choices");
                    ItemResult {
                        row: it.row,
                        gold,
                        pred: Some(LETTERS[best]),
                        correct: best == it.gold,
                        loglikelihoods: lls,
                        output: None,
                    }
                }
                Mode::Generative => {
                    let text = format!("{p}{GENERATIVE_SUFFIX}");
                    let out = if chat {
                        ep.chat(&[json!({"role": "user", "content": text})], sampling)
                            .await?
                    } else {
                        ep.complete(&text, sampling).await?
                    }
                    .remove(0);
                    let pred = crate::scoring::extract_choice(&out, 4);
                    ItemResult {
                        row: it.row,
                        gold,
                        pred,
                        correct: pred == Some(gold),
                        loglikelihoods: Vec::new(),
                        output: Some(out),
                    }
                }
            };
            on_done(&r);
            Ok(r)
        })
        .buffered(ep.concurrency())
        .collect()
        .await;
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_fixed_by_the_seed_and_keeps_the_answer() {
        let q = Question {
            row: 3,
            question: "Which is heavier? [a note] ".into(),
            correct: "lead".into(),
            incorrect: ["air".into(), "water".into(), "foam".into()],
        };
        let a = shuffle(&q, 0);
        assert_eq!(a, shuffle(&q, 0));
        assert_eq!(a.choices[a.gold], "lead");
        // as lm-eval: the bracket goes, the space before it stays
        assert_eq!(a.question, "Which is heavier? ");
        let golds: std::collections::BTreeSet<usize> =
            (0..16).map(|s| shuffle(&q, s).gold).collect();
        assert!(golds.len() > 1, "the seed moves the answer");
        let p = prompt(&a);
        assert!(p.starts_with(
            "What is the correct answer to this question:Which is heavier? \nChoices:\n(A) "
        ));
        assert!(p.ends_with("\nAnswer:"));
    }
}
