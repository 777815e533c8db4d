//! The plan: an experiment's stages as a DAG (`dag`: their references ->
//! the order to run them in) and the scheduler that runs independent
//! branches side by side (`schedule`). It imports nothing else of rlhf.

pub mod dag;
pub mod schedule;
