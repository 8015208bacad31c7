//! Parity with Hugging Face transformers on committed fixtures (scripts/gen_model_fixtures.py):
//! a tiny random Qwen2 (tied and untied) and two packed rows, one holding two documents.
//! Logits and loss within 1e-4, gradients within 1e-3 relative; no torch needed.
use davinci_model::checkpoint::{load_hf, load_tensors, save_hf};
use davinci_model::{Batch, Device, Grads, Precision, Row, Tensor};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's rows (padding, segment -1, dropped) and where each real token sits in `[B, T]`.
fn rows(dir: &Path) -> (Vec<Row>, Vec<(usize, usize)>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    let get = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(v[k].clone()).unwrap() };
    let (ids, seg, mask) = (get("ids"), get("segments"), get("mask"));
    let mut rows = Vec::new();
    let mut at = Vec::new();
    for r in 0..ids.len() {
        let mut row = Row::default();
        for t in 0..ids[r].len() {
            if seg[r][t] < 0 {
                continue;
            }
            if t == 0 || seg[r][t] != seg[r][t - 1] {
                row.doc_lens.push(0);
            }
            *row.doc_lens.last_mut().unwrap() += 1;
            row.tokens.push(ids[r][t] as u32);
            row.mask.push(mask[r][t] as u8);
            at.push((r, t));
        }
        rows.push(row);
    }
    (rows, at)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(name: &str) {
    let dir = fixture(name);
    let model = load_hf(&dir, &Device::Cpu, Precision::F32).unwrap();
    let reference = load_tensors(&dir.join("reference.safetensors")).unwrap();
    let loss_ref = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.join("reference.json")).unwrap(),
    )
    .unwrap()["loss"]
        .as_f64()
        .unwrap();
    let (rows, at) = rows(&dir);
    let batch = Batch::from_rows(&rows).unwrap();
    let logits = model.forward(&batch).unwrap();
    // the reference logits at every real token, in stream order
    let ref_all = &reference["logits"];
    let picked: Vec<Tensor> = at
        .iter()
        .map(|&(r, t)| ref_all.get(r).unwrap().get(t).unwrap())
        .collect();
    let ref_logits = Tensor::stack(&picked, 0).unwrap();
    let d_logits = max_abs(&(&logits - &ref_logits).unwrap());
    let loss = (model.loss_sum_of(&logits, &batch).unwrap() / batch.loss_tokens()).unwrap();
    let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
    let mut grads = Grads::new(model.params().len());
    grads
        .accumulate(model.params(), &loss.backward().unwrap())
        .unwrap();
    assert!(grads.missing(model.params()).is_empty());
    let mut worst = (0f32, String::new());
    for ((n, _), g) in model.params().iter().zip(&grads.slots) {
        let r = &reference[&format!("grad.{n}")];
        let rel = max_abs(&(g.as_ref().unwrap() - r).unwrap()) / max_abs(r);
        if rel > worst.0 {
            worst = (rel, n.clone());
        }
    }
    println!(
        "{name}: max |logits - transformers| = {d_logits:.2e}, loss {got_loss:.7} vs {loss_ref:.7}, \
         worst grad relative error {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(d_logits <= 1e-4, "logits differ by {d_logits}");
    assert!(
        (got_loss - loss_ref).abs() <= 1e-4,
        "loss {got_loss} vs {loss_ref}"
    );
    assert!(
        worst.0 <= 1e-3,
        "gradient of {} off by {} relative",
        worst.1,
        worst.0
    );
}

#[test]
fn matches_transformers_untied() {
    check("tiny-qwen2");
}

#[test]
fn matches_transformers_tied() {
    check("tiny-qwen2-tied");
}

/// Theirs loads in ours (above); ours written back loads in ours unchanged, carries the
/// metadata transformers expects, and — where a torch venv is configured — loads in
/// transformers with the fixture's logits.
#[test]
fn our_checkpoint_round_trips() {
    for name in ["tiny-qwen2", "tiny-qwen2-tied"] {
        let dir = fixture(name);
        let model = load_hf(&dir, &Device::Cpu, Precision::F32).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_hf(&model, out.path()).unwrap();
        let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata().as_ref().and_then(|m| m.get("format")),
            Some(&"pt".to_string())
        );
        let theirs = load_tensors(&dir.join("model.safetensors")).unwrap();
        let ours = load_tensors(&out.path().join("model.safetensors")).unwrap();
        let mut a: Vec<_> = theirs.keys().collect();
        let mut b: Vec<_> = ours.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: same tensor names as transformers writes");
        assert_eq!(
            ours.contains_key("lm_head.weight"),
            !model.config.tie_word_embeddings
        );
        for (k, t) in &theirs {
            assert_eq!(max_abs(&(t - &ours[k]).unwrap()), 0.0, "{k}");
        }
        let back = load_hf(out.path(), &Device::Cpu, Precision::F32).unwrap();
        assert_eq!(
            back.config,
            load_hf(out.path(), &Device::Cpu, Precision::F32)
                .unwrap()
                .config
        );
        match std::env::var("DAVINCI_TORCH_PYTHON") {
            Ok(py) if !py.is_empty() => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../scripts/gen_model_fixtures.py");
                let st = std::process::Command::new(py)
                    .arg(script)
                    .arg("check-ours")
                    .arg(out.path())
                    .arg(&dir)
                    .status()
                    .unwrap();
                assert!(
                    st.success(),
                    "transformers did not reproduce the logits of our {name} checkpoint"
                );
            }
            _ => println!(
                "SKIP transformers load of our {name} checkpoint: set DAVINCI_TORCH_PYTHON to a python with torch + transformers"
            ),
        }
    }
}
