//! The server over real HTTP on a real checkpoint directory.
//!
//! The checkpoint is built here so that greedy output is known: a one-layer Qwen2 whose
//! embeddings are random codes and whose LM head maps each token's code to a chosen successor
//! (small random attention and MLP weights perturb the stream without changing the argmax). Its
//! tokenizer is the committed Qwen-shaped BPE fixture plus one added token holding a whole
//! tool-call body, so after `<|im_start|>assistant\n` the model writes
//! `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>`.
use davinci_inference::{ServeConfig, load, serve};
use davinci_model::checkpoint::{load_hf, save_hf};
use davinci_model::generate::log_softmax;
use davinci_model::rng::SplitMix64;
use davinci_model::{Batch, Device, Precision, Qwen2, Qwen2Config, Row, SamplingParams, Tensor};
use davinci_tokenize::Tokenizer;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const CALL_BODY: &str = "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n";
const VOCAB: usize = 1536;
const HIDDEN: usize = 256;

fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("metrics recorder")
    })
}

fn tokenizer_json() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let next = v["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    v["added_tokens"].as_array_mut().unwrap().push(json!({
        "id": next, "content": CALL_BODY, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": false
    }));
    v.to_string()
}

/// Writes the checkpoint and returns its directory.
fn checkpoint(root: &Path) -> PathBuf {
    let dir = root.join("bigram-qwen2");
    std::fs::create_dir_all(&dir).unwrap();
    let tok_json = tokenizer_json();
    std::fs::write(dir.join("tokenizer.json"), &tok_json).unwrap();
    let tok = Tokenizer::from_bytes(tok_json.as_bytes()).unwrap();
    let id = |s: &str| tok.token_to_id(s).unwrap();
    let after_prompt = *tok
        .encode("<|im_start|>assistant\n")
        .unwrap()
        .last()
        .unwrap();
    let (open, close, end, body) = (
        id("<tool_call>"),
        id("</tool_call>"),
        id("<|im_end|>"),
        id(CALL_BODY),
    );
    let base = 1500;
    let succ = |t: u32| -> u32 {
        match t {
            t if t == after_prompt => open,
            t if t == open => body,
            t if t == body => close,
            t if t == close => end,
            t if (t as usize) < base => (t * 37 + 11) % base as u32,
            t => t % base as u32,
        }
    };
    let config: Qwen2Config = serde_json::from_value(json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "eos_token_id": id("<|endoftext|>")
    }))
    .unwrap();
    let mut rng = SplitMix64::new(17);
    let mut tensors = HashMap::new();
    let mut codes = vec![0f32; VOCAB * HIDDEN];
    codes.iter_mut().for_each(|x| *x = rng.normal() as f32);
    let mut head = vec![0f32; VOCAB * HIDDEN];
    for t in 0..VOCAB {
        let row = &codes[t * HIDDEN..(t + 1) * HIDDEN];
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        let s = succ(t as u32) as usize;
        for k in 0..HIDDEN {
            head[s * HIDDEN + k] += row[k] / norm;
        }
    }
    for (name, shape) in config.parameter_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name == "model.embed_tokens.weight" {
            codes.clone()
        } else if name == "lm_head.weight" {
            head.clone()
        } else if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| 0.02 * rng.normal() as f32).collect()
        };
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }
    let model = Qwen2::from_tensors(config, tensors, &Device::Cpu, Precision::F32, "test").unwrap();
    save_hf(&model, &dir).unwrap();
    dir
}

struct Served {
    url: String,
    dir: PathBuf,
    _root: tempfile::TempDir,
}

async fn start(max_batch: usize) -> Served {
    metrics();
    let root = tempfile::tempdir().unwrap();
    let dir = checkpoint(root.path());
    let state = load(&ServeConfig {
        model_dir: dir.clone(),
        name: Some("tiny".into()),
        max_batch,
        max_model_len: None,
        tokenizer: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, state, std::future::pending()));
    Served {
        url,
        dir,
        _root: root,
    }
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// `data:` payloads of an SSE body, up to `[DONE]` (which must come last).
async fn sse(url: &str, path: &str, body: Value) -> Vec<Value> {
    let text = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn served_logits_equal_the_forward_pass() {
    let s = start(4).await;
    let tok = Tokenizer::from_file(s.dir.join("tokenizer.json")).unwrap();
    let prompt = "def add(a, b):\n    return a + b\n";
    let ids = tok.encode(prompt).unwrap();
    let (status, r) = post(
        &s.url,
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], prompt);
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), ids.len());
    assert!(lp["token_logprobs"][0].is_null());

    // The training forward on the same checkpoint.
    let model = load_hf(&s.dir, &Device::Cpu, Precision::F32).unwrap();
    let batch = Batch::from_rows(&[Row {
        tokens: ids.clone(),
        mask: vec![1; ids.len()],
        doc_lens: vec![ids.len()],
    }])
    .unwrap();
    let logits: Vec<Vec<f32>> = model.forward(&batch).unwrap().to_vec2().unwrap();
    let mut worst = 0f32;
    for i in 1..ids.len() {
        let want = log_softmax(&logits[i - 1]);
        let got = lp["token_logprobs"][i].as_f64().unwrap() as f32;
        worst = worst.max((got - want[ids[i] as usize]).abs());
        // the best alternative is the forward's argmax, with its log-probability
        let top = lp["top_logprobs"][i].as_object().unwrap();
        // keyed by text: ids that decode alike (byte pieces) share one entry
        assert!((1..=3).contains(&top.len()));
        let best = davinci_model::generate::argmax(&logits[i - 1]);
        let best_text = tok.decode(&[best]).unwrap();
        let served = top[&best_text].as_f64().unwrap() as f32;
        worst = worst.max((served - want[best as usize]).abs());
    }
    eprintln!("served vs forward log-probabilities: max |diff| {worst:.2e}");
    assert!(worst < 1e-4, "served log-probabilities differ by {worst}");
}

#[tokio::test]
async fn greedy_streaming_seeds_and_stops() {
    let s = start(4).await;
    let tok = Tokenizer::from_file(s.dir.join("tokenizer.json")).unwrap();
    let model = load_hf(&s.dir, &Device::Cpu, Precision::F32).unwrap();
    let prompt = "import os\n";
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let want = model
        .generate(
            &[tok.encode(prompt).unwrap()],
            12,
            &[eos],
            &SamplingParams::default(),
        )
        .unwrap();
    let want_text = tok.decode(&want[0]).unwrap();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0});
    let (status, r) = post(&s.url, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], want_text.as_str());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 12);

    let mut streamed = String::new();
    let mut finish = Value::Null;
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    for c in sse(&s.url, "/v1/completions", stream_body).await {
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
        if !c["choices"][0]["finish_reason"].is_null() {
            finish = c["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(streamed, want_text);
    assert_eq!(finish, "length");

    // A stop sequence from the middle of the greedy text: the text ends before it.
    let chars: Vec<char> = want_text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &want_text[..want_text.find(&stop).unwrap()];
    let (_, r) = post(
        &s.url,
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]}),
    )
    .await;
    assert_eq!(r["choices"][0]["text"], cut, "stop {stop:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let mut streamed = String::new();
    for c in sse(
        &s.url,
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": stop, "stream": true}),
    )
    .await
    {
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, cut, "streamed text holds back a possible stop");

    // Sampling: the seed repeats, the n choices differ from one another.
    let sampled = json!({"model": "tiny", "prompt": prompt, "max_tokens": 10,
                         "temperature": 2.0, "seed": 7, "n": 3});
    let (_, a) = post(&s.url, "/v1/completions", sampled.clone()).await;
    let (_, b) = post(&s.url, "/v1/completions", sampled).await;
    let texts = |r: &Value| -> Vec<String> {
        r["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(texts(&a).len(), 3);
    assert!(texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2]);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_lives() {
    let s = start(2).await;
    let client = reqwest::Client::new();
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        (
            "/v1/completions",
            json!({"model": "gpt-9", "prompt": "x"}),
            404,
            "model",
            Some("model_not_found"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "a ".repeat(600), "max_tokens": 4}),
            400,
            "prompt",
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 600}),
            400,
            "prompt",
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [5, 99999]}),
            400,
            "prompt",
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "temperature": "hot"}),
            400,
            "temperature",
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "n": 0}),
            400,
            "n",
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": []}),
            400,
            "messages",
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "messages[0].role",
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            400,
            "tools[0].function",
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]}),
            400,
            "tools[0].function.parameters",
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}),
            400,
            "tool_choice",
            None,
        ),
    ];
    for (path, body, status, param, code) in cases {
        let (got, r) = post(&s.url, path, body.clone()).await;
        assert_eq!(got, status, "{body} -> {r}");
        assert_eq!(r["error"]["type"], "invalid_request_error");
        assert_eq!(r["error"]["param"], param, "{r}");
        assert!(r["error"]["message"].as_str().unwrap().len() > 10);
        if let Some(c) = code {
            assert_eq!(r["error"]["code"], c);
        }
    }
    let r = client
        .post(format!("{}/v1/chat/completions", s.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let r = client
        .get(format!("{}/v2/engines", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unknown_url");
    // still serving
    let (status, _) = post(
        &s.url,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "ok", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn concurrent_requests_are_batched_with_the_same_results() {
    let s = start(8).await;
    let prompts: Vec<String> = (0..8).map(|i| format!("value_{i} = {i}\n")).collect();
    let body = |p: &str| json!({"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0});
    let mut alone = Vec::new();
    for p in &prompts {
        let (_, r) = post(&s.url, "/v1/completions", body(p)).await;
        alone.push(r["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let before = metric_sum_count("davinci_inference_batch_size");
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, b) = (s.url.clone(), body(p));
            tokio::spawn(async move { post(&url, "/v1/completions", b).await })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        let (status, r) = t.await.unwrap();
        assert_eq!(status, 200);
        together.push(r["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(together, alone, "batched decoding changes no result");
    let after = metric_sum_count("davinci_inference_batch_size");
    let (sum, count) = (after.0 - before.0, after.1 - before.1);
    eprintln!("concurrent: {count} steps for {sum} sequence-steps");
    assert!(
        sum / count > 1.5,
        "requests were not batched: mean batch {}",
        sum / count
    );
    let text = metrics().render();
    for m in [
        "davinci_inference_time_to_first_token_seconds",
        "davinci_inference_queue_depth",
        "davinci_inference_generation_tokens_per_second",
        "davinci_inference_generation_tokens_total",
        "davinci_inference_requests_total",
    ] {
        assert!(text.contains(m), "{m} missing from /metrics");
    }
}

/// (sum, count) of a summary in the Prometheus text (all test servers share one recorder).
fn metric_sum_count(name: &str) -> (f64, f64) {
    let text = metrics().render();
    let get = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{suffix} ")))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    (get("_sum"), get("_count"))
}

#[tokio::test]
async fn chat_with_tools_returns_tool_calls() {
    let s = start(2).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let (status, r) = post(
        &s.url,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Paris?"}],
               "tools": tools, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert!(c["message"]["content"].is_null());
    assert_eq!(
        c["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        c["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    // <tool_call>, the body, </tool_call>, and <|im_end|>, which ends the turn
    assert_eq!(r["usage"]["completion_tokens"], 4);
}

/// The Python interpreter of the venv `make test-deps` builds (or `DAVINCI_TEST_PYTHON`), if
/// it can import `openai`.
fn python_with_openai() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DAVINCI_TEST_PYTHON").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")),
    ];
    candidates.into_iter().flatten().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test]
async fn openai_python_client_parses_every_response() {
    let Some(python) = python_with_openai() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but no Python with the openai package: run `make test-deps`"
        );
        eprintln!(
            "SKIP openai_python_client_parses_every_response: no Python with the openai package (run `make test-deps` or set DAVINCI_TEST_PYTHON)"
        );
        return;
    };
    let s = start(4).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("{}/v1", s.url))
        .arg("tiny")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.starts_with("OK "),
        "the OpenAI client failed"
    );
}
