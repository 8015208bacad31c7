//! The davinci trainer service. The candle engine trains a Qwen2 model in this process on the
//! packer's shards ([`train::train`]); [`serve`] runs it as `StartTrain` jobs. The cluster engine
//! (JobSet + Megatron-LM) shares this service and is a separate piece of work.
pub mod config;
pub mod data;
pub mod serve;
pub mod train;
