#[path = "it/monitoring.rs"]
mod monitoring;
