//! TaskInstance: a SWE-bench instance plus how to build and test its environment.
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskEnv {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub setup_script: Option<String>,
    #[serde(default)]
    pub test_cmd: Option<String>,
    /// Name of the log parser (pytest, django, sympy, …).
    #[serde(default)]
    pub log_parser: Option<String>,
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
}
