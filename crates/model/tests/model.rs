//! Training properties of the model: every parameter gets a gradient, documents in one bin do
//! not see each other, bad checkpoints are refused by name, AdamW leaves norms and biases
//! undecayed.
use davinci_model::checkpoint::{load_hf, save_hf, save_tensors, weights};

/// A copy of the weights (the tensors `weights` returns share the live parameters' storage).
fn snapshot(m: &Qwen2) -> Vec<(String, Tensor)> {
    weights(m)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect()
}
use davinci_model::optim::decays;
use davinci_model::{
    AdamW, AdamWConfig, Batch, Device, Grads, Precision, Qwen2, Qwen2Config, Row, Tensor,
};

fn tiny(tied: bool) -> Qwen2Config {
    Qwen2Config::from_json(&format!(
        r#"{{"vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": {tied}, "initializer_range": 0.2}}"#
    ))
    .unwrap()
}

fn row(docs: &[&[u32]]) -> Row {
    Row {
        tokens: docs.iter().flat_map(|d| d.iter().copied()).collect(),
        mask: docs.iter().flat_map(|d| d.iter().map(|_| 1u8)).collect(),
        doc_lens: docs.iter().map(|d| d.len()).collect(),
    }
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    for tied in [false, true] {
        let m = Qwen2::new_random(tiny(tied), &Device::Cpu, Precision::F32, 3).unwrap();
        let b = Batch::from_rows(&[
            row(&[&[1, 2, 3, 4, 5], &[6, 7, 8]]),
            row(&[&[9, 10, 11, 12]]),
        ])
        .unwrap();
        let loss = m.loss_sum(&b).unwrap();
        let mut g = Grads::new(m.params().len());
        g.accumulate(m.params(), &loss.backward().unwrap()).unwrap();
        assert_eq!(g.missing(m.params()), Vec::<&str>::new(), "tied={tied}");
        for ((n, _), t) in m.params().iter().zip(&g.slots) {
            let a = t
                .as_ref()
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(a > 0.0 && a.is_finite(), "{n}: |grad| = {a}");
        }
        // one AdamW step moves every parameter
        let before = snapshot(&m);
        let mut opt = AdamW::new(m.params(), AdamWConfig::default()).unwrap();
        opt.update(m.params(), &g, 1e-3).unwrap();
        for ((n, old), (_, new)) in before.iter().zip(weights(&m).unwrap()) {
            let d = (old - new)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d > 0.0, "{n} did not move");
        }
    }
}

fn logits_of(m: &Qwen2, rows: &[Row], start: usize, len: usize) -> Vec<Vec<f32>> {
    let b = Batch::from_rows(rows).unwrap();
    m.forward(&b)
        .unwrap()
        .narrow(0, start, len)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn no_attention_across_documents() {
    let m = Qwen2::new_random(tiny(false), &Device::Cpu, Precision::F32, 5).unwrap();
    let doc: &[u32] = &[30, 31, 32, 33, 34, 35];
    let base = logits_of(&m, &[row(&[&[1, 2, 3, 4], doc, &[7, 8]])], 4, 6);
    // other documents' tokens changed, same lengths: bit for bit the same
    let same_len = logits_of(&m, &[row(&[&[50, 51, 52, 53], doc, &[60, 61]])], 4, 6);
    assert_eq!(base, same_len);
    // other documents of other lengths, and the document alone: equal to rounding
    let other = logits_of(&m, &[row(&[&[9; 13], doc])], 13, 6);
    let alone = logits_of(&m, &[row(&[doc])], 0, 6);
    for (a, b) in [(&base, &other), (&base, &alone)] {
        let d = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "document logits moved by {d}");
    }
    // and a position does see the earlier tokens of its own document
    let changed = logits_of(
        &m,
        &[row(&[&[1, 2, 3, 4], &[30, 40, 32, 33, 34, 35], &[7, 8]])],
        4,
        6,
    );
    assert_ne!(base[5], changed[5]);
}

#[test]
fn refuses_checkpoints_that_do_not_match_their_config() {
    let m = Qwen2::new_random(tiny(false), &Device::Cpu, Precision::F32, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf(&m, dir.path()).unwrap();
    let w = weights(&m).unwrap();
    let write = |ts: &[(String, Tensor)]| {
        save_tensors(&dir.path().join("model.safetensors"), ts).unwrap();
        load_hf(dir.path(), &Device::Cpu, Precision::F32)
            .unwrap_err()
            .to_string()
    };
    let missing: Vec<_> = w
        .iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .cloned()
        .collect();
    assert!(write(&missing).contains("model.norm.weight is missing"));
    let mut wrong = w.clone();
    wrong[0].1 = Tensor::zeros((65, 16), davinci_model::DType::F32, &Device::Cpu).unwrap();
    let e = write(&wrong);
    assert!(
        e.contains("model.embed_tokens.weight has shape [65, 16]"),
        "{e}"
    );
    let mut extra = w.clone();
    extra.push((
        "model.layers.2.input_layernorm.weight".into(),
        Tensor::ones(16, davinci_model::DType::F32, &Device::Cpu).unwrap(),
    ));
    assert!(write(&extra).contains("model.layers.2.input_layernorm.weight"));
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    assert!(
        load_hf(dir.path(), &Device::Cpu, Precision::F32)
            .unwrap_err()
            .to_string()
            .contains("config.json")
    );
    // token ids past the vocabulary are refused before any compute
    let b = Batch::from_rows(&[row(&[&[1, 64]])]).unwrap();
    assert!(
        m.forward(&b)
            .unwrap_err()
            .to_string()
            .contains("token id 64")
    );
}

#[test]
fn norms_and_biases_are_not_decayed() {
    assert!(!decays("model.layers.0.input_layernorm.weight"));
    assert!(!decays("model.norm.weight"));
    assert!(!decays("model.layers.3.self_attn.q_proj.bias"));
    assert!(decays("model.layers.3.self_attn.q_proj.weight"));
    assert!(decays("model.embed_tokens.weight"));
    // with a zero gradient only decayed parameters move
    let m = Qwen2::new_random(tiny(true), &Device::Cpu, Precision::F32, 2).unwrap();
    let mut g = Grads::new(m.params().len());
    for (s, (_, v)) in g.slots.iter_mut().zip(m.params()) {
        *s = Some(v.as_tensor().zeros_like().unwrap());
    }
    let before = snapshot(&m);
    let mut opt = AdamW::new(m.params(), AdamWConfig::default()).unwrap();
    opt.update(m.params(), &g, 0.1).unwrap();
    for ((n, old), (_, new)) in before.iter().zip(weights(&m).unwrap()) {
        let moved = (old - new)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0;
        let nonzero = old
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0;
        assert_eq!(moved, decays(n) && nonzero, "{n}");
    }
}
