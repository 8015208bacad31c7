//! GitHub metadata rate against the fake GitHub of the crawler's tests (REST with ETags,
//! GraphQL charged in points by GitHub's formula): requests and points per PR, and what that
//! makes per token-hour at GitHub's budgets of 5,000 REST requests and 5,000 GraphQL points
//! (the two are spent side by side, so the scarcer one sets the rate).
//!
//! `cargo run -p davinci-crawler --example metadata_rate -- MODE [PRS]`, MODE one of
//! * `rest`: per PR, what the crawl did before batching: `enrich` (REST `pulls/{n}`, one
//!   GraphQL query, REST per `fixes #N` issue, REST repository) and the commits/files
//!   cross-check (REST `pulls/{n}/commits` and `/files`);
//! * `rest-nocheck`: `enrich` alone;
//! * `batched`: `enrich_batch` (25 PRs per GraphQL query, overflowing connections paged);
//! * `batched-check`: `enrich_batch` and the REST commits/files cross-check per PR;
//! * `batched-hour`: `enrich_batch` against a fake and a client held to GitHub's budgets
//!   (5,000 REST requests and 5,000 points per hour), failing on any wait for a new hour.
#[path = "../tests/common/mod.rs"]
mod common;

use davinci_crawler::budget::MemoryBudget;
use davinci_crawler::github::GithubClient;
use std::sync::Arc;
use std::time::Instant;

const REPO: &str = "acme/corpus";
const HOUR_BUDGET: f64 = 5000.0;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("rest");
    let n: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    // budgets far above the PR count (this measures what a PR costs, not how waits go), but
    // GitHub's own for `batched-hour`
    let budget = if mode == "batched-hour" {
        5000
    } else {
        u64::MAX / 4
    };
    let (base, fake) =
        common::serve_opts(budget, budget, 3600, false, common::corpus(REPO, n)).await;
    let mut cfg = common::cfg(&base, budget);
    cfg.graphql_points_per_window = budget;
    cfg.per_page = 100;
    cfg.window_secs = 3600;
    cfg.max_wait = std::time::Duration::from_secs(1);
    let client = GithubClient::new(cfg, vec!["tok".into()], Arc::new(MemoryBudget::default()))?;
    let t = Instant::now();
    let mut prs: Vec<_> = (1..=n).map(|k| common::skeleton(REPO, k)).collect();
    match mode {
        "rest" | "rest-nocheck" => {
            for pr in &mut prs {
                anyhow::ensure!(client.enrich(pr).await?, "PR {} unknown", pr.number);
                if mode == "rest" {
                    client.pull_changes(REPO, pr.number).await?;
                }
            }
        }
        "batched" | "batched-check" | "batched-hour" => {
            let known = client
                .enrich_batch(&mut prs, &davinci_crawler::batch::BatchPages::default())
                .await?;
            anyhow::ensure!(known.iter().all(|k| *k), "some PRs unknown");
            if mode == "batched-check" {
                for pr in &prs {
                    client.pull_changes(REPO, pr.number).await?;
                }
            }
        }
        other => anyhow::bail!("unknown mode `{other}`"),
    }
    let wall = t.elapsed().as_secs_f64();
    anyhow::ensure!(prs.iter().all(|p| !p.title.is_empty()
        && !p.reviews.is_empty()
        && !p.comments.is_empty()
        && p.author.association.is_some()
        && p.repo.stars.is_some()
        // every fourth body names an issue; PR 1 also closes #12
        && p.linked_issues.len() == usize::from(p.number % 4 == 0) + usize::from(p.number == 1)));
    anyhow::ensure!(
        *fake.over_limit.lock().unwrap() == 0,
        "the fake refused requests over budget"
    );
    let (rest, points) = common::charged(&fake);
    let sent = *fake.requests.lock().unwrap();
    let queries = *fake.graphql_queries.lock().unwrap();
    let (rest_pr, points_pr) = (rest as f64 / n as f64, points as f64 / n as f64);
    let rate = |per: f64| {
        if per > 0.0 {
            HOUR_BUDGET / per
        } else {
            f64::INFINITY
        }
    };
    println!(
        "mode={mode} prs={n} requests_sent={sent} rest_charged={rest} graphql_queries={queries} points={points} \
         rest_per_pr={rest_pr:.3} points_per_pr={points_pr:.3} prs_per_hour_per_token={:.0} wall_s={wall:.2}",
        rate(rest_pr).min(rate(points_pr))
    );
    Ok(())
}
