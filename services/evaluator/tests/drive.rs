//! The model-driving evaluations against a local server speaking the OpenAI API with the
//! payload shapes vLLM returns (`text_completion` choices with legacy `logprobs`, and
//! `chat.completion` messages). The server plays an oracle that knows the answers, or a model
//! that is always wrong, so the expected scores are known: 1.0 and 0.0.
//!
//! Fixtures: HumanEval-shaped problems (tests/fixtures/humaneval), five questions written for
//! this repository in GPQA's published CSV layout (tests/fixtures/gpqa; the real data is
//! gated), and SciBench-shaped problems built here.
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use davinci_evaluator::drive::client::{Endpoint, Sampling};
use davinci_evaluator::drive::{gpqa, humaneval, scibench};
use davinci_evaluator::humaneval::{Options, PythonEnv, Runner, load_problems};
use davinci_sandbox::LocalConfig;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

#[derive(Default)]
struct Oracle {
    wrong: bool,
    /// prompt prefix → canonical completion (HumanEval)
    code: Vec<(String, String)>,
    /// correct answers (GPQA)
    answers: Vec<String>,
    /// problem text → number (SciBench)
    numbers: Vec<(String, String)>,
    requests: Mutex<Vec<Value>>,
}

/// Whitespace-led pieces with their byte offsets, as a BPE tokenizer roughly splits.
fn pieces(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if i > start && c.is_whitespace() {
            out.push((start, &text[start..i]));
            start = i;
        }
    }
    if start < text.len() {
        out.push((start, &text[start..]));
    }
    out
}

fn apply_stop(text: &str, stop: &Value) -> String {
    let stops: Vec<&str> = match stop {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let cut = stops
        .iter()
        .filter_map(|s| text.find(s))
        .min()
        .unwrap_or(text.len());
    text[..cut].to_string()
}

impl Oracle {
    /// The letter (A-D) whose choice line holds a known correct answer.
    fn gpqa_letter(&self, prompt: &str) -> char {
        for line in prompt.lines() {
            for (k, l) in ['A', 'B', 'C', 'D'].iter().enumerate() {
                if let Some(rest) = line.strip_prefix(&format!("({l}) "))
                    && self.answers.iter().any(|a| a == rest)
                {
                    return if self.wrong {
                        ['B', 'C', 'D', 'A'][k]
                    } else {
                        *l
                    };
                }
            }
        }
        'A'
    }

    fn answer(&self, prompt: &str) -> String {
        if let Some((_, code)) = self.code.iter().find(|(p, _)| prompt.contains(p.trim())) {
            let body = if self.wrong {
                "    return None\n"
            } else {
                code
            };
            // a base model runs on past the function; the stops cut it
            return format!("{body}\n\ndef unrelated():\n    pass\n");
        }
        if let Some((_, n)) = self
            .numbers
            .iter()
            .find(|(t, _)| prompt.contains(t.as_str()))
        {
            let n = if self.wrong { "1e9" } else { n };
            return format!("Working through it... The answer is therefore \\boxed{{{n}}}.");
        }
        format!(
            "Considering each option. The answer is ({})",
            self.gpqa_letter(prompt)
        )
    }
}

async fn completions(State(o): State<Arc<Oracle>>, Json(b): Json<Value>) -> Json<Value> {
    o.requests.lock().unwrap().push(b.clone());
    let prompt = b["prompt"].as_str().unwrap().to_string();
    let n = b["n"].as_u64().unwrap_or(1) as usize;
    if b["echo"] == json!(true) {
        // loglikelihood request: the prompt's pieces, the last one " (X)" likely when X is
        // the oracle's letter.
        let letter = o.gpqa_letter(&prompt);
        let ps = pieces(&prompt);
        let lps: Vec<Value> = ps
            .iter()
            .enumerate()
            .map(|(i, (_, t))| {
                if i == 0 {
                    Value::Null
                } else if t.starts_with(" (") && i == ps.len() - 1 {
                    json!(if t.contains(letter) { -0.2 } else { -3.5 })
                } else {
                    json!(-1.25)
                }
            })
            .chain(std::iter::once(json!(-0.7)))
            .collect();
        let mut tokens: Vec<Value> = ps.iter().map(|(_, t)| json!(t)).collect();
        tokens.push(json!("\n"));
        let mut offsets: Vec<Value> = ps.iter().map(|(o, _)| json!(o)).collect();
        offsets.push(json!(prompt.len()));
        return Json(json!({
            "id": "cmpl-test", "object": "text_completion", "created": 1, "model": b["model"],
            "choices": [{"index": 0, "text": format!("{prompt}\n"), "finish_reason": "length",
                "logprobs": {"tokens": tokens, "token_logprobs": lps,
                             "top_logprobs": vec![Value::Null; ps.len() + 1], "text_offset": offsets}}],
            "usage": {"prompt_tokens": ps.len(), "completion_tokens": 1, "total_tokens": ps.len() + 1}
        }));
    }
    let text = apply_stop(&o.answer(&prompt), &b["stop"]);
    let choices: Vec<Value> = (0..n)
        .map(|i| json!({"index": i, "text": text, "logprobs": null, "finish_reason": "stop"}))
        .collect();
    Json(
        json!({"id": "cmpl-test", "object": "text_completion", "created": 1, "model": b["model"],
                "choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}),
    )
}

async fn chat(State(o): State<Arc<Oracle>>, Json(b): Json<Value>) -> Json<Value> {
    o.requests.lock().unwrap().push(b.clone());
    let prompt: String = b["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut text = o.answer(&prompt);
    if let Some((p, _)) = o.code.iter().find(|(p, _)| prompt.contains(p.trim())) {
        let body = text.split("\n\ndef unrelated").next().unwrap().to_string();
        text = format!("Here is the solution:\n```python\n{p}{body}```\n");
    }
    let n = b["n"].as_u64().unwrap_or(1) as usize;
    let choices: Vec<Value> = (0..n)
        .map(|i| json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}))
        .collect();
    Json(
        json!({"id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": b["model"],
                "choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}),
    )
}

async fn serve(o: Oracle) -> (Endpoint, Arc<Oracle>) {
    let o = Arc::new(o);
    let app = axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .with_state(o.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    // a bare host:port gets /v1
    let ep = Endpoint::new(&url, "oracle", None, 4, Duration::from_secs(30)).unwrap();
    assert_eq!(ep.base_url(), format!("{url}/v1"));
    (ep, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn humaneval_base_and_instruct_through_the_harness() {
    let problems = load_problems(&fixture("humaneval/HumanEvalFixture.jsonl")).unwrap();
    let code: Vec<(String, String)> = problems
        .iter()
        .map(|p| (p.prompt.clone(), p.canonical_solution.clone()))
        .collect();
    let runner = Runner::local(
        LocalConfig::default(),
        PythonEnv::detect("python3").unwrap(),
        Options::default(),
    )
    .unwrap();
    for (wrong, want) in [(false, 1.0), (true, 0.0)] {
        let (ep, oracle) = serve(Oracle {
            wrong,
            code: code.clone(),
            ..Default::default()
        })
        .await;
        for format in [humaneval::Format::Base, humaneval::Format::Instruct] {
            let s = Sampling {
                n: 2,
                temperature: 0.2,
                ..Default::default()
            };
            let samples = humaneval::generate(&ep, &problems, format, &s, &|_| {})
                .await
                .unwrap();
            assert_eq!(samples.len(), 2 * problems.len());
            let (_, report) = runner
                .evaluate(&problems, &samples, &[1, 2], &|_| {})
                .await
                .unwrap();
            assert_eq!(report.base["pass@1"], want, "{format:?} wrong={wrong}");
            assert_eq!(report.base["pass@2"], want);
        }
        let reqs = oracle.requests.lock().unwrap();
        let base = reqs.iter().find(|r| r.get("prompt").is_some()).unwrap();
        assert_eq!(base["stop"], json!(humaneval::BASE_STOP));
        assert_eq!(
            (base["n"].clone(), base["temperature"].clone()),
            (json!(2), json!(0.2))
        );
        let instruct = reqs.iter().find(|r| r.get("messages").is_some()).unwrap();
        assert!(
            instruct["messages"][0]["content"]
                .as_str()
                .unwrap()
                .starts_with("Please provide a self-contained Python script")
        );
    }
}

#[tokio::test]
async fn gpqa_loglikelihood_and_generative() {
    let (questions, sha) = gpqa::load_csv(&fixture("gpqa/gpqa_format.csv")).unwrap();
    assert_eq!(questions.len(), 5);
    assert_eq!(sha.len(), 64);
    assert!(
        questions[0].question.contains('\n'),
        "quoted multi-line fields are read"
    );
    let items: Vec<gpqa::Item> = questions.iter().map(|q| gpqa::shuffle(q, 1234)).collect();
    let golds: std::collections::BTreeSet<usize> = items.iter().map(|i| i.gold).collect();
    assert!(golds.len() > 1, "the shuffle moves the correct answer");
    let answers: Vec<String> = items.iter().map(|i| i.choices[i.gold].clone()).collect();
    for (wrong, want) in [(false, 5), (true, 0)] {
        let (ep, _) = serve(Oracle {
            wrong,
            answers: answers.clone(),
            ..Default::default()
        })
        .await;
        let s = Sampling::default();
        for mode in [gpqa::Mode::Loglikelihood, gpqa::Mode::Generative] {
            for chat in [false, true] {
                let r = gpqa::evaluate(&ep, &items, mode, &s, chat, &|_| {})
                    .await
                    .unwrap();
                let correct = r.iter().filter(|x| x.correct).count();
                assert_eq!(correct, want, "{mode:?} chat={chat} wrong={wrong}");
                if mode == gpqa::Mode::Loglikelihood {
                    assert_eq!(r[0].loglikelihoods.len(), 4);
                }
            }
        }
    }
}

#[tokio::test]
async fn scibench_with_upstream_grading() {
    let dir = tempfile::tempdir().unwrap();
    let problems = json!([
        {"problem_text": "Find the speed of the cart.", "answer_number": "12.5", "unit": " $\\mathrm{m/s}$ ", "source": "fund", "problemid": " 1.1 ", "comment": " "},
        {"problem_text": "Find the force on the wire.", "answer_number": "3.2", "unit": " $10^{-3}$ N", "source": "fund", "problemid": " 1.2 ", "comment": " "},
        {"problem_text": "Evaluate the integral.", "answer_number": "89,034.79", "unit": " ", "source": "fund", "problemid": " 1.3 ", "comment": " "}
    ]);
    std::fs::write(dir.path().join("fund.json"), problems.to_string()).unwrap();
    std::fs::write(dir.path().join("fund_sol.json"), "[]").unwrap();
    let (ps, _) = scibench::load_dir(dir.path(), &[]).unwrap();
    assert_eq!(ps.len(), 3, "the _sol file is no test set");
    let prepared: Vec<scibench::Prepared> = ps.iter().map(scibench::prepare).collect();
    let numbers = vec![
        ("Find the speed".to_string(), "12.61".to_string()),
        (
            "Find the force".to_string(),
            "3.1 \\times 10^{-3}".to_string(),
        ),
        ("Evaluate the integral".to_string(), "89034.79".to_string()),
    ];
    for (wrong, want) in [(false, 2), (true, 0)] {
        let (ep, oracle) = serve(Oracle {
            wrong,
            numbers: numbers.clone(),
            ..Default::default()
        })
        .await;
        let r = scibench::evaluate(&ep, &prepared, &Sampling::default(), true, &|_| {})
            .await
            .unwrap();
        assert_eq!(r.iter().filter(|x| x.correct).count(), want);
        assert!(
            !r[2].correct,
            "an unreadable reference is wrong, as upstream"
        );
        let reqs = oracle.requests.lock().unwrap();
        assert!(reqs.iter().any(|q| q["messages"][1]["content"]
            == "Find the force on the wire. The unit of the answer is  N."));
    }
}

/// Runs one job of the Evaluator service to its end.
async fn job(
    svc: &davinci_evaluator::serve::EvaluatorService,
    spec: davinci_proto::v1::EvalSpec,
) -> davinci_proto::v1::Job {
    use davinci_proto::v1::evaluator_server::Evaluator;
    use futures::StreamExt;
    let j = svc
        .start_eval(tonic::Request::new(davinci_proto::v1::StartEvalRequest {
            run_id: String::new(),
            spec: Some(spec),
        }))
        .await
        .unwrap()
        .into_inner();
    let r = || davinci_proto::v1::JobRef {
        job_id: j.job_id.clone(),
    };
    let mut events = svc
        .watch_eval(tonic::Request::new(r()))
        .await
        .unwrap()
        .into_inner();
    while events.next().await.is_some() {}
    svc.get_eval(tonic::Request::new(r()))
        .await
        .unwrap()
        .into_inner()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The Evaluator service drives the endpoint itself when a spec names `model_url`: HumanEval
/// samples are generated and graded, GPQA and SciBench scored, each report with provenance;
/// the oracle scores 1.0 and the wrong model 0.0. Specs that cannot run are refused by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_jobs_drive_the_endpoint() {
    use davinci_evaluator::serve::{EvaluatorService, ServeConfig};
    use davinci_proto::v1::evaluator_server::Evaluator;
    use davinci_proto::v1::{EvalSpec, JobState};
    let problems = load_problems(&fixture("humaneval/HumanEvalFixture.jsonl")).unwrap();
    let code: Vec<(String, String)> = problems
        .iter()
        .map(|p| (p.prompt.clone(), p.canonical_solution.clone()))
        .collect();
    let (questions, _) = gpqa::load_csv(&fixture("gpqa/gpqa_format.csv")).unwrap();
    let answers: Vec<String> = questions
        .iter()
        .map(|q| gpqa::shuffle(q, 7))
        .map(|i| i.choices[i.gold].clone())
        .collect();
    let sci = tempfile::tempdir().unwrap();
    std::fs::write(
        sci.path().join("fund.json"),
        json!([{"problem_text": "Find the speed of the cart.", "answer_number": "12.5",
                "unit": " m/s ", "source": "fund", "problemid": " 1.1 ", "comment": " "}])
        .to_string(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let svc = EvaluatorService::new(
        davinci_runtime::jobs::JobRegistry::in_memory().await,
        ServeConfig::default(),
    );
    for (wrong, want) in [(false, 1.0), (true, 0.0)] {
        let (ep, oracle) = serve(Oracle {
            wrong,
            code: code.clone(),
            answers: answers.clone(),
            numbers: vec![("Find the speed".into(), "12.5".into())],
            ..Default::default()
        })
        .await;
        let out = |b: &str| tmp.path().join(format!("{wrong}/{b}"));
        let base = EvalSpec {
            model_url: ep.base_url().to_string(),
            model: "oracle".into(),
            seed: Some(7),
            max_tokens: 100,
            concurrency: 2,
            ..Default::default()
        };
        let he = job(
            &svc,
            EvalSpec {
                benchmark: "humaneval".into(),
                problems: fixture("humaneval/HumanEvalFixture.jsonl")
                    .display()
                    .to_string(),
                out: out("humaneval").display().to_string(),
                format: "instruct".into(),
                ..base.clone()
            },
        )
        .await;
        assert_eq!(he.state, JobState::Succeeded as i32, "{he:?}");
        assert_eq!(he.counters.get("generated"), Some(&3));
        let r = read_json(&out("humaneval").join("report.json"));
        assert_eq!(r["scores"]["base"]["pass@1"], want, "wrong={wrong}");
        assert_eq!(r["provenance"]["model"], "oracle");
        assert_eq!(r["provenance"]["endpoint"], ep.base_url());
        assert_eq!(r["provenance"]["sampling"]["max_tokens"], 100);
        assert_eq!(
            std::fs::read_to_string(out("humaneval").join("samples.jsonl"))
                .unwrap()
                .lines()
                .count(),
            3
        );
        for (bench, data) in [
            ("gpqa", fixture("gpqa/gpqa_format.csv")),
            ("scibench", sci.path().to_path_buf()),
        ] {
            let j = job(
                &svc,
                EvalSpec {
                    benchmark: bench.into(),
                    problems: data.display().to_string(),
                    out: out(bench).display().to_string(),
                    chat: bench == "scibench",
                    ..base.clone()
                },
            )
            .await;
            assert_eq!(j.state, JobState::Succeeded as i32, "{j:?}");
            let r = read_json(&out(bench).join("report.json"));
            assert_eq!(r["scores"]["accuracy"], want, "{bench} wrong={wrong}");
            assert_eq!(r["provenance"]["seed"], 7);
            assert_eq!(r["provenance"]["data_sha256"].as_str().unwrap().len(), 64);
        }
        // GPQA went by loglikelihood (echo), SciBench by chat.
        let reqs = oracle.requests.lock().unwrap();
        assert!(reqs.iter().any(|q| q["echo"] == json!(true)));
        assert!(
            reqs.iter()
                .any(|q| q["messages"][0]["role"] == "system" && q["seed"] == 7)
        );
    }

    let refused = |spec: EvalSpec| {
        let svc = &svc;
        async move {
            svc.start_eval(tonic::Request::new(davinci_proto::v1::StartEvalRequest {
                run_id: String::new(),
                spec: Some(spec),
            }))
            .await
            .unwrap_err()
            .message()
            .to_string()
        }
    };
    let ok = EvalSpec {
        benchmark: "gpqa".into(),
        problems: "/data/gpqa.csv".into(),
        out: "/tmp/x".into(),
        model_url: "http://127.0.0.1:1/v1".into(),
        model: "m".into(),
        ..Default::default()
    };
    for (spec, field) in [
        (
            EvalSpec {
                model_url: String::new(),
                ..ok.clone()
            },
            "spec.model_url",
        ),
        (
            EvalSpec {
                model: String::new(),
                ..ok.clone()
            },
            "spec.model",
        ),
        (
            EvalSpec {
                format: "chat".into(),
                ..ok.clone()
            },
            "spec.format",
        ),
        (
            EvalSpec {
                temperature: 5.0,
                ..ok.clone()
            },
            "spec.temperature",
        ),
        (
            EvalSpec {
                benchmark: "humaneval".into(),
                samples: "/s.jsonl".into(),
                ..ok.clone()
            },
            "spec.samples",
        ),
        (
            EvalSpec {
                benchmark: "swe-bench".into(),
                ..ok.clone()
            },
            "spec.model_url",
        ),
    ] {
        let m = refused(spec).await;
        assert!(m.starts_with(field), "{field}: {m}");
    }
}
