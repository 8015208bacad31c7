//! TaskInstance: a SWE-bench instance plus how to build and test its environment.
//!
//! The JSON shape is a superset of SWE-bench's: the twelve published columns, then `env` (how to
//! build and test the environment) and `metadata` (where the task came from, how it was
//! validated). Fields added after the first version are left out of the JSON when empty, so a
//! SWE-bench tool reading our output sees the columns it knows.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// SWE-bench publishes FAIL_TO_PASS / PASS_TO_PASS either as lists or as JSON-encoded strings;
/// `null` reads as no tests.
pub fn de_test_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Encoded(String),
    }
    match Option::<Either>::deserialize(d)? {
        None => Ok(Vec::new()),
        Some(Either::List(v)) => Ok(v),
        Some(Either::Encoded(s)) if s.trim().is_empty() => Ok(Vec::new()),
        Some(Either::Encoded(s)) => serde_json::from_str(&s).map_err(serde::de::Error::custom),
    }
}

/// An optional field: `null` (which real SWE-bench exports hold in `hints_text`, `version`,
/// `environment_setup_commit`, …) reads as absent, i.e. the default.
pub fn de_null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Commands or names given either as one string or as a list (SWE-rebench's `install_config`
/// has both: `install` is a string, `pre_install` a list, `test_cmd` either). A string is one
/// entry; blank entries are dropped.
pub fn de_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<Option<String>>),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        None => Vec::new(),
        Some(Either::One(s)) => vec![s],
        Some(Either::Many(v)) => v.into_iter().flatten().collect(),
    }
    .into_iter()
    .filter(|s| !s.trim().is_empty())
    .collect())
}

/// How to build and test a task's environment. Either an `image` that holds the repository at
/// `/testbed` with its dependencies (container backends only), or a recipe the local backend
/// builds into a virtualenv: `python`, `pre_install`, `packages` / `reqs_path`, `pip_packages`,
/// `install`, as SWE-bench's install specs and SWE-rebench's `install_config` name them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskEnv {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub setup_script: Option<String>,
    /// The full test command line (test files included).
    #[serde(default)]
    pub test_cmd: Option<String>,
    /// Name of the log parser (pytest, django, sympy, …).
    #[serde(default)]
    pub log_parser: Option<String>,
    /// Python version the environment needs (`"3.11"`).
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub python: Option<String>,
    /// Shell commands run before anything is installed.
    #[serde(
        default,
        deserialize_with = "de_one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pre_install: Vec<String>,
    /// SWE-bench's `packages`: package names, or `requirements.txt` / `environment.yml` meaning
    /// the files named by `reqs_path`.
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub packages: Option<String>,
    /// Requirement files (relative to the repository root) installed with `pip install -r`.
    #[serde(
        default,
        deserialize_with = "de_one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub reqs_path: Vec<String>,
    /// Extra requirements installed with pip (`"pytest==7.4"`).
    #[serde(
        default,
        deserialize_with = "de_one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pip_packages: Vec<String>,
    /// Commands that install the repository itself (`python -m pip install -e .`).
    #[serde(
        default,
        deserialize_with = "de_one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub install: Vec<String>,
    /// Variables set for the install and test commands (`PYTHONPATH` of a src layout, …).
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env_vars: BTreeMap<String, String>,
    /// Key of the built environment, `cache/envs/{owner}__{name}/{recipe_hash}/` (local
    /// backend): a hash of the recipe and of the dependency files it reads.
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub recipe_hash: Option<String>,
}

impl TaskEnv {
    /// The image, when the task names one (blank names count as none).
    pub fn image(&self) -> Option<&str> {
        self.image
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

/// Where a task came from and what its validation found. Unknown keys (a published set's own
/// columns, such as SWE-rebench's `meta`) are kept in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskMetadata {
    /// `davinci` (built from a PR record), `swe-bench`, `swe-rebench`, `swe-gym`, `swe-smith`.
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub source: Option<String>,
    /// Where `problem_statement` came from: `issue` (linked issues), `pr` (title and body).
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub problem_source: Option<String>,
    /// The `davinci.pr/v1` record id the task was built from.
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub pr_id: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub pull_number: Option<u64>,
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub issue_numbers: Vec<u64>,
    /// Tests whose status differed between repeated runs, left out of both lists.
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub flaky: Vec<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl TaskMetadata {
    fn is_empty(&self) -> bool {
        *self == TaskMetadata::default()
    }
}

/// `instance_id`, `repo` and `base_commit` are required (a null one is an error naming it);
/// every other field may be missing or null.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskInstance {
    pub instance_id: String,
    pub repo: String,
    pub base_commit: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub patch: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub test_patch: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub problem_statement: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub hints_text: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub created_at: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub version: String,
    #[serde(rename = "FAIL_TO_PASS", default, deserialize_with = "de_test_list")]
    pub fail_to_pass: Vec<String>,
    #[serde(rename = "PASS_TO_PASS", default, deserialize_with = "de_test_list")]
    pub pass_to_pass: Vec<String>,
    #[serde(default, deserialize_with = "de_null_default")]
    pub environment_setup_commit: String,
    #[serde(default, deserialize_with = "de_null_default")]
    pub env: TaskEnv,
    #[serde(
        default,
        deserialize_with = "de_null_default",
        skip_serializing_if = "TaskMetadata::is_empty"
    )]
    pub metadata: TaskMetadata,
}

impl TaskInstance {
    /// `owner__name`, the directory name of the repository (SWE-bench's convention).
    pub fn repo_dir(&self) -> String {
        self.repo.replace('/', "__")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_test_list_encodings() {
        let a: TaskInstance = serde_json::from_str(
            r#"{"instance_id":"a__b-1","repo":"a/b","base_commit":"x","FAIL_TO_PASS":"[\"t1\", \"t2\"]","PASS_TO_PASS":["t3"]}"#,
        )
        .unwrap();
        assert_eq!(a.fail_to_pass, vec!["t1", "t2"]);
        assert_eq!(a.pass_to_pass, vec!["t3"]);
    }

    #[test]
    fn null_optional_fields_read_as_absent_and_null_required_ones_fail() {
        let a: TaskInstance = serde_json::from_str(
            r#"{"instance_id":"a__b-1","repo":"a/b","base_commit":"x","hints_text":null,"version":null,"environment_setup_commit":null,"created_at":null,"patch":null,"test_patch":null,"problem_statement":null,"FAIL_TO_PASS":null,"PASS_TO_PASS":null,"env":null}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            TaskInstance {
                instance_id: "a__b-1".into(),
                repo: "a/b".into(),
                base_commit: "x".into(),
                ..Default::default()
            }
        );
        let err = serde_json::from_str::<TaskInstance>(
            r#"{"instance_id":"a__b-1","repo":null,"base_commit":"x"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("null"), "{err}");
    }

    #[test]
    fn env_recipe_reads_strings_or_lists_and_new_fields_stay_out_when_empty() {
        let a: TaskInstance = serde_json::from_str(
            r#"{"instance_id":"a__b-1","repo":"a/b","base_commit":"x","env":{"install":"pip install -e .","pre_install":["apt-get update",null,""],"pip_packages":null,"python":"3.9"},"metadata":{"source":"swe-rebench","meta":{"is_lite":true}}}"#,
        )
        .unwrap();
        assert_eq!(a.env.install, vec!["pip install -e ."]);
        assert_eq!(a.env.pre_install, vec!["apt-get update"]);
        assert!(a.env.pip_packages.is_empty());
        assert_eq!(a.env.python.as_deref(), Some("3.9"));
        assert_eq!(a.metadata.extra["meta"]["is_lite"], true);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["metadata"]["meta"]["is_lite"], true, "extra keys kept");
        assert!(v["env"].get("pip_packages").is_none());
        let plain = serde_json::to_value(TaskInstance::default()).unwrap();
        assert!(plain.get("metadata").is_none(), "{plain}");
        assert!(plain["env"].get("recipe_hash").is_none());
        assert!(
            plain["env"].get("image").is_some(),
            "first-version fields keep their shape"
        );
        assert_eq!(
            TaskEnv {
                image: Some("  ".into()),
                ..Default::default()
            }
            .image(),
            None
        );
    }
}
