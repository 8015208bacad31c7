//! The KV-cache path against transformers and against the training forward.
//!
//! Fixtures: `generate.json` / `generate.safetensors` from `scripts/gen_model_fixtures.py
//! gen-generate` (transformers' greedy `generate`, one prompt at a time, with the logits of
//! every step). Our batched generation runs all prompts, of different lengths, together.
use davinci_model::checkpoint::{load_hf, load_tensors};
use davinci_model::{Batch, Device, KvCache, Precision, Row, SamplingParams, Step, Tensor};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn greedy_equals_transformers(name: &str) {
    let dir = fixture(name);
    let model = load_hf(&dir, &Device::Cpu, Precision::F32).unwrap();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate.json")).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(g["prompts"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(g["greedy"].clone()).unwrap();
    let new = g["max_new_tokens"].as_u64().unwrap() as usize;
    let got = model
        .generate(&prompts, new, &[], &SamplingParams::default())
        .unwrap();
    assert_eq!(
        got, want,
        "{name}: batched greedy tokens differ from transformers"
    );

    // Step logits, one prompt at a time through the cache, against transformers' scores.
    let scores = load_tensors(&dir.join("generate.safetensors")).unwrap();
    let mut worst = 0f32;
    for (i, p) in prompts.iter().enumerate() {
        let reference = &scores[&format!("scores.{i}")];
        let mut cache = KvCache::new(&model);
        let mut next = p.clone();
        for (s, &token) in want[i].iter().enumerate() {
            let logits = model
                .forward_cached(&mut [Step {
                    tokens: &next,
                    cache: &mut cache,
                    all_logits: false,
                }])
                .unwrap()
                .remove(0);
            worst = worst.max(max_abs_diff(&logits, &reference.narrow(0, s, 1).unwrap()));
            next = vec![token];
        }
        // the last token is sampled, never fed
        assert_eq!(cache.len(), p.len() + new - 1);
    }
    eprintln!("{name}: step logits vs transformers max |diff| {worst:.2e}");
    assert!(worst < 1e-4, "{name}: step logits differ by {worst}");
}

#[test]
fn greedy_generation_equals_transformers_untied() {
    greedy_equals_transformers("tiny-qwen2");
}

#[test]
fn greedy_generation_equals_transformers_tied() {
    greedy_equals_transformers("tiny-qwen2-tied");
}

/// Prefill in one step, in two chunks, and the training forward give the same logits.
#[test]
fn cached_prefill_equals_training_forward() {
    let model = load_hf(&fixture("tiny-qwen2"), &Device::Cpu, Precision::F32).unwrap();
    let ids: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % 97).collect();
    let batch = Batch::from_rows(&[Row {
        tokens: ids.clone(),
        mask: vec![1; ids.len()],
        doc_lens: vec![ids.len()],
    }])
    .unwrap();
    let train = model.forward(&batch).unwrap();

    let mut one = KvCache::new(&model);
    let whole = model
        .forward_cached(&mut [Step {
            tokens: &ids,
            cache: &mut one,
            all_logits: true,
        }])
        .unwrap()
        .remove(0);
    assert!(max_abs_diff(&whole, &train) < 1e-5);

    // Two sequences in one step: a chunk continuing a cache beside a fresh prompt.
    let mut two = KvCache::new(&model);
    model
        .forward_cached(&mut [Step {
            tokens: &ids[..6],
            cache: &mut two,
            all_logits: true,
        }])
        .unwrap();
    let mut other = KvCache::new(&model);
    let out = model
        .forward_cached(&mut [
            Step {
                tokens: &ids[6..],
                cache: &mut two,
                all_logits: true,
            },
            Step {
                tokens: &ids[..4],
                cache: &mut other,
                all_logits: true,
            },
        ])
        .unwrap();
    assert!(max_abs_diff(&out[0], &train.narrow(0, 6, 7).unwrap()) < 1e-5);
    assert!(max_abs_diff(&out[1], &train.narrow(0, 0, 4).unwrap()) < 1e-5);
    assert_eq!((two.len(), other.len()), (13, 4));
}

#[test]
fn refuses_ids_outside_the_vocabulary() {
    let model = load_hf(&fixture("tiny-qwen2"), &Device::Cpu, Precision::F32).unwrap();
    let mut c = KvCache::new(&model);
    let err = model
        .forward_cached(&mut [Step {
            tokens: &[3, 97],
            cache: &mut c,
            all_logits: false,
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the model's vocabulary"), "{err}");
    assert!(c.is_empty(), "a refused step leaves the cache as it was");
}
