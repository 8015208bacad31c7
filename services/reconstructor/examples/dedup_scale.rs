//! Partitioned dedup against the one-process rule on a synthetic corpus with planted
//! duplicates: checks that both drop exactly the same candidates, and prints precision and
//! recall against the planted copies, timings and the bytes the shuffle moves.
//!
//! `cargo run --release -p davinci-reconstructor --example dedup_scale -- N [P,P,…] [SEED]`
//! (defaults: 100000, 1,3,8, 1). The shuffle goes through a `file://` store in a temporary
//! directory.
use davinci_core::sample::SampleSource;
use davinci_core::synth::{self, Planted, Synth, SynthConfig};
use davinci_reconstructor::filters::MinHashLsh;
use davinci_reconstructor::partition::{Io, PartitionedDedup, Parts, Resolution};
use davinci_reconstructor::pipeline::Candidate;
use davinci_reconstructor::{
    EnhanceConfig, Enhancer, ReconstructConfig, Reconstructor, Verdict, word_counter,
};
use std::collections::HashSet;
use std::time::Instant;

/// Candidates per part, as one reconstructor input shard of 1,000 PRs gives about.
const PART: usize = 1500;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(Ok(100_000), |s| s.parse())?;
    let ps: Vec<u32> = args
        .get(2)
        .map_or("1,3,8", |s| s.as_str())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let seed: u64 = args.get(3).map_or(Ok(1), |s| s.parse())?;
    let cfg = ReconstructConfig::default();
    let synth = Synth::new(SynthConfig {
        seed,
        ..SynthConfig::default()
    });

    let t = Instant::now();
    let mut recon = Reconstructor::new(cfg.clone(), word_counter())?;
    let enhancer = Enhancer::new(None, EnhanceConfig::default());
    let (mut cands, mut origin, mut planted) = (Vec::<Candidate>::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (pr, truth) = synth.record(i);
        planted.extend(truth);
        let (enh, prov) = enhancer.enhance(&pr).await;
        for mut c in recon.render(pr, &enh, &prov) {
            // Dedup reads the text's hash and the signature only.
            c.sample.text = String::new();
            cands.push(c);
            origin.push(i);
        }
    }
    println!(
        "rendered {n} synthetic PRs into {} candidates in {:.1} s ({} exact and {} near copies planted)",
        cands.len(),
        t.elapsed().as_secs_f64(),
        planted.iter().filter(|p| p.kind == Planted::Exact).count(),
        planted.iter().filter(|p| p.kind == Planted::Near).count(),
    );

    let t = Instant::now();
    let mut one = Reconstructor::new(cfg.clone(), word_counter())?;
    let expected: Vec<Verdict> = cands
        .iter()
        .map(|c| one.dedup_verdict(c).expect("a reconstructor format"))
        .collect();
    println!("one-process dedup: {:.2} s", t.elapsed().as_secs_f64());

    let tmp = tempfile::tempdir()?;
    let store = davinci_runtime::blob::open(
        &format!("file://{}", tmp.path().display()),
        &Default::default(),
    )
    .await?;
    let chunks: Vec<&[Candidate]> = cands.chunks(PART).collect();
    let parts = Parts::from_counts(&chunks.iter().map(|c| c.len() as u64).collect::<Vec<_>>());
    for p in ps {
        let lsh = MinHashLsh::new(
            cfg.near_dup_threshold,
            cfg.minhash_perms,
            cfg.minhash_shingle,
        );
        let pd = PartitionedDedup::new(store.clone(), &format!("p{p}"), p, lsh);
        let t = Instant::now();
        let mut io = Io::default();
        for (k, c) in chunks.iter().enumerate() {
            io += pd.map_part(k, parts.starts[k], c).await?;
        }
        let t_map = t.elapsed().as_secs_f64();
        io += pd.shuffle(&parts).await?;
        let t_shuffle = t.elapsed().as_secs_f64() - t_map;
        let mut state = Resolution::default();
        let mut got = Vec::with_capacity(cands.len());
        for k in 0..parts.len() {
            let (v, r) = pd.resolve_part(k, &parts, &mut state).await?;
            io += r;
            got.extend(v);
        }
        let differ = (0..got.len()).filter(|&g| got[g] != expected[g]).count();
        println!(
            "P={p}: {} parts; map {t_map:.2} s, reduce+join {t_shuffle:.2} s, resolve {:.2} s; {:.1} MB written, {:.1} MB read; verdicts differing from one-process: {differ}",
            parts.len(),
            t.elapsed().as_secs_f64() - t_map - t_shuffle,
            io.written as f64 / 1e6,
            io.read as f64 / 1e6,
        );
        anyhow::ensure!(
            differ == 0,
            "P={p}: partitioned dedup differs from one-process dedup"
        );
    }

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
            let dropped = of(Some(v));
            let s = synth::score(&planted, kind, &eligible, &dropped);
            println!(
                "{} {kind:?}: {} findable planted, {} dropped, precision {:.4}, recall {:.4}",
                format.as_str(),
                s.planted,
                s.dropped,
                s.precision,
                s.recall
            );
            if kind == Planted::Near {
                for max in [0.005, 0.01, 0.02, 0.04, 0.06] {
                    let within: Vec<_> = planted
                        .iter()
                        .filter(|p| p.edit_share < max)
                        .cloned()
                        .collect();
                    let s = synth::score(&within, kind, &eligible, &dropped);
                    println!(
                        "    copies with edit share < {max}: {} findable, recall {:.4}",
                        s.planted, s.recall
                    );
                }
            }
        }
    }
    Ok(())
}
