//! Validation by execution: the tests run on base + test patch ("before") and on base + test
//! patch + patch ("after"), each side `runs` times in fresh sandboxes, parsed by the harness's
//! log parsers.
//!
//! * FAIL_TO_PASS: tests passing on every after run and not passing before (failed, errored,
//!   or absent); PASS_TO_PASS: passing on every run of both sides.
//! * A test whose status differs between the runs of one side is flaky and left out of both.
//! * A run counts only with evidence the suite ran: its log reached the end marker and the
//!   parser found at least one test.
//! * Infrastructure failures (sandbox error, setup failure, timeout) are retried and, when
//!   they persist, counted apart from rejections.
//! * Gold check through the harness: the gold patch must grade the kept task resolved, and the
//!   empty patch (a before run) unresolved.

use std::collections::BTreeSet;

use davinci_core::task::TaskInstance;
use davinci_swebench::grading::{END_TEST_OUTPUT, grade_log, parser_for, status_map_of_log};
use davinci_swebench::parsers::{PASSED, StatusMap, XFAIL};
use davinci_swebench::{Harness, Status, TestRun};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidateConfig {
    /// Runs per side; tests whose status differs between them are flaky.
    pub runs: u32,
    /// Tries per run when the infrastructure fails.
    pub infra_attempts: u32,
    /// Check that the gold patch resolves and the empty patch does not.
    pub gold_check: bool,
}

impl Default for ValidateConfig {
    fn default() -> Self {
        ValidateConfig {
            runs: 2,
            infra_attempts: 2,
            gold_check: true,
        }
    }
}

/// The verdict on one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "reason")]
pub enum Verdict {
    Kept,
    /// The task is not one (counted by reason).
    Rejected(String),
    /// The infrastructure failed (counted apart, by reason).
    Infra(String),
}

/// What validating one task found; written as `validation.json` beside its logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Validation {
    pub instance_id: String,
    pub verdict: Verdict,
    pub fail_to_pass: Vec<String>,
    pub pass_to_pass: Vec<String>,
    pub flaky: Vec<String>,
    pub seconds: f64,
    /// (side, run) → log, for the logs directory.
    #[serde(skip)]
    pub logs: Vec<(String, String)>,
}

impl Validation {
    /// Whether this validation reproduces a published task's lists (order aside); `None` when
    /// an infrastructure failure left nothing to compare.
    pub fn reproduces(&self, published: &TaskInstance) -> Option<bool> {
        if matches!(self.verdict, Verdict::Infra(_)) {
            return None;
        }
        let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
        Some(
            set(&published.fail_to_pass) == set(&self.fail_to_pass)
                && set(&published.pass_to_pass) == set(&self.pass_to_pass),
        )
    }
}

fn passing(s: &str) -> bool {
    s == PASSED || s == XFAIL
}

/// Status maps of one side's runs, or how the side failed.
enum Side {
    Ran(Vec<StatusMap>),
    Rejected(&'static str),
    Infra(String),
}

async fn run_side(
    harness: &Harness,
    inst: &TaskInstance,
    patch: Option<&str>,
    name: &str,
    cfg: &ValidateConfig,
    logs: &mut Vec<(String, String)>,
) -> Side {
    let parser = match parser_for(inst) {
        Ok(p) => p,
        Err(e) => return Side::Infra(format!("{e:#}")),
    };
    let mut maps = Vec::new();
    for run in 0..cfg.runs.max(1) {
        let mut attempt = 0;
        let r: TestRun = loop {
            attempt += 1;
            let r = harness.run_tests(inst, patch).await;
            let infra = r.status.is_infra() && r.status != Status::InfraTestPatchFailed;
            if (infra || r.timed_out) && attempt < cfg.infra_attempts.max(1) {
                tracing::warn!(instance = %inst.instance_id, side = name, ?r.status, "retrying a run");
                continue;
            }
            break r;
        };
        logs.push((format!("{name}-{run}.log"), r.log.clone()));
        match r.status {
            Status::InfraTestPatchFailed => return Side::Rejected("test_patch_failed"),
            Status::PatchFailed => return Side::Rejected("patch_failed"),
            s if s.is_infra() => {
                return Side::Infra(format!(
                    "{}: {}",
                    davinci_swebench::harness::status_name(s),
                    r.error.unwrap_or_default()
                ));
            }
            _ => {}
        }
        if r.timed_out {
            return Side::Infra("timeout".into());
        }
        let ran = r.log.contains(END_TEST_OUTPUT);
        match status_map_of_log(&r.log, parser) {
            Some(m) if ran && !m.is_empty() => maps.push(m),
            _ => return Side::Rejected("no_tests_ran"),
        }
    }
    Side::Ran(maps)
}

/// Tests whose status is not the same in every map (a test absent from some counts as
/// differing).
fn unstable(maps: &[StatusMap]) -> BTreeSet<String> {
    let mut all: BTreeSet<&String> = BTreeSet::new();
    for m in maps {
        all.extend(m.keys());
    }
    all.into_iter()
        .filter(|t| {
            let first = maps[0].get(*t);
            maps.iter().any(|m| m.get(*t) != first)
        })
        .cloned()
        .collect()
}

/// Validates `inst` (its `patch`, `test_patch` and `env` set); the lists come back in the
/// after side's log order.
pub async fn validate(harness: &Harness, inst: &TaskInstance, cfg: &ValidateConfig) -> Validation {
    let t = std::time::Instant::now();
    let mut v = Validation {
        instance_id: inst.instance_id.clone(),
        verdict: Verdict::Kept,
        fail_to_pass: vec![],
        pass_to_pass: vec![],
        flaky: vec![],
        seconds: 0.0,
        logs: vec![],
    };
    let finish = |mut v: Validation, verdict: Verdict| {
        v.verdict = verdict;
        v.seconds = t.elapsed().as_secs_f64();
        v
    };
    let before = match run_side(harness, inst, None, "before", cfg, &mut v.logs).await {
        Side::Ran(m) => m,
        Side::Rejected(r) => return finish(v, Verdict::Rejected(r.into())),
        Side::Infra(r) => return finish(v, Verdict::Infra(r)),
    };
    let after = match run_side(harness, inst, Some(&inst.patch), "after", cfg, &mut v.logs).await {
        Side::Ran(m) => m,
        Side::Rejected(r) => return finish(v, Verdict::Rejected(r.into())),
        Side::Infra(r) => return finish(v, Verdict::Infra(r)),
    };
    let mut flaky = unstable(&before);
    flaky.extend(unstable(&after));
    let passed_before = |t: &str| before[0].get(t).is_some_and(|s| passing(s));
    for (test, status) in &after[0] {
        if flaky.contains(test) || !passing(status) {
            continue;
        }
        if passed_before(test) {
            v.pass_to_pass.push(test.clone());
        } else {
            v.fail_to_pass.push(test.clone());
        }
    }
    v.flaky = flaky.into_iter().collect();
    if v.fail_to_pass.is_empty() {
        return finish(v, Verdict::Rejected("no_fail_to_pass".into()));
    }
    if cfg.gold_check {
        let mut graded = inst.clone();
        graded.fail_to_pass = v.fail_to_pass.clone();
        graded.pass_to_pass = v.pass_to_pass.clone();
        let gold = harness.grade(&graded, &inst.patch).await;
        v.logs.push(("gold.log".into(), gold.log));
        match gold.status {
            Status::Resolved => {}
            s if s.is_infra() => {
                return finish(v, Verdict::Infra(davinci_swebench::harness::status_name(s)));
            }
            _ => return finish(v, Verdict::Rejected("gold_not_resolved".into())),
        }
        let empty = v
            .logs
            .iter()
            .find(|(n, _)| n == "before-0.log")
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        match grade_log(&graded, Some(""), &empty) {
            Ok(r) if !r.resolved => {}
            _ => return finish(v, Verdict::Rejected("empty_patch_resolves".into())),
        }
    }
    finish(v, Verdict::Kept)
}
