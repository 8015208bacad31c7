//! Generated gRPC code for the davinci services (package `davinci.v1`).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("davinci.v1");
}

/// Encoded descriptor set of every davinci proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("davinci_descriptor");

/// Fully qualified gRPC service names, as health checks and reflection see them.
pub const SERVICE_NAMES: [(&str, &str); 8] = [
    ("conductor", "davinci.v1.Conductor"),
    ("crawler", "davinci.v1.Crawler"),
    ("reconstructor", "davinci.v1.Reconstructor"),
    ("tasks", "davinci.v1.Tasks"),
    ("rollout", "davinci.v1.Rollout"),
    ("tokenizer-packer", "davinci.v1.TokenizerPacker"),
    ("trainer", "davinci.v1.Trainer"),
    ("evaluator", "davinci.v1.Evaluator"),
];

impl v1::JobState {
    /// True once the job can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled
        )
    }
}
