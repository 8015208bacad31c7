//! The davinci trainer service. The candle engine trains a Qwen2 model in this process on the
//! packer's shards ([`train::train`]); the cluster engine ([`jobset`]) runs Megatron-LM on
//! Kubernetes GPU nodes as JobSets or TrainJobs; [`serve`] runs both as `StartTrain` jobs. Data and
//! checkpoints may live on `s3://` ([`storage`]).
pub mod config;
pub mod data;
pub mod jobset;
pub mod serve;
pub mod storage;
pub mod train;
