//! Ownership labels and leases on sandbox containers (and pods), so that what a dead worker
//! left behind is found and removed.
//!
//! Every container a backend creates carries: the marker [`MANAGED`], the owner (a stable
//! worker name, e.g. the pod or host name), the owner's incarnation (one per process), the run
//! and task it serves, the time its lease expires and the end of its lifetime (Unix seconds).
//!
//! The lease is short and a live owner renews it (every third of the lease) for as long as it
//! holds the workspace, so a long-running workspace lives on while one whose owner died is
//! reclaimed soon after. Pod labels can be changed, so the Kubernetes backend renews the
//! `lease-expiry` label itself. Docker labels cannot, so the Docker backend writes the renewed
//! expiry into the container ([`RENEWAL_FILE`], through the archive API, no exec) and a sweep
//! reads it back for containers whose labelled lease has passed. A command inside the
//! workspace could forge that file, so no renewal counts past the lifetime label, which
//! nothing can change; the container's sleeper (and a pod's `activeDeadlineSeconds`) ends at
//! the lifetime too, so an abandoned workspace stops even before a sweep removes it.
//!
//! A sweep removes a container when its lease (as renewed) has expired, or when it belongs to
//! an earlier incarnation of the sweeping owner (a worker restarted after `kill -9` reclaims
//! its predecessor's containers at once instead of waiting for their leases).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const MANAGED: &str = "davinci.dev/sandbox";
pub const OWNER: &str = "davinci.dev/owner";
pub const INCARNATION: &str = "davinci.dev/incarnation";
pub const RUN: &str = "davinci.dev/run";
pub const TASK: &str = "davinci.dev/task";
pub const LEASE_EXPIRY: &str = "davinci.dev/lease-expiry";
pub const LIFETIME_EXPIRY: &str = "davinci.dev/lifetime-expiry";

/// Where the Docker backend records a renewed lease inside the container (outside the
/// workspace tree, so it never shows in a diff of `/testbed`): the expiry in Unix seconds.
pub const RENEWAL_FILE: &str = "/.davinci-lease";

/// The labels of one sandbox container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    pub owner: String,
    pub incarnation: String,
    pub run: String,
    pub task: String,
    /// Unix seconds; renewed by the live owner.
    pub lease_expiry: u64,
    /// Unix seconds; fixed at creation. No renewal counts past it.
    pub lifetime_expiry: u64,
}

/// This process's incarnation: one per process, shared by all its sandboxes, so that one
/// sandbox's sweep never takes another live sandbox's containers of the same owner.
pub fn incarnation() -> &'static str {
    static INC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INC.get_or_init(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A label value Kubernetes accepts too (≤ 63 of `[A-Za-z0-9._-]`, alphanumeric at both
/// ends); other characters become `_`.
pub fn label_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    while v.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.remove(0);
    }
    v
}

impl Labels {
    pub fn new(
        owner: &str,
        incarnation: &str,
        run: &str,
        task: &str,
        lease: Duration,
        lifetime: Duration,
    ) -> Self {
        let now = unix_now();
        Labels {
            owner: label_value(owner),
            incarnation: label_value(incarnation),
            run: label_value(run),
            task: label_value(task),
            lease_expiry: now + lease.as_secs().min(lifetime.as_secs()),
            lifetime_expiry: now + lifetime.as_secs(),
        }
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED.to_string(), "1".to_string()),
            (OWNER.to_string(), self.owner.clone()),
            (INCARNATION.to_string(), self.incarnation.clone()),
            (RUN.to_string(), self.run.clone()),
            (TASK.to_string(), self.task.clone()),
            (LEASE_EXPIRY.to_string(), self.lease_expiry.to_string()),
            (
                LIFETIME_EXPIRY.to_string(),
                self.lifetime_expiry.to_string(),
            ),
        ])
    }

    /// The labels of a managed container; `None` for anything else.
    pub fn from_map<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Labels> {
        if get(MANAGED) != Some("1") {
            return None;
        }
        let s = |k: &str| get(k).unwrap_or_default().to_string();
        Some(Labels {
            owner: s(OWNER),
            incarnation: s(INCARNATION),
            run: s(RUN),
            task: s(TASK),
            // An unreadable expiry counts as expired: a managed container nobody can vouch for.
            lease_expiry: get(LEASE_EXPIRY).and_then(|v| v.parse().ok()).unwrap_or(0),
            // Without one (made before lifetimes existed) the lease cannot be extended.
            lifetime_expiry: get(LIFETIME_EXPIRY)
                .and_then(|v| v.parse().ok())
                .or_else(|| get(LEASE_EXPIRY).and_then(|v| v.parse().ok()))
                .unwrap_or(0),
        })
    }

    /// When the lease ends given a renewal read from the workspace (`renewed`, Docker): the
    /// later of the label and the renewal, never past the lifetime.
    pub fn expiry(&self, renewed: Option<u64>) -> u64 {
        self.lease_expiry
            .max(renewed.unwrap_or(0))
            .min(self.lifetime_expiry)
    }

    /// Whether a renewal recorded in the workspace could still save it at `now`: its
    /// labelled lease has passed, its lifetime has not.
    pub fn renewal_matters(&self, now: u64) -> bool {
        self.lease_expiry <= now && now < self.lifetime_expiry
    }

    /// Why a sweep by (`owner`, `incarnation`) at `now` removes this container, if it does;
    /// `renewed` is the renewal read from it, if any.
    pub fn reclaim_reason(
        &self,
        owner: &str,
        incarnation: &str,
        now: u64,
        renewed: Option<u64>,
    ) -> Option<Reclaim> {
        if self.expiry(renewed) <= now {
            Some(Reclaim::Expired)
        } else if self.owner == label_value(owner) && self.incarnation != label_value(incarnation) {
            Some(Reclaim::Predecessor)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reclaim {
    /// The lease ran out.
    Expired,
    /// Left by an earlier process of the same owner.
    Predecessor,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Managed containers seen.
    pub seen: usize,
    /// Names / ids removed because their lease expired.
    pub expired: Vec<String>,
    /// Removed because an earlier incarnation of this owner left them.
    pub predecessors: Vec<String>,
    /// (id, error) of removals that failed; the next sweep retries them.
    pub failed: Vec<(String, String)>,
}

impl SweepReport {
    /// Counts what the sweep reclaimed in `davinci_sandbox_reclaimed_total{backend, reason}`
    /// (`expired`: a lease ran out with no owner to remove it, i.e. a leak; `predecessor`: left
    /// by a restarted worker; `failed`: could not be removed) and sets `davinci_sandbox_managed`.
    pub fn record(&self, backend: &'static str) {
        for (reason, n) in [
            ("expired", self.expired.len()),
            ("predecessor", self.predecessors.len()),
            ("failed", self.failed.len()),
        ] {
            metrics::counter!("davinci_sandbox_reclaimed_total", "backend" => backend, "reason" => reason)
                .increment(n as u64);
        }
        metrics::gauge!("davinci_sandbox_managed", "backend" => backend).set(self.seen as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_reclaim() {
        let l = Labels::new(
            "worker/1",
            "inc-a",
            "run 7",
            "django__django-11099",
            Duration::from_secs(60),
            Duration::from_secs(600),
        );
        assert_eq!(l.owner, "worker_1");
        assert_eq!(l.run, "run_7");
        let m = l.to_map();
        let back = Labels::from_map(|k| m.get(k).map(String::as_str)).unwrap();
        assert_eq!(back, l);
        let now = unix_now();
        assert_eq!(l.reclaim_reason("other", "x", now, None), None);
        assert_eq!(l.reclaim_reason("worker/1", "inc-a", now, None), None);
        assert_eq!(
            l.reclaim_reason("worker/1", "inc-b", now, None),
            Some(Reclaim::Predecessor)
        );
        assert_eq!(
            l.reclaim_reason("other", "x", now + 61, None),
            Some(Reclaim::Expired)
        );
        // A renewal keeps it past the labelled lease, but never past the lifetime, however
        // far a forged renewal reaches.
        assert!(l.renewal_matters(now + 61));
        assert_eq!(
            l.reclaim_reason("other", "x", now + 61, Some(now + 120)),
            None
        );
        assert_eq!(
            l.reclaim_reason("other", "x", now + 121, Some(now + 120)),
            Some(Reclaim::Expired)
        );
        assert_eq!(
            l.reclaim_reason("other", "x", now + 601, Some(u64::MAX)),
            Some(Reclaim::Expired)
        );
        assert!(!l.renewal_matters(now + 601));
        // Labels from before lifetimes: the lease is all there is.
        let mut old = m.clone();
        old.remove(LIFETIME_EXPIRY);
        let old = Labels::from_map(|k| old.get(k).map(String::as_str)).unwrap();
        assert_eq!(old.lifetime_expiry, old.lease_expiry);
        assert_eq!(old.expiry(Some(u64::MAX)), old.lease_expiry);
        assert!(Labels::from_map(|_| None).is_none());
        assert_eq!(label_value("-_a.b_-"), "a.b");
        assert_eq!(label_value(&"x".repeat(100)).len(), 63);
    }
}
