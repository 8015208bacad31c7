//! Reading task instances and predictions as SWE-bench publishes them.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use davinci_core::task::TaskInstance;
use serde::{Deserialize, Serialize};

use crate::sets::SetFormat;

/// One prediction, as in SWE-bench `predictions.jsonl`. `model_patch` is `None` when the
/// model produced no patch at all (reported as `patch_is_None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub instance_id: String,
    #[serde(default)]
    pub model_patch: Option<String>,
    #[serde(default)]
    pub model_name_or_path: String,
}

/// Reads a file, un-gzipping `*.gz`.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .with_context(|| format!("gunzipping {}", path.display()))?;
        Ok(s)
    } else {
        String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", path.display()))
    }
}

/// Parses JSON text; the error names the field that is wrong (`at `[3].repo``).
fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| match e.path().to_string().as_str() {
        "." => anyhow::anyhow!("{}", e.inner()),
        path => anyhow::anyhow!("at `{path}`: {}", e.inner()),
    })
}

/// Records of a JSON array, a JSON object of records keyed by id, or JSON Lines.
pub fn read_records<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = read_text(path)?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return parse_json(trimmed)
            .with_context(|| format!("{}: not a JSON array of records", path.display()));
    }
    // A single JSON document that is an object of objects (SWE-bench accepts predictions so).
    if trimmed.starts_with('{')
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(trimmed)
        && !m.is_empty()
        && m.values().all(|v| v.is_object())
        && !m.contains_key("instance_id")
        && !m.contains_key("task_id")
    {
        return m
            .into_iter()
            .map(|(k, v)| {
                serde_path_to_error::deserialize(v)
                    .map_err(|e| anyhow::anyhow!("at `{}`: {}", e.path(), e.inner()))
                    .with_context(|| format!("{}: record `{k}`", path.display()))
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_json(line).with_context(|| format!("{}: line {}", path.display(), i + 1))?);
    }
    Ok(out)
}

/// Task instances of any published set the file holds (see [`crate::sets`]), told apart by
/// their columns.
pub fn load_instances(path: &Path) -> anyhow::Result<Vec<TaskInstance>> {
    load_set(path, SetFormat::Auto)
}

/// Task instances of a file in the given set's shape: a JSON array, a JSON object of records
/// keyed by id, or JSON Lines; an error names the record (line, index or key) and the field.
pub fn load_set(path: &Path, format: SetFormat) -> anyhow::Result<Vec<TaskInstance>> {
    let text = read_text(path)?;
    let trimmed = text.trim_start();
    let mut rows: Vec<(String, String, serde_json::Value)> = Vec::new();
    if trimmed.starts_with('[') {
        let v: Vec<serde_json::Value> = parse_json(trimmed)
            .with_context(|| format!("{}: not a JSON array of records", path.display()))?;
        for (i, r) in v.into_iter().enumerate() {
            rows.push((format!("[{i}]."), format!("record [{i}]"), r));
        }
    } else if trimmed.starts_with('{')
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(trimmed)
        && !m.is_empty()
        && m.values().all(|v| v.is_object())
        && !m.contains_key("instance_id")
    {
        for (k, r) in m {
            rows.push((String::new(), format!("record `{k}`"), r));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r =
                parse_json(line).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
            rows.push((String::new(), format!("line {}", i + 1), r));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    let mut seen = std::collections::HashSet::new();
    for (prefix, place, row) in rows {
        let inst = crate::sets::normalize_at(row, format, &prefix)
            .with_context(|| format!("{}: {place}", path.display()))?;
        anyhow::ensure!(
            seen.insert(inst.instance_id.clone()),
            "{}: instance `{}` appears twice",
            path.display(),
            inst.instance_id
        );
        out.push(inst);
    }
    Ok(out)
}

pub fn load_predictions(path: &Path) -> anyhow::Result<Vec<Prediction>> {
    read_records(path)
}

pub fn index_instances(v: Vec<TaskInstance>) -> HashMap<String, TaskInstance> {
    v.into_iter().map(|i| (i.instance_id.clone(), i)).collect()
}
