//! Runtime plumbing every davinci service shares: configuration, telemetry, gRPC server
//! building, blob storage, work queues and the job registry.

pub mod blob;
pub mod config;
pub mod context;
pub mod fanout;
pub mod grpc;
pub mod jobs;
pub mod queue;
pub mod retry;
pub mod shard;
pub mod telemetry;
