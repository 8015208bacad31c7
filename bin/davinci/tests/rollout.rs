//! `davinci rollout` end to end on fixture tasks in the local sandbox: the replay policy
//! gives a pass trajectory per rollout and the null policy a fail one; killing the process
//! (SIGKILL) mid-run and running it again redoes only the unfinished rollouts and ends with the
//! undisturbed run's trajectory ids; the pass trajectories pack into `env-pass` with
//! assistant-only masks, and the `.mask` sidecar is 1 on exactly the assistant spans. Needs
//! bwrap, git and python3.
mod common;

use common::{davinci, succeeded};
use davinci_core::megatron::MegatronIndex;
use davinci_core::traj::Trajectory;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const TOK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
);

fn trajectories(out: &Path, dir: &str) -> Vec<Trajectory> {
    let p = out.join(format!("trajectories/{dir}/tasks.jsonl.zst"));
    if !p.exists() {
        return Vec::new();
    }
    let raw = zstd::decode_all(&std::fs::read(&p).unwrap()[..]).unwrap();
    String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &[Trajectory]) -> BTreeSet<String> {
    v.iter().map(|t| t.id.clone()).collect()
}

fn finished_rollouts(out: &Path) -> usize {
    let Ok(work) = std::fs::read_dir(out.join("work")) else {
        return 0;
    };
    work.flatten()
        .map(|d| {
            std::fs::read_dir(d.path().join("rollouts"))
                .map(|r| {
                    r.flatten()
                        .filter(|e| {
                            let n = e.file_name().to_string_lossy().to_string();
                            n.ends_with(".json") && !n.starts_with('.')
                        })
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn rollouts_resume_after_sigkill_and_pack_with_assistant_masks() {
    let dir = tempfile::tempdir().unwrap();
    let repos = dir.path().join("repos");
    let mut lines = String::new();
    for n in 1..=3 {
        let t = davinci_testkit::tasks::textkit_task(&repos, n).unwrap();
        lines.push_str(&serde_json::to_string(&t).unwrap());
        lines.push('\n');
    }
    let tasks = dir.path().join("tasks.jsonl");
    std::fs::write(&tasks, lines).unwrap();
    let run = |out: &Path, policy: &str| {
        let mut c = davinci();
        c.args(["rollout", "--tasks"])
            .arg(&tasks)
            .arg("--out")
            .arg(out)
            .arg("--repos")
            .arg(&repos)
            .args(["--policy", policy, "--rollouts", "2", "--workers", "1"])
            .args(["--tokenizer", TOK]);
        c
    };

    let a = dir.path().join("a");
    let stdout = succeeded(&run(&a, "replay").output().unwrap());
    assert!(stdout.contains("3 tasks, 6 rollouts"), "{stdout}");
    assert!(stdout.contains("pass 6 / fail 0"), "{stdout}");
    let pass = trajectories(&a, "pass");
    assert_eq!(pass.len(), 6);
    assert!(trajectories(&a, "fail").is_empty());
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("stats/rollout.json")).unwrap()).unwrap();
    assert_eq!(stats["exit_status"]["submitted"], 6);
    // With --tokenizer, n_tokens is the whole conversation as the Qwen2.5 template renders it.
    let tok = davinci_tokenize::Tokenizer::from_file(TOK).unwrap();
    let mut total = 0;
    for t in &pass {
        let text = davinci_tokenize::chat::render_qwen25(t).unwrap().text();
        let want = tok.encode(&text).unwrap().len() as u64;
        assert!(want > 100, "{text}");
        assert_eq!(t.n_tokens, Some(want), "{}", t.id);
        total += want;
    }
    assert_eq!(stats["tokens"], total);

    // Killed once two rollouts are finished, then run again.
    let b = dir.path().join("b");
    let mut child = run(&b, "replay")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while finished_rollouts(&b) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no rollout finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let kept = finished_rollouts(&b);
    assert!(kept < 6, "killed too late ({kept} rollouts finished)");
    let stdout = succeeded(&run(&b, "replay").output().unwrap());
    assert!(
        stdout.contains(&format!("{kept} reused from an earlier run")),
        "{stdout}"
    );
    assert_eq!(ids(&trajectories(&b, "pass")), ids(&pass));

    // Submitting nothing fails every task.
    let c = dir.path().join("c");
    let stdout = succeeded(&run(&c, "null").output().unwrap());
    assert!(stdout.contains("pass 0 / fail 6"), "{stdout}");
    assert_eq!(trajectories(&c, "fail").len(), 6);

    // SFT packing: env-pass, assistant tokens only.
    let mixture = dir.path().join("sft.yaml");
    std::fs::write(
        &mixture,
        "stages:\n  - name: sft\n    mask: assistant-only\n    datasets:\n      - source: env-pass\n",
    )
    .unwrap();
    let packed = dir.path().join("packed");
    succeeded(
        &davinci()
            .args(["pack", "--in"])
            .arg(a.join("trajectories"))
            .arg("--out")
            .arg(&packed)
            .args(["--tokenizer", TOK, "--seq-len", "16384", "--mixture"])
            .arg(&mixture)
            .output()
            .unwrap(),
    );
    let tok = davinci_tokenize::Tokenizer::from_file(TOK).unwrap();
    let shard = std::fs::read_dir(packed.join("sft"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".mask.idx"))
        .expect("a mask sidecar");
    let prefix = shard
        .to_string_lossy()
        .trim_end_matches(".mask.idx")
        .to_string();
    let read = |suffix: &str| std::fs::read(format!("{prefix}{suffix}")).unwrap();
    let (idx, bin) = (MegatronIndex::parse(&read(".idx")).unwrap(), read(".bin"));
    let (midx, mbin) = (
        MegatronIndex::parse(&read(".mask.idx")).unwrap(),
        read(".mask.bin"),
    );
    let assistant_turns: usize = pass
        .iter()
        .map(|t| t.messages.iter().filter(|m| m.role == "assistant").count())
        .sum();
    let mut spans = 0;
    let mut sequences = 0;
    for i in 0..idx.lengths.len() {
        let ids = idx.sequence(&bin, i).unwrap();
        let mask = midx.sequence(&mbin, i).unwrap();
        assert_eq!(ids.len(), mask.len());
        sequences += 1;
        let mut j = 0;
        while j < ids.len() {
            if mask[j] == 0 {
                j += 1;
                continue;
            }
            let start = j;
            while j < ids.len() && mask[j] == 1 {
                j += 1;
            }
            spans += 1;
            let before = tok.decode(&ids[..start]).unwrap();
            let span = tok.decode(&ids[start..j]).unwrap();
            // The turn's header is prompt; the newline after it may go either way.
            assert!(
                before
                    .trim_end_matches('\n')
                    .ends_with("<|im_start|>assistant"),
                "{before:?}"
            );
            assert!(span.ends_with("<|im_end|>"), "{span:?}");
            assert!(!span.contains("<|im_start|>"), "{span:?}");
        }
        // Everything unmasked is the prompt, the tools, the tool responses.
        let text = tok.decode(&ids).unwrap();
        assert!(text.contains("<tool_response>"));
    }
    assert_eq!(sequences, pass.len());
    assert_eq!(spans, assistant_turns);
}
