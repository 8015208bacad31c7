//! Tool calling against a local server speaking vLLM's wire format (davinci-testkit's
//! `FakeVllm`): structured calls plain and streamed (SSE, arguments in fragments), a call left
//! in the text as Hermes, malformed arguments passed through for the caller to refuse, 429 and
//! 500 retried, and vLLM's context-length 400 recognised.
use davinci_llm::*;
use davinci_testkit::vllm::{FakeVllm, Reply};
use serde_json::{Value, json};

fn client(base: &str, stream: bool) -> ChatClient {
    ChatClient::new(ChatConfig {
        base_url: base.to_string(),
        model: "Qwen/Qwen2.5-Coder-32B-Instruct".into(),
        api_key_env: "DAVINCI_LLM_TEST_KEY".into(),
        timeout_secs: 5.0,
        max_retries: 3,
        backoff_initial_ms: 1,
        backoff_max_ms: 5,
        temperature: 0.6,
        top_p: Some(0.9),
        seed: Some(42),
        max_tokens: 128,
        stream,
        ..ChatConfig::default()
    })
    .unwrap()
}

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "bash", "description": "run",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
        "required": ["command"]}}}),
    ]
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: Some(text.into()),
        tool_calls: vec![],
        tool_call_id: None,
        name: None,
    }]
}

#[tokio::test]
async fn structured_calls_plain_and_streamed() {
    let args = r#"{"command": "grep -rn \"def shout\" /testbed | head -n 5"}"#;
    for stream in [false, true] {
        let reply = Reply::Calls {
            content: Some("Let me search ✓.".into()),
            calls: vec![("bash".to_string(), args.to_string())],
        };
        let server = FakeVllm::start("Qwen/Qwen2.5-Coder-32B-Instruct", 32_768, vec![reply]).await;
        let c = client(&server.base_url, stream);
        let t = c
            .complete_tools(&c.tool_request(user("find shout"), tools()))
            .await
            .unwrap();
        assert_eq!(t.source, Some(CallSource::Api), "stream={stream}");
        assert_eq!(t.tool_calls.len(), 1);
        assert_eq!(t.tool_calls[0].function.name, "bash");
        assert_eq!(t.tool_calls[0].function.arguments, args);
        assert!(t.tool_calls[0].id.starts_with("chatcmpl-tool-"));
        assert_eq!(t.finish_reason.as_deref(), Some("tool_calls"));
        assert!(
            t.usage.as_ref().unwrap().prompt_tokens > 0,
            "usage arrives in the last chunk"
        );
        assert_eq!(t.content.as_deref(), Some("Let me search ✓."));
        let req = &server.requests()[0];
        assert_eq!(req["stream"], stream);
        assert_eq!(req["seed"], 42);
        assert_eq!(req["top_p"].as_f64().unwrap() as f32, 0.9);
        assert_eq!(req["tool_choice"], "auto");
        assert_eq!(req["tools"][0]["function"]["name"], "bash");
        if stream {
            assert_eq!(req["stream_options"]["include_usage"], true);
        }
    }
}

#[tokio::test]
async fn text_calls_malformed_arguments_and_finish_reason_ignored() {
    let server = FakeVllm::start(
        "m",
        32_768,
        vec![
            // vLLM with the wrong parser: the call stays in the text, finish_reason "stop".
            Reply::Text("I'll run it.\n<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call>".into()),
            Reply::Text("<tool_call>bash\n<arg_key>command</arg_key>\n<arg_value>ls -la</arg_value>\n</tool_call>".into()),
            Reply::Calls { content: None, calls: vec![("bash".into(), "{\"command\": \"ls".into())] },
            Reply::Text("Just text, no call.".into()),
        ],
    )
    .await;
    let c = client(&server.base_url, false);
    let req = c.tool_request(user("x"), tools());
    let t = c.complete_tools(&req).await.unwrap();
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
    assert_eq!(t.source, Some(CallSource::HermesText));
    assert_eq!(t.tool_calls[0].function.arguments, r#"{"command":"ls"}"#);
    assert_eq!(t.content.as_deref(), Some("I'll run it."));
    assert!(t.raw_content.unwrap().contains("<tool_call>"));
    let t = c.complete_tools(&req).await.unwrap();
    assert_eq!(t.source, Some(CallSource::Glm45Text));
    assert_eq!(
        t.tool_calls[0].function.arguments,
        r#"{"command":"ls -la"}"#
    );
    // Broken JSON is passed on as produced: the caller decides (and tells the model).
    let t = c.complete_tools(&req).await.unwrap();
    assert_eq!(t.tool_calls[0].function.arguments, "{\"command\": \"ls");
    let t = c.complete_tools(&req).await.unwrap();
    assert!(t.tool_calls.is_empty() && t.source.is_none());
    assert_eq!(t.content.as_deref(), Some("Just text, no call."));
}

#[tokio::test]
async fn retries_and_context_overflow() {
    let server = FakeVllm::start(
        "m",
        2_000,
        vec![
            Reply::Status(429),
            Reply::Status(500),
            Reply::call("bash", json!({"command": "ls"})),
        ],
    )
    .await;
    let c = client(&server.base_url, true);
    let t = c
        .complete_tools(&c.tool_request(user("x"), tools()))
        .await
        .unwrap();
    assert_eq!(t.attempts, 3);
    assert_eq!(t.tool_calls[0].function.name, "bash");
    let e = c
        .complete_tools(&c.tool_request(user(&"long text ".repeat(2_000)), tools()))
        .await
        .unwrap_err();
    assert!(e.is_context_overflow(), "{e}");
    assert!(
        matches!(
            e,
            LlmError::Status {
                status: 400,
                attempts: 1,
                ..
            }
        ),
        "not retried: {e}"
    );

    let server = FakeVllm::start("m", 32_768, vec![Reply::Status(503); 10]).await;
    let e = client(&server.base_url, false)
        .complete_tools(&c.tool_request(user("x"), tools()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            LlmError::Status {
                status: 503,
                attempts: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_context_overflow());
}
