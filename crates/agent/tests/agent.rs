//! The agent end to end on a fixture task in the local (bubblewrap) sandbox: the replay policy
//! resolves it, a policy that submits nothing fails it, and a model behind a local server
//! speaking vLLM's wire format drives it through every way a turn can go (tool calls plain and
//! streamed, a call written as Hermes text, malformed arguments, 429 / 500, a conversation
//! past the context limit, an endpoint that stays down), each ending with the right exit
//! status. Needs bwrap, git and python3.
use davinci_agent::{Agent, AgentConfig, AgentError, NullPolicy, OpenAiPolicy, ReplayPolicy};
use davinci_core::task::TaskInstance;
use davinci_core::traj::Trajectory;
use davinci_llm::{ChatClient, ChatConfig};
use davinci_sandbox::{BwrapSandbox, LocalConfig};
use davinci_swebench::{Harness, HarnessConfig};
use davinci_testkit::vllm::{FakeVllm, Reply};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    task: TaskInstance,
    agent: Agent,
}

fn fixture(cfg: AgentConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repos = dir.path().join("repos");
    let task = davinci_testkit::tasks::textkit_task(&repos, 2).unwrap();
    let sandbox = BwrapSandbox::new(LocalConfig {
        mount_point: "/testbed".into(),
        ..Default::default()
    })
    .unwrap();
    let harness = Harness::new(
        Arc::new(sandbox),
        HarnessConfig {
            out_dir: dir.path().join("unused"),
            repos_dir: Some(repos),
            setup_timeout: Duration::from_secs(60),
            test_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    );
    Fixture {
        _dir: dir,
        task,
        agent: Agent::new(Arc::new(harness), cfg),
    }
}

fn tool_outputs(t: &Trajectory) -> Vec<String> {
    t.messages
        .iter()
        .filter(|m| m.role == "tool")
        .map(|m| m.content.clone().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_passes_and_submitting_nothing_fails() {
    let f = fixture(AgentConfig::default());
    let mut replay = ReplayPolicy::new(&f.task, "/testbed");
    let t = f.agent.run(&f.task, &mut replay, 0).await.unwrap();
    assert!(t.outcome.resolved, "{:#?}", t.messages);
    assert_eq!(t.outcome.exit_status, "submitted");
    assert_eq!(
        t.outcome.tests["FAIL_TO_PASS"].success,
        vec!["tests/test_text.py::test_shout_many"]
    );
    assert_eq!(
        t.outcome.tests["PASS_TO_PASS"].failure,
        Vec::<String>::new()
    );
    let run = t.run.as_ref().unwrap();
    assert_eq!(run.policy, "replay");
    // The submission is the gold patch's change, as git prints it.
    assert!(
        run.submission
            .contains("+    return text.upper() + \"!\" * n"),
        "{}",
        run.submission
    );
    assert!(!run.submission.contains("tests/"), "{}", run.submission);
    assert_eq!(
        run.steps.len(),
        t.messages.iter().filter(|m| m.role == "assistant").count()
    );
    // Real tool outputs: git status of the checkout, the file as `cat -n` shows it.
    let outs = tool_outputs(&t);
    assert!(outs[0].contains("run_tests.py"), "{}", outs[0]);
    assert!(
        outs[1].contains("     3\t    return text.upper() + \"!\""),
        "{}",
        outs[1]
    );
    assert!(
        outs[2].starts_with("The file /testbed/textkit/core.py has been edited."),
        "{}",
        outs[2]
    );
    assert_eq!(t.tools.len(), 3);
    assert_eq!(
        t.id,
        davinci_core::traj::trajectory_id(&f.task.instance_id, "replay", 0, None)
    );

    let t = f.agent.run(&f.task, &mut NullPolicy, 0).await.unwrap();
    assert!(!t.outcome.resolved);
    assert_eq!(t.outcome.exit_status, "submitted");
    assert_eq!(t.run.as_ref().unwrap().submission, "");
}

fn client(server: &FakeVllm, stream: bool) -> Arc<ChatClient> {
    Arc::new(
        ChatClient::new(ChatConfig {
            base_url: server.base_url.clone(),
            model: "Qwen/Qwen2.5-Coder-32B-Instruct".into(),
            timeout_secs: 10.0,
            max_retries: 3,
            backoff_initial_ms: 1,
            backoff_max_ms: 5,
            temperature: 0.7,
            top_p: Some(0.95),
            seed: Some(11),
            max_tokens: 256,
            stream,
            ..Default::default()
        })
        .unwrap(),
    )
}

/// A session: `cd` and `export` carry over; then the fix, then submit.
fn solving_script(streamed: bool) -> Vec<Reply> {
    let call = |name: &str, args: serde_json::Value| Reply::Calls {
        content: streamed.then(|| "Next step.".to_string()),
        calls: vec![(name.to_string(), args.to_string())],
    };
    vec![
        call(
            "bash",
            json!({"command": "cd textkit && export MARKS=many"}),
        ),
        call("bash", json!({"command": "pwd; echo \"marks=$MARKS\"; ls"})),
        call(
            "str_replace_editor",
            json!({"command": "str_replace", "path": "/testbed/textkit/core.py",
            "old_str": "return text.upper() + \"!\"", "new_str": "return text.upper() + \"!\" * n"}),
        ),
        call(
            "bash",
            json!({"command": "python3 -c 'from core import shout; print(shout(\"a\", 3))'"}),
        ),
        call("submit", json!({})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_over_vllms_wire_format_solves_it_plain_and_streamed() {
    let f = fixture(AgentConfig::default());
    for streamed in [false, true] {
        let server = FakeVllm::start(
            "Qwen/Qwen2.5-Coder-32B-Instruct",
            32_768,
            solving_script(streamed),
        )
        .await;
        let mut p = OpenAiPolicy::new(client(&server, streamed));
        let t = f.agent.run(&f.task, &mut p, 1).await.unwrap();
        assert!(t.outcome.resolved, "streamed={streamed}: {:#?}", t.messages);
        assert_eq!(t.outcome.exit_status, "submitted");
        let outs = tool_outputs(&t);
        assert_eq!(
            outs[0],
            "Your command ran successfully and did not produce any output."
        );
        assert!(
            outs[1].starts_with("/testbed/textkit\nmarks=many\n"),
            "{}",
            outs[1]
        );
        assert!(outs[1].contains("core.py"), "{}", outs[1]);
        assert_eq!(outs[3].trim(), "A!!!");
        let run = t.run.as_ref().unwrap();
        let s = run.sampling.as_ref().unwrap();
        assert_eq!(
            (s.temperature, s.top_p, s.seed),
            (0.7, Some(0.95), Some(11))
        );
        assert_eq!(
            run.server.as_ref().unwrap()["model"],
            "Qwen/Qwen2.5-Coder-32B-Instruct"
        );
        assert!(run.steps.iter().all(|s| s.prompt_tokens.is_some()));
        assert!(t.n_tokens.unwrap() > 0);
        // What went over the wire: the tools, one answer per call id, the sampling settings.
        let reqs = server.requests();
        assert_eq!(reqs.len(), 5);
        assert_eq!(reqs[0]["tools"].as_array().unwrap().len(), 3);
        assert_eq!(reqs[0]["tool_choice"], "auto");
        assert_eq!(reqs[0]["seed"], 11);
        assert_eq!(reqs[0]["stream"], streamed);
        let last = reqs[4]["messages"].as_array().unwrap();
        let asked = &last[last.len() - 2];
        let answered = &last[last.len() - 1];
        assert_eq!(answered["role"], "tool");
        assert_eq!(answered["tool_call_id"], asked["tool_calls"][0]["id"]);
        assert!(last.iter().all(|m| m.get("raw_content").is_none()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_turn_failure_ends_with_its_exit_status() {
    let f = fixture(AgentConfig {
        format_retries: 2,
        ..Default::default()
    });
    let run = |replies: Vec<Reply>, max_model_len: u64| {
        let f = &f;
        async move {
            let server = FakeVllm::start("m", max_model_len, replies).await;
            let mut p = OpenAiPolicy::new(client(&server, false));
            (f.agent.run(&f.task, &mut p, 0).await, server)
        }
    };

    // A call the server's parser missed, left as Hermes text: still a call.
    let (t, _) = run(
        vec![Reply::Text(
            "I'm done.\n<tool_call>\n{\"name\": \"submit\", \"arguments\": {}}\n</tool_call>"
                .into(),
        )],
        32_768,
    )
    .await;
    let t = t.unwrap();
    assert_eq!(t.outcome.exit_status, "submitted");
    let a = &t.messages[2];
    assert_eq!(a.tool_calls[0].function.name, "submit");
    assert_eq!(a.content.as_deref(), Some("I'm done."));
    assert!(a.raw_content.as_deref().unwrap().contains("<tool_call>"));

    // Malformed JSON arguments, three times in a row (two re-asks allowed): format_error.
    let bad = || Reply::Calls {
        content: None,
        calls: vec![("bash".into(), "{\"command\": \"ls".into())],
    };
    let (t, server) = run(vec![bad(), bad(), bad()], 32_768).await;
    let t = t.unwrap();
    assert_eq!(t.outcome.exit_status, "format_error");
    assert!(!t.outcome.resolved);
    assert_eq!(t.metadata["format_errors"]["invalid_json"], 3);
    assert_eq!(server.requests().len(), 3);
    assert!(tool_outputs(&t)[0].contains("not valid JSON"));
    // One bad turn, then a good one: the run goes on.
    let (t, _) = run(
        vec![
            bad(),
            Reply::Text("no call here".into()),
            Reply::call("submit", json!({})),
        ],
        32_768,
    )
    .await;
    let t = t.unwrap();
    assert_eq!(t.outcome.exit_status, "submitted");
    assert_eq!(t.run.as_ref().unwrap().format_errors, 2);

    // 429 and 500 are retried inside the call; the step records the attempts.
    let (t, _) = run(
        vec![
            Reply::Status(429),
            Reply::Status(500),
            Reply::call("submit", json!({})),
        ],
        32_768,
    )
    .await;
    let t = t.unwrap();
    assert_eq!(t.outcome.exit_status, "submitted");
    assert_eq!(t.run.as_ref().unwrap().steps[0].attempts, 3);

    // An endpoint that keeps failing is an infrastructure failure, not a trajectory.
    let (r, _) = run(vec![Reply::Status(500); 8], 32_768).await;
    match r {
        Err(e @ AgentError::Model(_)) => assert_eq!(e.reason(), "model_unavailable"),
        other => panic!("expected a model failure, got {other:?}"),
    }

    // A big observation pushes the next prompt past the model's context: context_limit, and
    // the diff so far is submitted.
    let (t, _) = run(
        vec![
            Reply::call("str_replace_editor", json!({"command": "str_replace", "path": "/testbed/textkit/core.py",
                "old_str": "return text.upper() + \"!\"", "new_str": "return text.upper() + \"!\" * n"})),
            Reply::call("bash", json!({"command": "seq 1 3000"})),
            Reply::call("submit", json!({})),
        ],
        4_000,
    )
    .await;
    let t = t.unwrap();
    assert_eq!(t.outcome.exit_status, "context_limit");
    assert!(
        t.outcome.resolved,
        "the automatic submission carries the fix"
    );

    // The step limit.
    let f2 = fixture(AgentConfig {
        max_steps: 2,
        ..Default::default()
    });
    let server = FakeVllm::start(
        "m",
        32_768,
        vec![Reply::call("bash", json!({"command": "true"})); 5],
    )
    .await;
    let t = f2
        .agent
        .run(&f2.task, &mut OpenAiPolicy::new(client(&server, false)), 0)
        .await
        .unwrap();
    assert_eq!(t.outcome.exit_status, "step_limit");
    assert_eq!(server.requests().len(), 2);
}
