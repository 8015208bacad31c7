//! PR metadata in batched GraphQL queries against the fake GitHub of `common` (one model of
//! every PR rendered by REST and GraphQL, queries charged in points by GitHub's formula):
//! the same records as the one-PR-at-a-time REST path, overflowing connections followed page
//! by page, and the rate a token's hour of budget allows.
mod common;

use common::{Conversation, Data, gql_comment, gql_review, gql_review_comment};
use davinci_crawler::batch::BatchPages;
use davinci_crawler::budget::{MemoryBudget, RedisBudget, TokenBudget};
use davinci_crawler::github::GithubClient;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const W: &str = "acme/widgets";

/// The widgets PRs plus PR 6, whose every connection overflows the batched query's first
/// page (but not the REST path's, so both paths must give everything): 23 labels, 35
/// comments, 25 reviews of which the first has 25 comments, and 10 closing issues (the REST
/// path's limit); its body also names an
/// issue and a PR (`fixes #30`, `closes #5`).
fn data() -> Data {
    let mut d = Data::widgets();
    let mut p6 = common::pull_json(
        W,
        6,
        true,
        common::user("erin", "User"),
        "Big one.\n\nFixes #30, closes #5.",
        &"6".repeat(40),
    );
    p6["labels"] = json!(
        (0..23)
            .map(|i| json!({"id": i, "name": format!("l{i:02}")}))
            .collect::<Vec<_>>()
    );
    d.pulls.get_mut(W).unwrap().push(p6);
    let reviews = (0..25)
        .map(|r| {
            let comments = (0..if r == 0 { 25 } else { 1 })
                .map(|c| gql_review_comment(&format!("f{r}.py"), Some(c + 1), &format!("r{r}c{c}")))
                .collect();
            gql_review("bob", "COMMENTED", &format!("review {r}"), comments)
        })
        .collect();
    d.conversations.insert(
        (W.into(), 6),
        Conversation {
            closing: (40..50).collect(),
            comments: (0..35)
                .map(|i| gql_comment("carol", &format!("comment {i}"), "2024-01-03T00:00:00Z"))
                .collect(),
            reviews,
        },
    );
    d
}

fn client(base: &str, rest: u64, points: u64, window: u64) -> GithubClient {
    let mut cfg = common::cfg(base, rest);
    cfg.graphql_points_per_window = points;
    cfg.window_secs = window;
    cfg.per_page = 100;
    // any wait for a window to reset fails the test instead
    cfg.max_wait = Duration::from_secs(2);
    GithubClient::new(cfg, vec!["tok".into()], Arc::new(MemoryBudget::default())).unwrap()
}

#[tokio::test]
async fn batched_records_equal_the_rest_paths() {
    let (base, fake) = common::serve_with(1000, false, data()).await;
    let numbers = [1u64, 2, 3, 5, 6, 99];
    let rest = client(&base, 1000, 5000, common::WINDOW);
    let mut by_rest = Vec::new();
    let mut known_rest = Vec::new();
    for &n in &numbers {
        let mut pr = common::skeleton(W, n);
        known_rest.push(rest.enrich(&mut pr).await.unwrap());
        by_rest.push(pr);
    }
    let (rest_charged, _) = common::charged(&fake);

    let batched = client(&base, 1000, 5000, common::WINDOW);
    let mut by_batch: Vec<_> = numbers.iter().map(|&n| common::skeleton(W, n)).collect();
    let known = batched
        .enrich_batch(&mut by_batch, &BatchPages::default())
        .await
        .unwrap();
    assert_eq!(known, known_rest);
    assert_eq!(known, [true, true, true, true, true, false]);
    for (r, b) in by_rest.iter().zip(&by_batch) {
        assert_eq!(r, b, "PR #{}", r.number);
    }
    // every field the REST path fills is filled
    let p6 = &by_batch[4];
    assert_eq!(
        (p6.title.as_str(), p6.author.login.as_str()),
        ("PR 6", "erin")
    );
    assert_eq!(p6.author.association.as_deref(), Some("CONTRIBUTOR"));
    assert_eq!(p6.created_at.as_deref(), Some("2024-01-01T00:00:00Z"));
    assert_eq!(p6.merged_at.as_deref(), Some("2024-01-02T00:00:00Z"));
    assert_eq!(
        (p6.base.name.as_str(), p6.head.name.as_str()),
        ("main", "feat6")
    );
    assert_eq!(p6.labels.len(), 23);
    assert_eq!(p6.comments.len(), 35);
    assert_eq!(p6.reviews.len(), 25);
    assert_eq!(p6.reviews[0].comments.len(), 25);
    assert_eq!(p6.reviews[0].comments[24].body, "r0c24");
    assert_eq!(p6.reviews[24].body, "review 24");
    assert_eq!(
        p6.linked_issues
            .iter()
            .map(|i| i.number)
            .collect::<Vec<_>>(),
        (40..50).chain([30]).collect::<Vec<_>>(),
        "closing references, then `fixes #30`; #5 is a PR"
    );
    assert_eq!(p6.repo.stars, Some(600));
    assert_eq!(p6.repo.license.as_deref(), Some("Apache-2.0"));
    assert_eq!(p6.repo.language.as_deref(), Some("Python"));
    assert_eq!(by_batch[3].author.kind, davinci_core::pr::AuthorType::Bot);

    // the batched path made no REST request; the REST path one or more per PR
    let (after, points) = common::charged(&fake);
    assert_eq!(after, rest_charged, "REST requests by the batched path");
    assert!(rest_charged >= numbers.len() as u64);
    let wire = batched.stats.snapshot();
    // one batch, the linked issues, and one page each for PR 6's labels, comments, reviews
    // and first review's comments (the closing issues fit in 10)
    assert_eq!(wire["graphql_queries"], 6, "{wire:?}");
    assert_eq!(*fake.over_limit.lock().unwrap(), 0);
    // the server charged what the client reckoned, query by query
    assert_eq!(
        points - rest.stats.snapshot()["graphql_points"],
        wire["graphql_points"]
    );
    // six queries of a point each: the batch asks for 6 × (4 + 20) = 144 requests
    assert_eq!(wire["graphql_points"], 6);
}

#[tokio::test]
async fn a_tenth_of_a_tokens_hour_covers_a_thousand_prs() {
    // a tenth of GitHub's budgets (500 REST requests, 500 points) for a thousand PRs is the
    // rate of 10,000 PRs per token-hour; the client may not wait for a window to reset
    let n = 1000;
    let (base, fake) =
        common::serve_opts(500, 500, 3600, false, common::corpus("acme/corpus", n)).await;
    let gh = client(&base, 500, 500, 3600);
    let mut prs: Vec<_> = (1..=n)
        .map(|k| common::skeleton("acme/corpus", k))
        .collect();
    let known = gh
        .enrich_batch(&mut prs, &BatchPages::default())
        .await
        .unwrap();
    assert!(known.iter().all(|k| *k));
    for pr in &prs {
        assert_eq!(pr.title, format!("PR {}", pr.number));
        assert!(pr.author.association.is_some() && pr.merged_at.is_some() && !pr.labels.is_empty());
        assert_eq!((pr.reviews.len(), pr.comments.len()), (1, 1));
        // every fourth body names an issue; PR 1 also closes #12
        let want = usize::from(pr.number % 4 == 0) + usize::from(pr.number == 1);
        assert_eq!(pr.linked_issues.len(), want);
    }
    let (rest, points) = common::charged(&fake);
    // 40 batches of 25 PRs at 6 points, 3 queries for the 250 linked issues
    assert_eq!((rest, points), (0, 40 * 6 + 3));
    assert_eq!(*fake.over_limit.lock().unwrap(), 0);
    assert_eq!(gh.stats.snapshot()["budget_waits"], 0);
}

/// 2 REST requests and 12 points per 2-second window: four batches of 25 PRs (6 points
/// each) and the linked issues need three windows; the REST budget is never touched by them.
/// The first GraphQL answer is GitHub's HTML abuse page, which is waited out, not parsed.
async fn points_budgeted_apart(budget: Arc<dyn TokenBudget>) {
    let n = 100;
    let (base, fake) =
        common::serve_opts(2, 12, common::WINDOW, false, common::corpus("acme/c", n)).await;
    fake.faults
        .lock()
        .unwrap()
        .insert("/graphql".into(), "html");
    let mut cfg = common::cfg(&base, 2);
    cfg.graphql_points_per_window = 12;
    let gh = GithubClient::new(cfg, vec!["t".into()], budget).unwrap();
    let mut prs: Vec<_> = (1..=n).map(|k| common::skeleton("acme/c", k)).collect();
    let known = gh
        .enrich_batch(&mut prs, &BatchPages::default())
        .await
        .unwrap();
    assert!(known.iter().all(|k| *k));
    assert_eq!(
        *fake.over_limit.lock().unwrap(),
        0,
        "the client overspent its points"
    );
    let wire = gh.stats.snapshot();
    assert!(wire["budget_waits"] >= 1, "{wire:?}");
    assert_eq!(wire["html_pages"], 1, "{wire:?}");
    // four batches, one linked-issues query, and the batch the abuse page answered
    assert_eq!(common::charged(&fake), (0, 4 * 6 + 1 + 6));
}

#[tokio::test]
async fn graphql_points_are_budgeted_apart_from_rest_requests() {
    points_budgeted_apart(Arc::new(MemoryBudget::default())).await;
}

#[tokio::test]
async fn graphql_points_are_shared_through_redis() {
    let redis = match davinci_testkit::RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIP: no redis-server ({e})");
            return;
        }
    };
    let budget = RedisBudget::connect(&redis.url(), "t:budget")
        .await
        .unwrap();
    points_budgeted_apart(Arc::new(budget)).await;
}
