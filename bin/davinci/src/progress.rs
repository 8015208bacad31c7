//! One progress bar per stage of a run, fed by the orchestrator's stage statuses: `davinci run`
//! gets them from its own orchestrator, `davinci runs watch` from the conductor's run events.
use davinci_conductor::orchestrate::STAGES;
use davinci_proto::v1::{JobState, StageStatus};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct StageBars {
    multi: MultiProgress,
    style: ProgressStyle,
    /// Bars of the stages seen so far, in [`STAGES`] order: a stage gets its bar with its first
    /// status, so a run without a stage (no `training:`, no train) shows no idle bar for it.
    bars: std::sync::Mutex<Vec<(String, ProgressBar)>>,
}

impl StageBars {
    /// Bars on stderr (hidden when it is not a terminal).
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::new(),
            style: ProgressStyle::with_template(
                "{prefix:>12} {bar:30} {pos}/{len} {elapsed:>4} {msg}",
            )
            .expect("static template"),
            bars: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The bar of `stage`, added in its place among the others on first use.
    fn bar(&self, stage: &str) -> ProgressBar {
        let mut bars = self.bars.lock().expect("bars lock");
        if let Some((_, b)) = bars.iter().find(|(s, _)| s == stage) {
            return b.clone();
        }
        let rank = |s: &str| STAGES.iter().position(|x| *x == s).unwrap_or(STAGES.len());
        let at = bars
            .iter()
            .position(|(s, _)| rank(s) > rank(stage))
            .unwrap_or(bars.len());
        let b = self.multi.insert(
            at,
            ProgressBar::new(0)
                .with_style(self.style.clone())
                .with_prefix(stage.to_string()),
        );
        bars.insert(at, (stage.to_string(), b.clone()));
        b
    }

    /// The stages that have a bar, in order.
    #[cfg(test)]
    fn stages(&self) -> Vec<String> {
        let bars = self.bars.lock().expect("bars lock");
        bars.iter().map(|(s, _)| s.clone()).collect()
    }

    pub fn update(&self, st: &StageStatus) {
        let b = self.bar(&st.stage);
        b.set_length(st.total.max(st.done));
        b.set_position(st.done);
        let state = JobState::try_from(st.state).unwrap_or(JobState::Unspecified);
        if state.is_terminal() {
            b.finish_with_message(format!(
                "{} in {:.1}s",
                state
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_lowercase(),
                st.wall_seconds
            ));
        } else {
            b.set_message(format!(
                "{} out",
                st.counters.get("records_out").copied().unwrap_or_default()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(stage: &str) -> StageStatus {
        StageStatus {
            stage: stage.into(),
            state: JobState::Running as i32,
            ..Default::default()
        }
    }

    #[test]
    fn bars_only_for_stages_that_report_in_stage_order() {
        let bars = StageBars::new();
        assert!(bars.stages().is_empty());
        bars.update(&status("reconstruct"));
        bars.update(&status("crawl"));
        bars.update(&status("pack"));
        bars.update(&status("crawl"));
        assert_eq!(
            bars.stages(),
            ["crawl", "reconstruct", "pack"],
            "no idle train bar"
        );
        bars.update(&status("train"));
        assert_eq!(bars.stages().last().map(String::as_str), Some("train"));
    }
}
