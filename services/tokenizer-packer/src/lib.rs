//! The davinci tokenizer-packer service: samples and trajectories → packed Megatron shards with
//! a mixture manifest (DESIGN.md §4 "Packed shards").
//!
//! Core logic is plain, synchronous Rust: the map step ([`part`]) and the reduce step
//! ([`pipeline::Reducer`]), composed in one process by [`pipeline::run`] or across replicas by
//! [`shared`]; storage, queues and gRPC are wired around it.
pub mod mixture;
pub mod packing;
pub mod part;
pub mod pipeline;
pub mod serve;
pub mod shards;
pub mod shared;
pub mod storage;
