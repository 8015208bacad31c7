//! The davinci rollout service: validated tasks → agent trajectories (`davinci.traj/v1`),
//! graded by the tasks' own tests into `trajectories/{pass|fail}/`.
//!
//! [`pipeline`] runs the K rollouts of one task with the agent of `davinci-agent` (resumable
//! rollout by rollout); [`serve`] shares a job's tasks among replicas through the `rollouts`
//! topic, one claim per task, and writes the outputs in task order.

pub mod pipeline;
pub mod serve;
