//! HAProxy in master-worker mode for tests (owned by the watcher tests).
