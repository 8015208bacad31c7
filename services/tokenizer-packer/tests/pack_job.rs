//! End-to-end pack job on the project's tiny tokenizer: shards are readable by our Megatron
//! reader, every document comes back intact, masks and the manifest are right.
use davinci_core::megatron::{DType, MegatronIndex};
use davinci_core::sample::{Sample, SampleMetadata, SampleSource};
use davinci_core::traj::{Message, Outcome, Trajectory};
use davinci_tokenize::Tokenizer;
use davinci_tokenizer_packer::input::Input;
use davinci_tokenizer_packer::mixture::Mixture;
use davinci_tokenizer_packer::packing::{LongDocs, PackConfig};
use davinci_tokenizer_packer::pipeline::{self, PackOptions};
use std::sync::atomic::AtomicBool;

const TOK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crates/tokenize/tests/fixtures/tiny-qwen-shape.json"
);

fn sample(i: usize, source: SampleSource) -> Sample {
    Sample {
        id: format!("s{i}"),
        text: format!("def f{i}(x):\n    return x * {i}  # naïve\n").repeat(1 + i % 7),
        source,
        metadata: SampleMetadata::default(),
    }
}

fn traj(i: usize, resolved: bool) -> Trajectory {
    let m = |role: &str, c: String| Message {
        role: role.into(),
        content: Some(c),
        tool_calls: vec![],
        ..Default::default()
    };
    Trajectory {
        schema: "davinci.traj/v1".into(),
        id: format!("t{i}"),
        task_id: "x".into(),
        model: "m".into(),
        tools: vec![],
        messages: vec![
            m("user", format!("fix bug {i}")),
            m("assistant", format!("patched {i}")),
        ],
        outcome: Outcome {
            resolved,
            exit_status: "submitted".into(),
            tests: Default::default(),
        },
        n_tokens: None,
        run: None,
        metadata: Default::default(),
    }
}

#[test]
fn pack_job_writes_megatron_shards_and_manifest() {
    let tok = Tokenizer::from_file(TOK).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let mut texts: Vec<(SampleSource, String)> = Vec::new();
    for i in 0..60 {
        let src = [SampleSource::CtxGeneral, SampleSource::CtxPython][i % 2];
        let s = sample(i, src);
        texts.push((src, s.text.clone()));
        lines.push(serde_json::to_string(&s).unwrap());
    }
    for i in 0..10 {
        lines.push(serde_json::to_string(&traj(i, i % 3 != 0)).unwrap());
    }
    lines.push("{not json".into());
    lines.push(
        serde_json::to_string(&Sample {
            text: String::new(),
            ..sample(999, SampleSource::CtxGeneral)
        })
        .unwrap(),
    );
    let data = lines.join("\n").into_bytes();
    let compressed = zstd::encode_all(&data[..], 3).unwrap();
    let inputs = [Input::Bytes {
        name: "in.jsonl.zst".into(),
        data: compressed,
    }];
    let opts = PackOptions {
        pack: PackConfig {
            seq_len: 256,
            window: 16,
            max_open_bins: 4,
            long_docs: LongDocs::Split,
            seed: 1,
        },
        shard_bytes: 2_000,
        batch: 8,
        ..Default::default()
    };
    let mut events = 0;
    let m = pipeline::run(
        &tok,
        &Mixture::default(),
        &opts,
        &inputs,
        dir.path(),
        &mut |_| events += 1,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(events > 5);
    assert_eq!(m.schema, "davinci.packed/v1");
    assert_eq!(m.dtype, DType::U16);
    assert_eq!(m.tokenizer.eod_id, 1500);
    assert_eq!(m.drops.get("bad_json"), Some(&1));
    assert_eq!(m.drops.get("empty_text"), Some(&1));
    assert_eq!(m.records.get("env-pass"), Some(&6));
    assert_eq!(m.records.get("env-fail"), Some(&4));
    let mut on_disk: pipeline::Manifest =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    // Floats may differ in the last bit after a JSON round trip; compare them apart.
    let mut mem = m.clone();
    for (a, b) in on_disk.stages.iter_mut().zip(mem.stages.iter_mut()) {
        for (x, y) in a.datasets.iter_mut().zip(b.datasets.iter_mut()) {
            assert!((x.padding_ratio - y.padding_ratio).abs() < 1e-12);
            (x.padding_ratio, y.padding_ratio) = (0.0, 0.0);
        }
    }
    assert_eq!(on_disk, mem);

    // stage1/ctx-general: every document comes back whole (seq_len is larger than each doc).
    let st1 = &m.stages[0];
    let ds = &st1.datasets[0];
    assert_eq!(ds.name, "ctx-general");
    assert!(ds.shards.len() > 1, "small shard_bytes must rotate shards");
    let mut got: Vec<Vec<u32>> = Vec::new();
    for sh in &ds.shards {
        let idx = MegatronIndex::parse(
            &std::fs::read(dir.path().join(format!("{}.idx", sh.prefix))).unwrap(),
        )
        .unwrap();
        let bin = std::fs::read(dir.path().join(format!("{}.bin", sh.prefix))).unwrap();
        let midx = MegatronIndex::parse(
            &std::fs::read(dir.path().join(format!("{}.mask.idx", sh.prefix))).unwrap(),
        )
        .unwrap();
        assert_eq!(midx.lengths, idx.lengths);
        assert_eq!(midx.doc_indices, idx.doc_indices);
        assert_eq!(idx.documents() as u64, sh.bins);
        for d in 0..idx.documents() {
            let total: i64 = idx.document(d).map(|i| idx.lengths[i] as i64).sum();
            assert!(total <= 256);
        }
        for i in 0..idx.lengths.len() {
            let ids = idx.sequence(&bin, i).unwrap();
            assert_eq!(*ids.last().unwrap(), 1500, "EOD ends each document");
            got.push(ids[..ids.len() - 1].to_vec());
        }
    }
    let mut want: Vec<Vec<u32>> = texts
        .iter()
        .filter(|(s, _)| *s == SampleSource::CtxGeneral)
        .map(|(_, t)| tok.encode_reference(t).unwrap())
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(ds.documents, 30);
    assert!(ds.padding_ratio >= 0.0 && ds.padding_ratio < 1.0);

    // stage2 blend: env-pass upsampled ×3; weights sum to 1.
    let st2 = &m.stages[1];
    let weights: Vec<f64> = st2
        .blend
        .split(' ')
        .step_by(2)
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(
        (weights.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "{}",
        st2.blend
    );
    assert!(st2.blend.contains("stage2/env-pass-00000"));
    let pass = st2.datasets.iter().find(|d| d.name == "env-pass").unwrap();
    assert_eq!(pass.upsample, 3.0);
    assert_eq!(
        st2.effective_tokens,
        st2.datasets
            .iter()
            .map(|d| d.upsample * d.tokens as f64)
            .sum::<f64>()
    );

    // SFT: assistant tokens only.
    let sft = &m.stages[2].datasets[0];
    assert!(
        sft.loss_tokens > 0 && sft.loss_tokens < sft.tokens / 2,
        "{sft:?}"
    );
    let sft_st2 = pass;
    assert_eq!(
        sft_st2.loss_tokens, sft_st2.tokens,
        "mid-training trains every token"
    );
}

#[test]
fn cancel_stops_the_job() {
    let tok = Tokenizer::from_file(TOK).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = serde_json::to_string(&sample(1, SampleSource::CtxGeneral))
        .unwrap()
        .into_bytes();
    let inputs = [Input::Bytes {
        name: "a.jsonl".into(),
        data,
    }];
    let err = pipeline::run(
        &tok,
        &Mixture::default(),
        &PackOptions::default(),
        &inputs,
        dir.path(),
        &mut |_| {},
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cancelled"));
    assert!(!dir.path().join("manifest.json").exists());
}
