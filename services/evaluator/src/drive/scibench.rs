//! SciBench (Wang et al., ICML 2024): textbook problems with numeric answers, graded as
//! upstream's `eval/eval_zero.py` grades them.
//!
//! * Problems: the `X.json` files of `dataset/original/` (one JSON array per textbook); the
//!   `X_sol.json` files are upstream's few-shot examples and are not test problems.
//! * Prompt: upstream's zero-shot system prompt, then `problem_text + " The unit of the answer
//!   is " + unit + "."`.
//! * Powers of ten: when `unit` holds `10^{n}` (108 problems), the factor is taken out of the
//!   unit shown to the model and multiplied into the reference (`post_process.cal_not`), and
//!   `a \times 10^{n}` in the answer is read as a number.
//! * Grading: `math.isclose(model, reference, rel_tol=0.05)` on the number in the last
//!   `\boxed{}` (else the last number); the unit is not graded. References that upstream's
//!   `float()` cannot read (4 in `diff.json`: a thousands comma, U+2212 minus) are wrong there
//!   for every model; they are kept wrong here and counted apart (`unreadable_reference`).
use super::client::{Endpoint, Sampling};
use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;
use std::sync::LazyLock;

/// Upstream's zero-shot system prompt.
pub const SYSTEM: &str = "Please provide a clear and step-by-step solution for a scientific problem in the categories of Chemistry, Physics, or Mathematics. The problem will specify the unit of measurement, which should not be included in the answer. Express the final answer as a decimal number with three digits after the decimal point. Conclude the answer by stating \"The answer is therefore \\boxed{[ANSWER]}.\"";

pub const TEMPLATE: &str = "{problem_text} The unit of the answer is {unit}.";

/// upstream's relative tolerance.
pub const REL_TOL: f64 = 0.05;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub problem_text: String,
    pub answer_number: String,
    #[serde(default)]
    pub unit: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub problemid: String,
}

/// The test problems of the named textbooks (all ten when `books` is empty), and the SHA-256
/// over the files read.
pub fn load_dir(dir: &Path, books: &[String]) -> anyhow::Result<(Vec<Problem>, String)> {
    let mut names: Vec<String> = if books.is_empty() {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .filter(|n| !n.ends_with("_sol"))
            .collect();
        v.sort();
        v
    } else {
        books.to_vec()
    };
    names.dedup();
    anyhow::ensure!(
        !names.is_empty(),
        "{}: no SciBench files (atkins.json, calculus.json, ...)",
        dir.display()
    );
    let mut all = Vec::new();
    let mut digest = String::new();
    for n in &names {
        let path = dir.join(format!("{n}.json"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        digest.push_str(&super::sha256_hex(&bytes));
        let ps: Vec<Problem> = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a SciBench problem array", path.display()))?;
        all.extend(ps);
    }
    Ok((all, super::sha256_hex(digest.as_bytes())))
}

static POWER: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"\$?\s*10\^\{?\s*(-?[0-9]+)\s*\}?\s*\$?").expect("valid regex")
});

/// A problem as asked and graded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepared {
    pub id: String,
    pub prompt: String,
    /// `answer_number` × the unit's power of ten; None when upstream's `float()` fails.
    pub reference: Option<f64>,
}

/// Python's `float()` on a reference: plain decimal or exponent notation, nothing else.
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if ok { t.parse().ok() } else { None }
}

pub fn prepare(p: &Problem) -> Prepared {
    let (unit, factor) = match POWER.captures(&p.unit) {
        Some(c) => {
            // upstream: the unit shown is what follows the (last) power of ten
            let last = POWER.find_iter(&p.unit).last().expect("one match");
            let exp: i32 = c[1].parse().unwrap_or(0);
            (p.unit[last.end()..].to_string(), 10f64.powi(exp))
        }
        None => (p.unit.clone(), 1.0),
    };
    Prepared {
        id: format!("{}/{}", p.source.trim(), p.problemid.trim()),
        prompt: TEMPLATE
            .replace("{problem_text}", &p.problem_text)
            .replace("{unit}", &unit),
        reference: py_float(&p.answer_number).map(|v| v * factor),
    }
}

/// Python's `math.isclose(a, b, rel_tol)` (abs_tol 0).
pub fn isclose(a: f64, b: f64, rel_tol: f64) -> bool {
    a == b || (a - b).abs() <= rel_tol * a.abs().max(b.abs())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub reference: Option<f64>,
    pub extracted: Option<f64>,
    pub correct: bool,
    pub output: String,
}

pub fn grade(p: &Prepared, output: &str) -> ItemResult {
    let extracted = crate::scoring::extract_number(output);
    ItemResult {
        id: p.id.clone(),
        reference: p.reference,
        extracted,
        correct: matches!((extracted, p.reference), (Some(x), Some(r)) if isclose(x, r, REL_TOL)),
        output: output.to_string(),
    }
}

/// The report's scores: accuracy, answers without a number and references upstream cannot
/// read.
pub fn scores(results: &[ItemResult]) -> serde_json::Value {
    let correct = results.iter().filter(|r| r.correct).count();
    json!({"problems": results.len(), "correct": correct,
           "accuracy": correct as f64 / results.len().max(1) as f64,
           "no_number_in_answer": results.iter().filter(|r| r.extracted.is_none()).count(),
           "unreadable_reference": results.iter().filter(|r| r.reference.is_none()).count(),
           "rel_tol": REL_TOL})
}

/// Asks every problem (system + user messages over chat, or the two joined as a completion
/// prompt) and grades the first answer.
pub async fn evaluate(
    ep: &Endpoint,
    problems: &[Prepared],
    sampling: &Sampling,
    chat: bool,
    on_done: &(dyn Fn(&ItemResult) + Send + Sync),
) -> anyhow::Result<Vec<ItemResult>> {
    let results: Vec<anyhow::Result<ItemResult>> = futures::stream::iter(problems)
        .map(|p| async move {
            let out = if chat {
                ep.chat(
                    &[
                        json!({"role": "system", "content": SYSTEM}),
                        json!({"role": "user", "content": p.prompt}),
                    ],
                    sampling,
                )
                .await?
            } else {
                ep.complete(&format!("{SYSTEM}\n\n{}\n", p.prompt), sampling)
                    .await?
            }
            .remove(0);
            let r = grade(p, &out);
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

    fn problem(answer: &str, unit: &str) -> Problem {
        Problem {
            problem_text: "How far?".into(),
            answer_number: answer.into(),
            unit: unit.into(),
            source: "fund".into(),
            problemid: " 2.3 ".into(),
        }
    }

    #[test]
    fn powers_of_ten_move_from_the_unit_into_the_reference() {
        let p = prepare(&problem("2", " $10^6$ m"));
        assert_eq!(p.reference, Some(2e6));
        assert_eq!(p.prompt, "How far? The unit of the answer is  m.");
        assert_eq!(p.id, "fund/2.3");
        let p = prepare(&problem("1.5", "$10^{-10} \\mathrm{~N}$ "));
        assert!((p.reference.unwrap() - 1.5e-10).abs() < 1e-22);
        assert!(grade(&p, "so \\boxed{1.52 \\times 10^{-10}}").correct);
        assert!(!grade(&p, "\\boxed{1.52}").correct);
    }

    #[test]
    fn upstream_tolerance_and_unreadable_references() {
        assert!(isclose(104.9, 100.0, REL_TOL));
        // math.isclose scales by the larger magnitude: 105.2 vs 100 passes, where a tolerance
        // relative to the reference alone would refuse it
        assert!(isclose(105.2, 100.0, REL_TOL));
        assert!(!crate::scoring::numbers_match(105.2, 100.0, REL_TOL));
        assert!(!isclose(94.9, 100.0, REL_TOL));
        let p = prepare(&problem("89,034.79", ""));
        assert_eq!(p.reference, None);
        assert!(!grade(&p, "\\boxed{89034.79}").correct);
        assert_eq!(prepare(&problem("−2", "")).reference, None);
        assert_eq!(
            prepare(&problem(" 50.7", "$\\mathrm{atm}$ ")).reference,
            Some(50.7)
        );
    }
}
