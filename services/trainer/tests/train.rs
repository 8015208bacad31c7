//! The candle engine on packed shards the packer wrote from the quickstart repository
//! (tests/fixtures/packed, made by `davinci pack`, see its README): the loss falls, a cancelled
//! run resumes to the uninterrupted run's weights bit for bit, bad inputs are refused before
//! training, masks and stages come from the sidecars and the manifest.
use davinci_core::megatron::{DType, MegatronWriter};
use davinci_model::{Device, Precision};
use davinci_trainer::config::{Overrides, StageConfig, TrainConfig};
use davinci_trainer::data::{Manifest, StageData, read_manifest};
use davinci_trainer::train::{self, Job, ModelSource, StepReport};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packed")
}

/// A small Qwen2 over the quickstart tokenizer's 1,505 ids.
const TINY: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
  "vocab_size": 1536, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1000000.0,
  "rms_norm_eps": 1e-6, "tie_word_embeddings": true}"#;

fn job(out: &Path, model_json: &str, data: &Path, config: TrainConfig) -> Job {
    std::fs::create_dir_all(out).unwrap();
    let cfg = out.join("model.json");
    std::fs::write(&cfg, model_json).unwrap();
    let manifest = data.join("manifest.json");
    let config = config
        .resolve(&read_manifest(&manifest).unwrap(), &Overrides::default())
        .unwrap();
    Job {
        manifest,
        model: ModelSource::Config(cfg),
        out: out.join("run"),
        config,
        device: Device::Cpu,
        precision: Precision::F32,
    }
}

fn base_config(steps: u64, every: u64) -> TrainConfig {
    TrainConfig {
        // 11 bins, 4 per step: epochs enough for `steps`
        stages: vec![StageConfig {
            max_steps: Some(steps),
            lr: 3e-3,
            epochs: 10,
            ..StageConfig::mid_training("stage1")
        }],
        global_batch: 4,
        micro_batch: 2,
        seed: 7,
        checkpoint_every: every,
        ..Default::default()
    }
}

fn run(job: &Job, stop_after: Option<u64>) -> (Vec<StepReport>, anyhow::Result<train::Summary>) {
    let cancel = AtomicBool::new(false);
    let mut seen = Vec::new();
    let res = train::train(
        job,
        &mut |r| {
            seen.push(r.clone());
            if Some(r.step) == stop_after {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    (seen, res)
}

#[test]
fn loss_falls_on_packed_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), TINY, &fixture(), base_config(12, 100));
    let (steps, res) = run(&j, None);
    let s = res.unwrap();
    assert_eq!(s.steps, 12);
    let first: f64 = steps[..3].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    let last: f64 = steps[9..].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    let curve: Vec<String> = steps.iter().map(|r| format!("{:.3}", r.loss)).collect();
    println!("loss per step: {}", curve.join(" "));
    assert!(last < first - 0.5, "loss {first} -> {last}");
    // the initial loss is that of a near-uniform guess over the vocabulary
    assert!(
        (steps[0].loss - (1536f64).ln()).abs() < 0.5,
        "{}",
        steps[0].loss
    );
    // the JSON log has every step, the last checkpoint is a Hugging Face directory
    let log = std::fs::read_to_string(j.out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 12);
    let ck = j.out.join("checkpoints/12");
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        assert!(ck.join(f).exists(), "{f}");
    }
}

#[test]
fn cancelled_run_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = job(&tmp.path().join("a"), TINY, &fixture(), base_config(6, 2));
    let (a, res) = run(&whole, None);
    res.unwrap();
    let split = job(&tmp.path().join("b"), TINY, &fixture(), base_config(6, 2));
    let (_, res) = run(&split, Some(3));
    assert!(res.unwrap_err().to_string().contains("cancelled at step 3"));
    assert!(split.out.join("checkpoints/3/state.json").exists());
    let (b, res) = run(&split, None);
    assert_eq!(res.unwrap().resumed_from, Some(3));
    assert_eq!(b.first().unwrap().step, 4);
    for (x, y) in a[3..].iter().zip(&b) {
        assert_eq!((x.step, x.loss.to_bits()), (y.step, y.loss.to_bits()));
    }
    let w = |j: &Job| std::fs::read(j.out.join("checkpoints/6/model.safetensors")).unwrap();
    assert!(w(&whole) == w(&split), "final weights differ");
    let o = |j: &Job| std::fs::read(j.out.join("checkpoints/6/optimizer.safetensors")).unwrap();
    assert!(o(&whole) == o(&split), "final optimizer state differs");
    // a different config in the same directory is refused, not silently resumed
    let other = job(&tmp.path().join("b"), TINY, &fixture(), base_config(7, 2));
    assert!(
        run(&other, None)
            .1
            .unwrap_err()
            .to_string()
            .contains("another manifest")
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn first_bin(data: &Path) -> PathBuf {
    let m = read_manifest(&data.join("manifest.json")).unwrap();
    data.join(format!("{}.bin", m.stages[0].datasets[0].shards[0].prefix))
}

#[test]
fn refuses_bad_inputs_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |j: &Job| run(j, None).1.unwrap_err().to_string();
    // a truncated shard
    let data = tmp.path().join("truncated");
    copy_dir(&fixture(), &data);
    let bin = first_bin(&data);
    let len = std::fs::metadata(&bin).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bin)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    let e = format!(
        "{:#}",
        run(
            &job(&tmp.path().join("o1"), TINY, &data, base_config(2, 10)),
            None
        )
        .1
        .unwrap_err()
    );
    assert!(e.contains("truncated"), "{e}");
    // a missing shard
    std::fs::remove_file(&bin).unwrap();
    let e = format!(
        "{:#}",
        run(
            &job(&tmp.path().join("o2"), TINY, &data, base_config(2, 10)),
            None
        )
        .1
        .unwrap_err()
    );
    assert!(e.contains("reading shard file"), "{e}");
    // ids past the model's vocabulary
    let small = TINY.replace("1536", "1000");
    let e = err(&job(
        &tmp.path().join("o3"),
        &small,
        &fixture(),
        base_config(2, 10),
    ));
    assert!(e.contains("vocab"), "{e}");
    // an unsupported architecture
    let llama = TINY.replace("\"qwen2\"", "\"llama\"");
    let e = err(&job(
        &tmp.path().join("o4"),
        &llama,
        &fixture(),
        base_config(2, 10),
    ));
    assert!(e.contains("model_type `llama`"), "{e}");
    // a model directory whose tokenizer is not the data's
    let hf = tmp.path().join("hf");
    let m = davinci_model::Qwen2::new_random(
        davinci_model::Qwen2Config::from_json(TINY).unwrap(),
        &Device::Cpu,
        Precision::F32,
        1,
    )
    .unwrap();
    davinci_model::checkpoint::save_hf(&m, &hf).unwrap();
    std::fs::write(hf.join("tokenizer.json"), "{}").unwrap();
    let mut j = job(&tmp.path().join("o5"), TINY, &fixture(), base_config(2, 10));
    j.model = ModelSource::Pretrained(hf);
    let e = err(&j);
    assert!(e.contains("sha256") && e.contains("repack"), "{e}");
    // a stage the manifest does not have
    let mut c = base_config(2, 10);
    c.stages[0].name = "stage9".into();
    let e = c
        .resolve(
            &read_manifest(&fixture().join("manifest.json")).unwrap(),
            &Overrides::default(),
        )
        .and_then(|c| {
            let mut j = job(&tmp.path().join("o6"), TINY, &fixture(), base_config(2, 10));
            j.config = c;
            run(&j, None).1
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("stage `stage9` is not in the manifest"), "{e}");
}

/// A hand-made SFT stage: two datasets (one upsampled ×2.5), masks from the sidecar.
#[test]
fn masks_and_upsampling_come_from_the_shards_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("sft")).unwrap();
    let mut shards = Vec::new();
    for (name, bins) in [("env-pass", 2u32), ("env-fail", 4)] {
        let prefix = format!("sft/{name}-00000");
        let mut ids = MegatronWriter::new(Vec::new(), DType::U16);
        let mut mask = MegatronWriter::new(Vec::new(), DType::U8);
        for b in 0..bins {
            for d in 0..2 {
                ids.add_sequence(&[b * 10 + d, 5, 6, 7]).unwrap();
                mask.add_sequence(&[0, 1, 0, 1]).unwrap();
            }
            ids.end_document();
            mask.end_document();
        }
        let (mut ix, mut mx) = (Vec::new(), Vec::new());
        std::fs::write(
            root.join(format!("{prefix}.bin")),
            ids.finish(&mut ix).unwrap(),
        )
        .unwrap();
        std::fs::write(root.join(format!("{prefix}.idx")), ix).unwrap();
        std::fs::write(
            root.join(format!("{prefix}.mask.bin")),
            mask.finish(&mut mx).unwrap(),
        )
        .unwrap();
        std::fs::write(root.join(format!("{prefix}.mask.idx")), mx).unwrap();
        shards.push(serde_json::json!({
            "name": name, "prefix": format!("sft/{name}"), "mask": "assistant-only",
            "upsample": if name == "env-pass" { 2.5 } else { 1.0 }, "weight": null,
            "documents": bins * 2, "tokens": bins * 8, "bins": bins, "padding_ratio": 0.0,
            "split_documents": 0, "loss_tokens": bins * 4, "drops": {},
            "shards": [{"prefix": prefix, "sequences": bins * 2, "bins": bins,
                        "tokens": bins * 8, "bin_bytes": bins * 8 * 2}]
        }));
    }
    let manifest: Manifest = serde_json::from_value(serde_json::json!({
        "schema": "davinci.packed/v1",
        "tokenizer": {"name": "t", "sha256": "x", "vocab_size": 100, "eod_token": "<e>",
                      "eod_id": 7, "engine": "hf-tokenizers"},
        "seq_len": 8, "seed": 0, "dtype": "u16", "long_docs": "drop",
        "stages": [{"name": "sft", "mask": "assistant-only", "datasets": shards, "tokens": 0,
                    "effective_tokens": 0.0, "blend": ""}],
        "records": {}, "drops": {}
    }))
    .unwrap();
    let stage = StageData::open(root, &manifest.stages[0], 100, 3).unwrap();
    assert!(stage.assistant_only);
    // 2 bins × 2.5 = 5 rows of env-pass, 4 of env-fail
    assert_eq!(stage.rows_per_epoch(), 9);
    let plan = stage.epoch_plan(0, 0);
    assert_eq!(plan.iter().filter(|r| r.dataset == 0).count(), 5);
    assert_eq!(plan, stage.epoch_plan(0, 0), "same seed, same order");
    assert_ne!(plan, stage.epoch_plan(0, 1), "every epoch reshuffles");
    let row = stage.row(plan[0]).unwrap();
    assert_eq!(row.doc_lens, [4, 4]);
    assert_eq!(row.mask, [0, 1, 0, 1, 0, 1, 0, 1]);
    // loss on the predictions of tokens 5 and 7 of each document: 4 per row
    let b = davinci_model::Batch::from_rows(&[row]).unwrap();
    assert_eq!(b.loss_tokens(), 4.0);
    // the SFT defaults when the job names no stages
    let c = TrainConfig::default()
        .resolve(&manifest, &Overrides::default())
        .unwrap();
    assert_eq!((c.stages[0].lr, c.stages[0].epochs), (1e-5, 5));
}
