//! Permanent and transient failures of a work item.
//!
//! A work item fails *permanently* when trying it again cannot help: the repository does not
//! exist, the input is malformed, the spec names something that is not there. Such an item goes
//! to `{topic}:dlq` at once with its reason. Every other failure is *transient* (an outage, a
//! timeout, a full disk) and is retried after a growing delay ([`crate::queue::QueueOptions`]).
//!
//! The classification is made where the error arises, by [`permanent`]; it survives any
//! `anyhow` context added on the way up, and [`is_permanent`] reads it where the item is
//! nacked ([`crate::fanout::serve_topic`]).

/// The marker [`permanent`] attaches as context; it shows in the error's text, so a dead letter
/// says that its item was not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permanent;

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("permanent failure, not retried")
    }
}

/// Marks `e` as a failure that no retry can fix.
pub fn permanent(e: impl Into<anyhow::Error>) -> anyhow::Error {
    e.into().context(Permanent)
}

/// Whether [`permanent`] marked `e` (or an error it wraps).
pub fn is_permanent(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Permanent>().is_some()
}

/// `anyhow::Result` adapters: `.permanent()` marks an error where it arises.
pub trait PermanentExt<T> {
    fn permanent(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> PermanentExt<T> for Result<T, E> {
    fn permanent(self) -> anyhow::Result<T> {
        self.map_err(permanent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_mark_survives_context_and_shows_in_the_text() {
        let e: anyhow::Result<()> = Err(std::io::Error::other("no such repository")).permanent();
        let e = e.context("crawling acme/widgets").unwrap_err();
        assert!(is_permanent(&e));
        assert_eq!(
            format!("{e:#}"),
            "crawling acme/widgets: permanent failure, not retried: no such repository"
        );
        assert!(!is_permanent(&anyhow::anyhow!("connection reset")));
        assert!(!is_permanent(
            &anyhow::anyhow!("connection reset").context("fetching")
        ));
    }
}
