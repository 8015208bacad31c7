//! The davinci tokenizer-packer service: samples and trajectories → packed Megatron shards with
//! a mixture manifest (DESIGN.md §4 "Packed shards").
//!
//! Core logic is plain, synchronous Rust: the map step ([`part`]) and the reduce step
//! ([`pipeline::Reducer`]), composed in one process by [`pipeline::run`] or across replicas by
//! [`shared`]; storage, queues and gRPC are wired around it.
//!
//! Modules depend only on those below them: `mixture`, `packing`, `shards` and `input` (what a
//! job reads and reports) at the bottom, then `part` (map), `pipeline` (reduce), `storage`,
//! `job` (a `PackSpec`'s options and topics), `shared` (the job across replicas) and `serve`
//! (gRPC) on top.
pub mod input;
pub mod job;
pub mod mixture;
pub mod packing;
pub mod part;
pub mod pipeline;
pub mod serve;
pub mod shards;
pub mod shared;
pub mod storage;
