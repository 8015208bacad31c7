//! Partitioned dedup drops exactly what the one-process rule drops, for several partition
//! counts, on synthetic PRs with planted exact and near duplicates; steps rerun after a
//! "killed" worker give the same result, and a step whose inputs are missing refuses to run.
use davinci_core::sample::SampleSource;
use davinci_core::synth::{self, Planted, Synth, SynthConfig};
use davinci_reconstructor::filters::MinHashLsh;
use davinci_reconstructor::partition::{PartitionedDedup, Parts, Resolution};
use davinci_reconstructor::pipeline::{Candidate, Verdict};
use davinci_reconstructor::{
    EnhanceConfig, Enhancer, ReconstructConfig, Reconstructor, word_counter,
};
use std::collections::HashSet;
use std::sync::Arc;

const N: u64 = 1500;
const SHARD: usize = 97;

/// Candidates of records `0..N` in input order, each with the record it came from.
async fn render(cfg: &ReconstructConfig, synth: &Synth) -> (Vec<Candidate>, Vec<u64>) {
    let mut recon = Reconstructor::new(cfg.clone(), word_counter()).unwrap();
    let enhancer = Enhancer::new(None, EnhanceConfig::default());
    let (mut cands, mut origin) = (Vec::new(), Vec::new());
    for i in 0..N {
        let (pr, _) = synth.record(i);
        let (enh, prov) = enhancer.enhance(&pr).await;
        for c in recon.render(pr, &enh, &prov) {
            cands.push(c);
            origin.push(i);
        }
    }
    (cands, origin)
}

fn lsh(cfg: &ReconstructConfig) -> MinHashLsh {
    MinHashLsh::new(
        cfg.near_dup_threshold,
        cfg.minhash_perms,
        cfg.minhash_shingle,
    )
}

async fn partitioned(
    cfg: &ReconstructConfig,
    cands: &[Candidate],
    p: u32,
    dir: &std::path::Path,
) -> Vec<Verdict> {
    let store =
        davinci_runtime::blob::open(&format!("file://{}", dir.display()), &Default::default())
            .await
            .unwrap();
    let pd = PartitionedDedup::new(store.clone(), &format!("dedup-{p}"), p, lsh(cfg));
    let chunks: Vec<&[Candidate]> = cands.chunks(SHARD).collect();
    let parts = Parts::from_counts(&chunks.iter().map(|c| c.len() as u64).collect::<Vec<_>>());
    // Workers finish in any order; part 1's worker is "killed" after its map and reruns it.
    for k in (0..chunks.len()).rev() {
        pd.map_part(k, parts.starts[k], chunks[k]).await.unwrap();
    }
    pd.map_part(1, parts.starts[1], chunks[1]).await.unwrap();
    for q in 0..p as usize {
        pd.reduce_bands(q, &parts).await.unwrap();
        pd.reduce_exact(q, &parts).await.unwrap();
    }
    for k in 0..parts.len() {
        pd.join_part(k, &parts).await.unwrap();
    }
    pd.join_part(0, &parts).await.unwrap();
    pd.ready_to_resolve(&parts).await.unwrap();
    let mut state = Resolution::default();
    let mut out = Vec::new();
    for k in 0..parts.len() {
        out.extend(pd.resolve_part(k, &parts, &mut state).await.unwrap().0);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_dedup_equals_one_process() {
    let cfg = ReconstructConfig::default();
    let synth = Synth::new(SynthConfig {
        seed: 7,
        exact_dup_share: 0.05,
        near_dup_share: 0.15,
        near_edit_max: 0.12,
        ..SynthConfig::default()
    });
    let (cands, origin) = render(&cfg, &synth).await;
    let mut one = Reconstructor::new(cfg.clone(), word_counter()).unwrap();
    let expected: Vec<Verdict> = cands
        .iter()
        .map(|c| one.dedup_verdict(c).unwrap())
        .collect();
    let count = |v: Verdict| expected.iter().filter(|&&x| x == v).count();
    assert!(
        count(Verdict::Duplicate) > 50 && count(Verdict::NearDuplicate) > 100,
        "the set gives dedup work: {} exact, {} near of {}",
        count(Verdict::Duplicate),
        count(Verdict::NearDuplicate),
        cands.len()
    );

    let tmp = tempfile::tempdir().unwrap();
    for p in [1, 3, 8] {
        let got = partitioned(&cfg, &cands, p, tmp.path()).await;
        assert_eq!(got.len(), expected.len());
        let diff: Vec<usize> = (0..got.len()).filter(|&g| got[g] != expected[g]).collect();
        assert!(
            diff.is_empty(),
            "P={p}: {} verdicts differ from one-process dedup, first at candidate {} ({}): {:?} vs {:?}",
            diff.len(),
            diff[0],
            cands[diff[0]].sample.id,
            got[diff[0]],
            expected[diff[0]]
        );
    }

    let planted: Vec<_> = (0..N).filter_map(|i| synth.record(i).1).collect();
    for format in [SampleSource::CtxGeneral, SampleSource::CtxPython] {
        let of = |v: Option<Verdict>| -> HashSet<u64> {
            (0..cands.len())
                .filter(|&g| cands[g].sample.source == format && v.is_none_or(|v| expected[g] == v))
                .map(|g| origin[g])
                .collect()
        };
        let eligible = of(None);
        for (kind, v) in [
            (Planted::Exact, Verdict::Duplicate),
            (Planted::Near, Verdict::NearDuplicate),
        ] {
            let s = synth::score(&planted, kind, &eligible, &of(Some(v)));
            println!("{} {kind:?}: {s:?}", format.as_str());
            assert!(s.planted > 10, "{s:?}");
            if kind == Planted::Exact {
                assert_eq!((s.precision, s.recall), (1.0, 1.0), "{s:?}");
            } else {
                // Copies edited past the threshold are missed by design (recall < 1); what is
                // dropped as near is a planted copy.
                assert!(s.precision > 0.95 && s.recall > 0.3, "{s:?}");
                let light: Vec<_> = planted
                    .iter()
                    .filter(|p| p.edit_share < 0.005)
                    .cloned()
                    .collect();
                let l = synth::score(&light, kind, &eligible, &of(Some(v)));
                println!("{} {kind:?}, edit share < 0.5%: {l:?}", format.as_str());
                assert!(l.planted > 3 && l.recall > 0.9, "{l:?}");
            }
        }
    }
}

#[tokio::test]
async fn a_step_with_missing_inputs_refuses_to_run() {
    let cfg = ReconstructConfig::default();
    let synth = Synth::new(SynthConfig::default());
    let enhancer = Enhancer::new(None, EnhanceConfig::default());
    let mut recon = Reconstructor::new(cfg.clone(), word_counter()).unwrap();
    let mut cands = Vec::new();
    for i in 0..20 {
        let (pr, _) = synth.record(i);
        let (enh, prov) = enhancer.enhance(&pr).await;
        cands.extend(recon.render(pr, &enh, &prov));
    }
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn davinci_runtime::blob::BlobStore> = davinci_runtime::blob::open(
        &format!("file://{}", tmp.path().display()),
        &Default::default(),
    )
    .await
    .unwrap();
    let pd = PartitionedDedup::new(store, "d", 2, lsh(&cfg));
    let parts = Parts::from_counts(&[10, cands.len() as u64 - 10]);
    pd.map_part(0, 0, &cands[..10]).await.unwrap();
    let e = pd.reduce_exact(0, &parts).await.unwrap_err().to_string();
    assert!(e.contains("`map` 1") && e.contains("run it"), "{e}");
    pd.map_part(1, 10, &cands[10..]).await.unwrap();
    pd.reduce_exact(0, &parts).await.unwrap();
    pd.reduce_exact(1, &parts).await.unwrap();
    pd.reduce_bands(0, &parts).await.unwrap();
    let e = pd.join_part(0, &parts).await.unwrap_err().to_string();
    assert!(e.contains("`bands` 1"), "{e}");
    let e = pd.ready_to_resolve(&parts).await.unwrap_err().to_string();
    assert!(e.contains("`join` 0"), "{e}");
}
