//! The tasks a service cannot run without, watched: the first one that panics, fails, or ends
//! while the service is meant to run stops the others and becomes the service's error, so the
//! process exits non-zero and whatever supervises it (systemd, Kubernetes, compose) starts it
//! again. Without it, a task that died left a process that still ran and answered `/healthz`
//! (or ended with status 0, which a restart-on-failure policy does not restart).
//!
//! ```text
//! Supervisor::new(stop)
//!   spawn_service("main path", ..)   must run until `stop`: Err, a panic or an early end fails it
//!   spawn("startup check", ..)       may end: only Err or a panic fails it
//! any failure: error line "task <name> ...", `stop` cancelled, `check()` (for /readyz) says so,
//! `wait()` returns it
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A task that died: which, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task `{task}` {how}; the service stops so that it can be started again")]
pub struct TaskFailure {
    /// The task's name, as given to the supervisor.
    pub task: String,
    /// `panicked: <message>`, `failed: <error>` or `ended while the service was running`.
    pub how: String,
}

/// Watches a service's tasks; cheap to clone (clones watch the same tasks).
#[derive(Clone)]
pub struct Supervisor {
    stop: CancellationToken,
    failure: Arc<Mutex<Option<TaskFailure>>>,
    tasks: TaskTracker,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("stopping", &self.stop.is_cancelled())
            .field("failure", &self.failure())
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl Supervisor {
    /// Watches tasks that stop on `stop`; the first failure cancels it.
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            stop,
            failure: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// The token the tasks stop on: cancelled at shutdown, or by the first failure.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Runs `task`, which must run until [`stop`](Self::stop) is cancelled: an `Err`, a panic,
    /// or an end before that fails the service. The handle ends when the task does.
    pub fn spawn_service<F, E>(&self, name: &str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        self.run(name, task, true)
    }

    /// Runs `task`, which may end by itself: only an `Err` or a panic fails the service.
    pub fn spawn<F, E>(&self, name: &str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        self.run(name, task, false)
    }

    fn run<F, E>(&self, name: &str, task: F, must_run: bool) -> JoinHandle<()>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        // The task runs in a task of its own, so that its panic is caught at the join; aborting
        // the returned handle aborts it too.
        let mut inner = tokio::spawn(task);
        // Moved into the watcher: dropped with it even if it never ran.
        let abort = AbortOnDrop(inner.abort_handle());
        let this = self.clone();
        let name = name.to_owned();
        self.tasks.spawn(async move {
            let _abort = abort;
            let how = match (&mut inner).await {
                Ok(Ok(())) if must_run && !this.stop.is_cancelled() => {
                    Some("ended while the service was running".to_owned())
                }
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("failed: {error}")),
                Err(joined) if joined.is_panic() => Some(format!(
                    "panicked: {}",
                    panic_message(joined.into_panic().as_ref())
                )),
                // Aborted by its owner: not a failure of the task.
                Err(_) => None,
            };
            if let Some(how) = how {
                this.fail(TaskFailure { task: name, how });
            }
        })
    }

    /// Records `failure` (the first one is kept), logs it and stops the other tasks.
    pub fn fail(&self, failure: TaskFailure) {
        tracing::error!(task = %failure.task, how = %failure.how, "a task of the service died; stopping");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(failure);
        self.stop.cancel();
    }

    /// The first failure, if a task died.
    pub fn failure(&self) -> Option<TaskFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For `/readyz`: `Err` naming the task once one died (the process is on its way out).
    pub fn check(&self) -> Result<(), String> {
        match self.failure() {
            None => Ok(()),
            Some(failure) => Err(format!("task `{}` {}", failure.task, failure.how)),
        }
    }

    /// Waits until every task spawned so far has ended; the first failure, if any.
    pub async fn wait(&self) -> Result<(), TaskFailure> {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
        match self.failure() {
            None => Ok(()),
            Some(failure) => Err(failure),
        }
    }
}

/// Aborts a task when dropped (a no-op once it has ended).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A panic's message, when it has one.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn until_stopped(stop: CancellationToken) -> Result<(), String> {
        stop.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_is_the_error() {
        let supervisor = Supervisor::new(CancellationToken::new());
        let other = supervisor.spawn_service("other", until_stopped(supervisor.stop().clone()));
        supervisor.spawn_service("pruner", async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let poison: Option<u8> = std::hint::black_box(None);
            poison.expect("a value the database held");
            Ok::<(), String>(())
        });
        let failure = supervisor.wait().await.unwrap_err();
        assert_eq!(failure.task, "pruner");
        assert!(
            failure
                .how
                .starts_with("panicked: a value the database held"),
            "{failure}"
        );
        assert!(supervisor.stop().is_cancelled());
        assert!(other.is_finished(), "the other task was stopped");
        assert!(supervisor.check().unwrap_err().contains("pruner"));
    }

    #[tokio::test]
    async fn an_error_or_an_early_end_fails_a_service_task_but_not_a_finite_one() {
        let failed = Supervisor::new(CancellationToken::new());
        failed.spawn_service("writer", async { Err::<(), _>("disk full") });
        let failure = failed.wait().await.unwrap_err();
        assert_eq!(failure.how, "failed: disk full");

        let ended = Supervisor::new(CancellationToken::new());
        ended.spawn_service("sweeper", async { Ok::<(), String>(()) });
        let failure = ended.wait().await.unwrap_err();
        assert_eq!(failure.how, "ended while the service was running");
        assert!(failure.to_string().starts_with("task `sweeper` ended"));

        let finite = Supervisor::new(CancellationToken::new());
        finite.spawn("startup check", async { Ok::<(), String>(()) });
        assert_eq!(finite.wait().await, Ok(()));
        assert!(!finite.stop().is_cancelled());
        assert!(finite.check().is_ok());
    }

    #[tokio::test]
    async fn aborting_a_handle_aborts_its_task_and_is_no_failure() {
        let supervisor = Supervisor::new(CancellationToken::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = supervisor.spawn_service("listener", async move {
            let _held = tx;
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        });
        handle.abort();
        assert!(rx.await.is_err(), "the task itself was dropped");
        supervisor.stop().cancel();
        assert_eq!(supervisor.wait().await, Ok(()));
    }

    #[tokio::test]
    async fn tasks_that_end_at_shutdown_are_no_failure() {
        let supervisor = Supervisor::new(CancellationToken::new());
        for name in ["main path", "retry path"] {
            supervisor.spawn_service(name, until_stopped(supervisor.stop().clone()));
        }
        supervisor.stop().cancel();
        assert_eq!(supervisor.wait().await, Ok(()));
    }
}
