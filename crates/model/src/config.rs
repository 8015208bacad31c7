//! The Qwen2 architecture as a Hugging Face `config.json` describes it.
//!
//! Both spellings of the RoPE base are read: `rope_theta` at the top (Qwen2.5's own files,
//! transformers 4.x) and `rope_parameters.rope_theta` (transformers 5). Keys this crate does not
//! use are kept and written back, so a fine-tuned checkpoint keeps its token ids and generation
//! settings.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A validated Qwen2 configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    // Absent keys stay absent on save: transformers reads `head_dim: null` as a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Everything else in the file, written back unchanged on save.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_max_positions() -> usize {
    32_768
}

fn default_act() -> String {
    "silu".into()
}

impl Qwen2Config {
    /// Parses and validates `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Qwen2Config =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The RoPE base, from whichever key the file uses (10,000 when neither is present, as in
    /// transformers' default).
    pub fn rope_base(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.extra
                    .get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Refuses what this implementation would compute differently from transformers.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Some(t) = self.extra.get("model_type").and_then(Value::as_str)
            && t != "qwen2"
        {
            return bad(format!(
                "model_type `{t}` is not supported (only qwen2: Qwen2 / Qwen2.5)"
            ));
        }
        if let Some(a) = self.extra.get("architectures").and_then(Value::as_array)
            && !a.iter().any(|x| x.as_str() == Some("Qwen2ForCausalLM"))
        {
            return bad(format!(
                "architectures {a:?} does not name Qwen2ForCausalLM, the only supported architecture"
            ));
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if v == 0 {
                return bad(format!("{k} must be > 0"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {} (GQA groups)",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (Qwen2 uses silu / SwiGLU)",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad("rms_norm_eps must be > 0".into());
        }
        if self
            .extra
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return bad("use_sliding_window: true is not supported (full attention only)".into());
        }
        let scaling = self
            .extra
            .get("rope_scaling")
            .or_else(|| self.extra.get("rope_parameters"));
        if let Some(s) = scaling.filter(|s| !s.is_null()) {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return bad(format!(
                    "RoPE scaling `{kind}` is not supported (plain RoPE only)"
                ));
            }
        }
        let base = self.rope_base();
        if !(base > 0.0 && base.is_finite()) {
            return bad(format!("rope_theta {base} must be > 0"));
        }
        Ok(())
    }

    /// Every parameter as (Hugging Face name, `[out, in]` shape), in checkpoint order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let d = self.head_dim();
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (n, s) in [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.q_proj.bias", vec![q]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.k_proj.bias", vec![kv]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.bias", vec![kv]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                out.push((format!("{p}.{n}"), s));
            }
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        out
    }

    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// `config.json` text for a float32 checkpoint.
    pub fn to_json(&self) -> Result<String> {
        let mut c = self.clone();
        c.extra
            .insert("torch_dtype".into(), Value::String("float32".into()));
        if c.extra.contains_key("dtype") {
            c.extra
                .insert("dtype".into(), Value::String("float32".into()));
        }
        c.extra
            .entry("architectures")
            .or_insert_with(|| Value::Array(vec![Value::String("Qwen2ForCausalLM".into())]));
        c.extra
            .entry("model_type")
            .or_insert_with(|| Value::String("qwen2".into()));
        if c.rope_theta.is_none() && !c.extra.contains_key("rope_parameters") {
            c.rope_theta = Some(self.rope_base());
        }
        serde_json::to_string_pretty(&c).map_err(|e| Error::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-0.5B's published config.json.
    const QWEN25_05B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936
}"#;

    #[test]
    fn qwen25_05b_shape_and_parameter_count() {
        let c = Qwen2Config::from_json(QWEN25_05B).unwrap();
        assert_eq!(c.head_dim(), 64);
        assert_eq!(c.rope_base(), 1e6);
        // The published count for Qwen2.5-0.5B (tied embeddings, no lm_head).
        assert_eq!(c.num_parameters(), 494_032_768);
        let names: Vec<_> = c.parameter_shapes().into_iter().map(|(n, _)| n).collect();
        assert!(!names.iter().any(|n| n == "lm_head.weight"));
        let json = c.to_json().unwrap();
        assert!(
            !json.contains("head_dim"),
            "absent keys are not written as null"
        );
        let back = Qwen2Config::from_json(&json).unwrap();
        assert_eq!(back.extra["bos_token_id"], 151643);
        assert_eq!(back.extra["torch_dtype"], "float32");
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let with = |k: &str, v: &str| {
            let mut m: Map<String, Value> = serde_json::from_str(QWEN25_05B).unwrap();
            m.insert(k.into(), serde_json::from_str(v).unwrap());
            Qwen2Config::from_json(&serde_json::to_string(&m).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(with("model_type", "\"llama\"").contains("model_type `llama`"));
        assert!(with("architectures", "[\"LlamaForCausalLM\"]").contains("Qwen2ForCausalLM"));
        assert!(with("num_key_value_heads", "4").contains("GQA"));
        assert!(with("hidden_act", "\"gelu\"").contains("hidden_act"));
        assert!(with("use_sliding_window", "true").contains("sliding"));
        assert!(with("rope_scaling", "{\"type\": \"yarn\", \"factor\": 4}").contains("yarn"));
        assert!(with("vocab_size", "\"big\"").contains("config.json"));
    }

    #[test]
    fn rope_base_from_transformers_5_layout() {
        let c = Qwen2Config::from_json(
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_base(), 5000.0);
        assert!(c.to_json().unwrap().contains("rope_parameters"));
    }
}
