//! How to test an instance when it does not say (`env.test_cmd`): the SWE-bench test
//! command of its repository, run on the test files its test patch touches.

use davinci_core::task::TaskInstance;

/// Files a unified diff touches (the `+++ b/…` side; deletions use the `---` side).
pub fn diff_files(patch: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in patch.lines() {
        if let Some(rest) = line.strip_prefix("diff --git a/")
            && let Some((_, b)) = rest.split_once(" b/")
        {
            let b = b.to_string();
            if !out.contains(&b) {
                out.push(b);
            }
        }
    }
    out
}

const NON_TEST_EXTS: [&str; 11] = [
    ".json", ".png", "csv", ".txt", ".md", ".jpg", ".jpeg", ".pkl", ".yml", ".yaml", ".toml",
];

/// Test targets from the test patch, in the form each runner wants (Django: dotted module
/// names relative to `tests/`; others: file paths).
pub fn test_directives(inst: &TaskInstance) -> Vec<String> {
    let files: Vec<String> = diff_files(&inst.test_patch)
        .into_iter()
        .filter(|f| !NON_TEST_EXTS.iter().any(|e| f.ends_with(e)))
        .collect();
    if inst.repo == "django/django" {
        return files
            .iter()
            .map(|f| {
                let f = f.strip_suffix(".py").unwrap_or(f);
                let f = f.strip_prefix("tests/").unwrap_or(f);
                f.replace('/', ".")
            })
            .collect();
    }
    files
}

/// The repository's test command (SWE-bench's defaults for the 12 repositories).
pub fn default_test_cmd(repo: &str) -> &'static str {
    match repo {
        "django/django" => "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1",
        "sympy/sympy" => {
            "PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose"
        }
        "sphinx-doc/sphinx" => "tox --current-env -epy39 -v --",
        "mwaskom/seaborn" => "pytest --no-header -rA",
        "astropy/astropy" => "pytest -rA",
        _ => "pytest -rA",
    }
}

/// The full test command line for an instance.
pub fn test_command(inst: &TaskInstance) -> String {
    match &inst.env.test_cmd {
        Some(cmd) => cmd.clone(),
        None => {
            let mut cmd = default_test_cmd(&inst.repo).to_string();
            for d in test_directives(inst) {
                cmd.push(' ');
                cmd.push_str(&shell_quote(&d));
            }
            cmd
        }
    }
}

/// Single-quotes a word for sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn django_directives_and_commands() {
        let inst = TaskInstance {
            repo: "django/django".into(),
            test_patch: "diff --git a/tests/auth_tests/test_validators.py b/tests/auth_tests/test_validators.py\n--- a/x\n+++ b/x\n".into(),
            ..Default::default()
        };
        assert_eq!(test_directives(&inst), vec!["auth_tests.test_validators"]);
        assert_eq!(
            test_command(&inst),
            "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 auth_tests.test_validators"
        );
        let inst = TaskInstance {
            repo: "psf/requests".into(),
            test_patch: "diff --git a/test_requests.py b/test_requests.py\ndiff --git a/data.json b/data.json\n".into(),
            ..Default::default()
        };
        assert_eq!(test_command(&inst), "pytest -rA test_requests.py");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
    }
}
