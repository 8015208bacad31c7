//! The davinci crawler service: turns repositories into `davinci.pr/v1` records.
//!
//! * [`git`]: merged PRs from a repository's history (offline), with diffs and base files;
//! * [`github`]: discovery, merged-PR listing and PR metadata over the GitHub API, with
//!   shared token budgets ([`budget`]) and shareable ETag caches ([`httpcache`]); [`batch`]:
//!   the metadata of many PRs per GraphQL query;
//! * [`crosscheck`]: the API's commits and files held against the git record;
//! * [`gharchive`] and [`sources`]: GH Archive hours and discovery resolved into repositories;
//! * [`filter`]: the keep/drop rules, every drop counted by reason;
//! * [`pipeline`]: the resumable crawl writing shards, checkpoints and `stats/crawl.json`.

pub mod batch;
pub mod budget;
pub mod crosscheck;
pub mod filter;
pub mod gharchive;
pub mod git;
pub mod github;
pub mod httpcache;
pub mod pipeline;
pub mod serve;
pub mod sources;

pub use filter::{Counts, FilterConfig, SWE_BENCH_VERIFIED_REPOS, Subset};
pub use pipeline::{CrawlConfig, CrawlStats, RepoSpec, Sinks, crawl_git};
