//! The davinci task stage: merged PRs (`davinci.pr/v1`) and published task sets become
//! validated executable tasks (`TaskInstance`, a SWE-bench superset) with reproducible
//! environments.
//!
//! - [`select`]: a PR → a candidate (patch / test patch split, problem statement, hints,
//!   version), or a drop reason.
//! - [`recipe`]: a deterministic environment recipe from the repository at its base commit.
//! - [`envs`]: recipe environments built as virtualenvs on the local backend, cached per
//!   (repository, recipe hash) and mounted read-only.
//! - [`validate`]: before/after runs, flaky tests, evidence the suite ran, the gold check.
//! - [`stage`]: one task through all of that; the stage's config and stats.
//! - [`batch`]: a batch over PR shards (`davinci tasks build`), resumable per shard.
//! - [`serve`]: the `Tasks` gRPC service: one claim per PR shard (or published-set chunk)
//!   shared by every replica through the work queue.
pub mod batch;
pub mod envs;
pub mod recipe;
pub mod repo;
pub mod select;
pub mod serve;
pub mod stage;
pub mod validate;

pub use stage::{Stage, Stats, TasksConfig};
