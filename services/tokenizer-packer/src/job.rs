//! A pack job as the API states it ([`PackSpec`]): its mixture and options, and the topics a
//! shared job's inputs travel on. Both ways of running a job ([`crate::serve::run_spec`] in
//! this process, [`crate::shared::run`] across replicas) start from here.
use crate::mixture::Mixture;
use crate::packing::{LongDocs, PackConfig};
use crate::pipeline::PackOptions;
use crate::storage::OutputDir;
use davinci_proto::v1::PackSpec;

/// The topic sample shards of a shared pack job travel on.
pub const SAMPLES_TOPIC: &str = "samples";
/// The topic trajectory shards (`runs/{run}/trajectories/…`) of a shared pack job travel on.
pub const TRAJECTORIES_TOPIC: &str = "trajectories";

/// `spec.long_docs`: empty or `drop` drops documents longer than `seq_len`, `split` cuts them.
pub fn long_docs(s: &str) -> anyhow::Result<LongDocs> {
    match s {
        "" | "drop" => Ok(LongDocs::Drop),
        "split" => Ok(LongDocs::Split),
        other => anyhow::bail!("spec.long_docs: `{other}` is neither `drop` nor `split`"),
    }
}

/// The mixture and options of a job writing to `out`.
pub fn job_options(spec: &PackSpec, out: &OutputDir) -> anyhow::Result<(Mixture, PackOptions)> {
    let mixture = if spec.mixture_json.trim().is_empty() {
        Mixture::default()
    } else {
        Mixture::parse(&spec.mixture_json)?
    };
    let opts = PackOptions {
        pack: PackConfig {
            seq_len: if spec.seq_len == 0 {
                32_768
            } else {
                spec.seq_len as usize
            },
            seed: spec.seed,
            long_docs: long_docs(&spec.long_docs)?,
            ..Default::default()
        },
        tokenizer_name: spec.tokenizer.clone(),
        data_root: out.data_root(),
        ..Default::default()
    };
    Ok((mixture, opts))
}
