//! The davinci reconstructor: merged `PullRequest` records (`davinci.pr/v1`) become the
//! contextually-native samples of DESIGN.md §4, `davinci.ctx-general/v2` and
//! `davinci.ctx-python/v2`.
//!
//! - [`pipeline`]: selection, rendering (formats live in `davinci_core::ctx`), the ctx-python
//!   round-trip check, token cap, decontamination, exact and near dedup; drops counted by reason.
//! - [`enhance`]: the PR summary and refined commit messages, from an OpenAI-compatible model
//!   or deterministically.
//! - [`filters`]: the selection and dedup/decontamination pieces.
//! - [`partition`]: the same exact and near dedup through storage in P partitions, for
//!   corpora no one process can index.
//! - [`batch`]: a batch over stored shards (`davinci reconstruct`).
//! - [`serve`]: the gRPC service (Start/Get/Watch/Cancel) and the `prs` queue worker.
pub mod batch;
pub mod enhance;
pub mod filters;
pub mod partition;
pub mod pipeline;
pub mod serve;

pub use enhance::{EnhanceConfig, Enhancer, deterministic_summary};
pub use pipeline::{ReconstructConfig, Reconstructor, Stats, TokenCounter, Verdict, word_counter};
