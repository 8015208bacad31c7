//! OpenAI request bodies as this server reads them, and OpenAI-style errors.
//!
//! Bodies are parsed by hand from JSON values so that every malformed field gets an
//! `invalid_request_error` naming the field (`param`), as the OpenAI API answers, instead of a
//! framework's plain-text rejection.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answered as `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn unknown_model(name: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{name}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn context_length(limit: usize, prompt: usize, completion: usize) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {limit} tokens. However, you requested \
                 {} tokens ({prompt} in the prompt, {completion} in the completion). Please \
                 reduce the length of the prompt or completion.",
                prompt + completion
            ),
            kind: "invalid_request_error",
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "Unknown request URL: {path}. Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The sampling and output fields both endpoints share.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

/// The most choices one request may ask for.
pub const MAX_N: usize = 128;

pub fn parse_object(body: &[u8]) -> ApiResult<serde_json::Map<String, Value>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid("body", format!("The request body is not valid JSON: {e}"))
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid(
            "body",
            "The request body must be a JSON object.",
        )),
    }
}

fn number(m: &serde_json::Map<String, Value>, k: &str) -> ApiResult<Option<f64>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid(
            k,
            format!("`{k}` must be a number, got {other}"),
        )),
    }
}

pub fn uint(m: &serde_json::Map<String, Value>, k: &str) -> ApiResult<Option<u64>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(other) => Err(ApiError::invalid(
            k,
            format!("`{k}` must be a non-negative integer, got {other}"),
        )),
    }
}

pub fn boolean(m: &serde_json::Map<String, Value>, k: &str) -> ApiResult<Option<bool>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::invalid(
            k,
            format!("`{k}` must be a boolean, got {other}"),
        )),
    }
}

impl Common {
    pub fn parse(m: &serde_json::Map<String, Value>, max_tokens_keys: &[&str]) -> ApiResult<Self> {
        let model = match m.get("model") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::invalid("model", "`model` must be a string.")),
            None => return Err(ApiError::invalid("model", "`model` is required.")),
        };
        let mut max_tokens = None;
        for k in max_tokens_keys {
            if let Some(v) = uint(m, k)? {
                max_tokens = Some(v as usize);
            }
        }
        let temperature = number(m, "temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = number(m, "top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {top_p}"),
            ));
        }
        let n = uint(m, "n")?.unwrap_or(1) as usize;
        if n == 0 || n > MAX_N {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let stop = match m.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", "`stop` must be a string or a list of strings.")
                    })
                })
                .collect::<ApiResult<_>>()?,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stop",
                    "`stop` must be a string or a list of strings.",
                ));
            }
        };
        if stop.len() > 16 {
            return Err(ApiError::invalid("stop", "At most 16 stop sequences."));
        }
        let seed = match m.get("seed") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_i64().is_some() => Some(n.as_i64().unwrap_or(0) as u64),
            Some(other) => {
                return Err(ApiError::invalid(
                    "seed",
                    format!("`seed` must be an integer, got {other}"),
                ));
            }
        };
        let stream = boolean(m, "stream")?.unwrap_or(false);
        let include_usage = m
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            model,
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            n,
            stream,
            include_usage,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            seed,
        })
    }
}

/// A completions prompt: text or token ids, one or several.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

pub fn parse_prompts(v: Option<&Value>) -> ApiResult<Vec<Prompt>> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids.",
        )
    };
    let ids = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    let out = match v {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required."));
        }
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad()),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![Prompt::Ids(ids(a)?)],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| ids(x.as_array().map(Vec::as_slice).unwrap_or_default()).map(Prompt::Ids))
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(out)
}
