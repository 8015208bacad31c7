//! Grading a test log against an instance's FAIL_TO_PASS / PASS_TO_PASS, as the official
//! harness's `grading.py` does, producing the per-instance `report.json` shape.

use serde::{Deserialize, Serialize};

use crate::parsers::{FAILED, PASSED, Parser, SKIPPED, StatusMap, XFAIL, parser_for_repo};
use davinci_core::task::TaskInstance;

pub const APPLY_PATCH_FAIL: &str = ">>>>> Patch Apply Failed";
pub const APPLY_PATCH_PASS: &str = ">>>>> Applied Patch";
pub const RESET_FAILED: &str = ">>>>> Reset Failed";
pub const TESTS_ERROR: &str = ">>>>> Tests Errored";
pub const TESTS_TIMEOUT: &str = ">>>>> Tests Timed Out";
pub const START_TEST_OUTPUT: &str = ">>>>> Start Test Output";
pub const END_TEST_OUTPUT: &str = ">>>>> End Test Output";

/// `{success, failure}` lists of test names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessFailure {
    pub success: Vec<String>,
    pub failure: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestsStatus {
    #[serde(rename = "FAIL_TO_PASS")]
    pub fail_to_pass: SuccessFailure,
    #[serde(rename = "PASS_TO_PASS")]
    pub pass_to_pass: SuccessFailure,
    #[serde(rename = "FAIL_TO_FAIL")]
    pub fail_to_fail: SuccessFailure,
    #[serde(rename = "PASS_TO_FAIL")]
    pub pass_to_fail: SuccessFailure,
}

/// One instance's entry of the official `report.json` (keyed by instance id there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    #[serde(rename = "patch_is_None")]
    pub patch_is_none: bool,
    pub patch_exists: bool,
    pub patch_successfully_applied: bool,
    pub resolved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests_status: Option<TestsStatus>,
}

/// The status-map key `case` grades by, as the official harness's `_resolve_case`: the name
/// itself when the log has it; else, for a test id cut short inside its parameters (more `[`
/// than `]`: SWE-bench Verified has 676 such, SWE-bench#290), the first name in log order that
/// it is a prefix of, provided every such name agrees on passing (PASSED or XFAIL) or not.
/// A well-formed id never falls back, so `[100%]` (a PASS_TO_PASS entry of
/// pytest-dev__pytest-5262 and -7521) matches only itself.
fn resolve<'a>(case: &str, sm: &'a StatusMap) -> Option<&'a str> {
    if let Some((k, _)) = sm.get_key_value(case) {
        return Some(k);
    }
    if case.matches('[').count() <= case.matches(']').count() {
        return None;
    }
    let mut matches = sm.iter().filter(|(k, _)| k.starts_with(case));
    let (first, status) = matches.next()?;
    let passing = |s: &str| s == PASSED || s == XFAIL;
    let outcome = passing(status);
    matches
        .all(|(_, s)| passing(s) == outcome)
        .then_some(first.as_str())
}

fn status<'a>(case: &str, sm: &'a StatusMap) -> Option<&'a str> {
    resolve(case, sm).map(|k| sm[k].as_str())
}

fn passed(case: &str, sm: &StatusMap) -> bool {
    status(case, sm).is_some_and(|s| s == PASSED || s == XFAIL)
}

fn maintained(case: &str, sm: &StatusMap) -> bool {
    passed(case, sm) || status(case, sm).is_some_and(|s| s == SKIPPED)
}

fn failed(case: &str, sm: &StatusMap) -> bool {
    match status(case, sm) {
        None => true,
        Some(s) => s == FAILED || s == crate::parsers::ERROR || s == SKIPPED,
    }
}

/// The parser for an instance: an explicit `env.log_parser` wins over the repository table.
pub fn parser_for(inst: &TaskInstance) -> anyhow::Result<Parser> {
    match inst.env.log_parser.as_deref() {
        Some(name) => Parser::by_name(name)
            .ok_or_else(|| anyhow::anyhow!("{}: unknown log parser `{name}`", inst.instance_id)),
        None => Ok(parser_for_repo(&inst.repo)),
    }
}

/// Status map of a log, or `None` when the log says the patches did not apply / tests could
/// not run (the harness's "bad codes").
///
/// Logs with the start/end markers are parsed between them (whole log as fallback when that
/// part yields nothing, as upstream). Logs from the older harness have no markers; they are
/// parsed whole when they show a patch was applied, as the 2.x harness did.
pub fn status_map_of_log(log: &str, parser: Parser) -> Option<StatusMap> {
    if [APPLY_PATCH_FAIL, RESET_FAILED, TESTS_ERROR, TESTS_TIMEOUT]
        .iter()
        .any(|c| log.contains(c))
    {
        return None;
    }
    match (log.find(START_TEST_OUTPUT), log.find(END_TEST_OUTPUT)) {
        (Some(_), Some(_)) => {
            let after = log.split(START_TEST_OUTPUT).nth(1).unwrap_or("");
            let section = after.split(END_TEST_OUTPUT).next().unwrap_or("");
            let m = parser.parse(section);
            Some(if m.is_empty() { parser.parse(log) } else { m })
        }
        _ if log.to_lowercase().contains("applied patch") => Some(parser.parse(log)),
        _ => None,
    }
}

/// FAIL_TO_PASS / PASS_TO_PASS outcome from a status map (PASS_AND_FAIL evaluation; the
/// fail-only mode is for JavaScript repositories, not used here).
pub fn tests_status(sm: &StatusMap, f2p: &[String], p2p: &[String]) -> TestsStatus {
    let mut ts = TestsStatus::default();
    for t in f2p {
        if passed(t, sm) {
            ts.fail_to_pass.success.push(t.clone());
        } else if failed(t, sm) {
            ts.fail_to_pass.failure.push(t.clone());
        }
    }
    for t in p2p {
        if maintained(t, sm) {
            ts.pass_to_pass.success.push(t.clone());
        } else if failed(t, sm) {
            ts.pass_to_pass.failure.push(t.clone());
        }
    }
    ts
}

/// Fully resolved: every FAIL_TO_PASS and PASS_TO_PASS test succeeded (empty lists count as
/// all-succeeded, as upstream).
pub fn is_resolved(ts: &TestsStatus) -> bool {
    ts.fail_to_pass.failure.is_empty() && ts.pass_to_pass.failure.is_empty()
}

/// Grades one log. `model_patch` is `None` when the prediction had no patch at all.
pub fn grade_log(
    inst: &TaskInstance,
    model_patch: Option<&str>,
    log: &str,
) -> anyhow::Result<InstanceReport> {
    let mut r = InstanceReport::default();
    if model_patch.is_none() {
        r.patch_is_none = true;
        return Ok(r);
    }
    r.patch_exists = true;
    let parser = parser_for(inst)?;
    let Some(sm) = status_map_of_log(log, parser) else {
        return Ok(r);
    };
    r.patch_successfully_applied = true;
    let ts = tests_status(&sm, &inst.fail_to_pass, &inst.pass_to_pass);
    r.resolved = is_resolved(&ts);
    r.tests_status = Some(ts);
    Ok(r)
}

/// `{instance_id: report}` as the official file is laid out.
pub fn report_json(instance_id: &str, r: &InstanceReport) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert(
        instance_id.to_string(),
        serde_json::to_value(r).expect("report serializes"),
    );
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> TaskInstance {
        TaskInstance {
            instance_id: "o__r-1".into(),
            repo: "o/r".into(),
            fail_to_pass: vec!["t.py::f".into()],
            pass_to_pass: vec!["t.py::p".into(), "t.py::s".into()],
            ..Default::default()
        }
    }

    #[test]
    fn grades_between_markers() {
        let log = format!(
            "PASSED t.py::f\n{START_TEST_OUTPUT}\nFAILED t.py::f\nPASSED t.py::p\nSKIPPED t.py::s\n{END_TEST_OUTPUT}\n"
        );
        let r = grade_log(&inst(), Some("diff"), &log).unwrap();
        assert!(r.patch_successfully_applied);
        assert!(!r.resolved);
        let ts = r.tests_status.unwrap();
        assert_eq!(ts.fail_to_pass.failure, vec!["t.py::f"]);
        assert_eq!(ts.pass_to_pass.success, vec!["t.py::p", "t.py::s"]);
    }

    #[test]
    fn missing_test_is_failure_and_bad_codes_mean_not_applied() {
        let log = format!("{START_TEST_OUTPUT}\nPASSED t.py::f\n{END_TEST_OUTPUT}\n");
        let r = grade_log(&inst(), Some("d"), &log).unwrap();
        assert_eq!(
            r.tests_status.unwrap().pass_to_pass.failure,
            vec!["t.py::p", "t.py::s"]
        );
        let r = grade_log(&inst(), Some("d"), &format!("{APPLY_PATCH_FAIL}\n")).unwrap();
        assert!(r.patch_exists && !r.patch_successfully_applied && r.tests_status.is_none());
        let r = grade_log(&inst(), None, "").unwrap();
        assert!(r.patch_is_none && !r.patch_exists);
        let v = report_json("o__r-1", &r);
        assert_eq!(v["o__r-1"]["patch_is_None"], true);
    }

    fn sm(pairs: &[(&str, &str)]) -> StatusMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The harness's rule for SWE-bench#290: exact names stay exact; a name cut short inside
    /// its parameters takes the first name it prefixes when all of them agree on passing.
    #[test]
    fn truncated_ids_match_by_prefix_as_upstream() {
        let full = sm(&[("t.py::x[case-1-extended]", PASSED)]);
        assert!(
            !passed("t.py::x[case-1]", &full),
            "a well-formed id never falls back"
        );
        assert!(failed("t.py::x[case-1]", &full));
        let cut = "t.py::x[log(photon";
        assert!(passed(
            cut,
            &sm(&[("t.py::x[log(photon / m**2 s)]", PASSED)])
        ));
        assert!(failed(
            cut,
            &sm(&[("t.py::x[log(photon / m**2 s)]", FAILED)])
        ));
        assert!(failed(cut, &sm(&[("t.py::y[other]", PASSED)])));
        let agree = sm(&[("t.py::x[a-None]", PASSED), ("t.py::x[a-No-v]", XFAIL)]);
        assert!(passed("t.py::x[a-No", &agree));
        let disagree = sm(&[("t.py::x[a-None]", PASSED), ("t.py::x[a-No-v]", FAILED)]);
        assert!(!passed("t.py::x[a-No", &disagree) && failed("t.py::x[a-No", &disagree));
        // Neither passes: they agree, and the first in log order decides (SKIPPED: maintained).
        let skipped_first = sm(&[("t.py::x[fd-a]", SKIPPED), ("t.py::x[fd-b]", FAILED)]);
        assert!(maintained("t.py::x[fd", &skipped_first));
        let failed_first = sm(&[("t.py::x[fd-b]", FAILED), ("t.py::x[fd-a]", SKIPPED)]);
        assert!(!maintained("t.py::x[fd", &failed_first));
        // A surplus `]` is no truncation; `[100%]` matches only itself, and `[` any `[…`.
        assert!(failed(
            "handles foo] gracefully",
            &sm(&[("handles foo] gracefully and more", PASSED)])
        ));
        let progress = sm(&[("[100%]------------------------------", PASSED)]);
        assert!(failed("[100%]", &progress));
        assert!(passed("[", &progress));
        assert!(passed("[100%]", &sm(&[("[100%]", PASSED)])));
    }
}
