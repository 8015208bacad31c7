//! One progress bar per stage of a run, fed by the orchestrator's stage statuses: `davinci run`
//! gets them from its own orchestrator, `davinci runs watch` from the conductor's run events.
use davinci_conductor::orchestrate::STAGES;
use davinci_proto::v1::{JobState, StageStatus};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct StageBars {
    _multi: MultiProgress,
    bars: Vec<(&'static str, ProgressBar)>,
}

impl StageBars {
    /// Bars on stderr (hidden when it is not a terminal).
    pub fn new() -> Self {
        let multi = MultiProgress::new();
        let style =
            ProgressStyle::with_template("{prefix:>12} {bar:30} {pos}/{len} {elapsed:>4} {msg}")
                .expect("static template");
        let bars = STAGES
            .iter()
            .map(|s| {
                let b = multi.add(
                    ProgressBar::new(0)
                        .with_style(style.clone())
                        .with_prefix(s.to_string()),
                );
                (*s, b)
            })
            .collect();
        Self {
            _multi: multi,
            bars,
        }
    }

    pub fn update(&self, st: &StageStatus) {
        let Some((_, b)) = self.bars.iter().find(|(s, _)| *s == st.stage) else {
            return;
        };
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
