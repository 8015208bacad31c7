#!/usr/bin/env python3
"""Grades evaluator fixtures with the official SWE-bench harness and writes their report.json.

Usage:
    python3 -m venv /tmp/swebench && /tmp/swebench/bin/pip install --no-deps swebench==5.0.2
    /tmp/swebench/bin/python scripts/swebench_grade_fixtures.py \
        crates/swebench/tests/fixtures/swebench/pytest-dev__pytest-7521

Each fixture directory holds `instance.json` (FAIL_TO_PASS, PASS_TO_PASS, repo, optional
`env.log_parser`) and `test_output.txt` (a harness log with its Start/End Test Output markers).
The report is `swebench.harness.grading.get_eval_report` for that log, with a model patch
present, minus its advisory `infra_failure` keys (davinci reports infrastructure failures in a
status of its own). `crates/swebench/tests/swebench_fixtures.rs` checks that davinci's
grader reproduces it.

Only the grading modules are imported: the `swebench.harness` package's `__init__` pulls in
docker, datasets and modal, which grading does not need, so it is bypassed.
"""
import json
import pathlib
import sys
import tempfile
import types

import swebench

_root = pathlib.Path(swebench.__file__).parent
_pkg = types.ModuleType("swebench.harness")
_pkg.__path__ = [str(_root / "harness")]
sys.modules["swebench.harness"] = _pkg

from swebench.harness.grading import get_eval_report  # noqa: E402
from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY  # noqa: E402

_NAMES = {fn.__name__: fn for fn in MAP_REPO_TO_PARSER_PY.values()}


def parser_name(inst):
    named = (inst.get("env") or {}).get("log_parser")
    if named:
        return "parse_log_" + named.replace("-", "_")
    fn = MAP_REPO_TO_PARSER_PY.get(inst["repo"])
    return fn.__name__ if fn else "parse_log_pytest"


def grade(fixture: pathlib.Path) -> dict:
    inst = json.loads((fixture / "instance.json").read_text())
    spec = types.SimpleNamespace(
        instance_id=inst["instance_id"],
        repo=inst["repo"],
        FAIL_TO_PASS=inst.get("FAIL_TO_PASS") or [],
        PASS_TO_PASS=inst.get("PASS_TO_PASS") or [],
        log_parser=parser_name(inst),
        eval_type="pass_and_fail",
    )
    prediction = {
        "instance_id": inst["instance_id"],
        "model_name_or_path": "fixture",
        "model_patch": "<model patch>",
    }
    # get_eval_report reads the log from a path.
    with tempfile.TemporaryDirectory() as d:
        log = pathlib.Path(d) / "test_output.txt"
        log.write_bytes((fixture / "test_output.txt").read_bytes())
        report = get_eval_report(spec, prediction, str(log), include_tests_status=True)
    for r in report.values():
        r.pop("infra_failure", None)
        r.pop("infra_failure_reason", None)
    return report


def main(dirs):
    if not dirs:
        sys.exit(__doc__)
    for d in map(pathlib.Path, dirs):
        report = grade(d)
        (d / "report.json").write_text(json.dumps(report, separators=(",", ":")) + "\n")
        r = next(iter(report.values()))
        print(f"{d.name}: resolved={r['resolved']} (swebench {swebench.__version__})")


if __name__ == "__main__":
    main(sys.argv[1:])
