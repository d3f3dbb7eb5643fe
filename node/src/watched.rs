//! Files a node re-reads while it runs — the auth file and the TLS files, typically mounted Secrets
//! that change in place — and the value built from them ([`Watched`]).
//!
//! Invariants:
//! - A node does not start with files it cannot read or build from ([`Watched::load`] fails with
//!   what to fix).
//! - A change is put in force only when every file reads and the value builds from the new
//!   contents together; otherwise the last good value stays in force and the log says why (a
//!   half-written Secret, or the key of one rotation beside the certificate of another, must
//!   neither lock everyone out nor let everyone in).
//! - Unchanged contents build nothing, and contents that failed to build are not built again: a
//!   problem that persists is logged once, not every second. The files are polled ([`Watched::watch`], off the async
//!   threads): simple, and a mounted Secret takes the kubelet a minute or so to update anyway.

use anyhow::Context;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Builds the value from the files' contents (in the order of the paths).
type Build<T> = Box<dyn Fn(&[Vec<u8>]) -> anyhow::Result<T> + Send + Sync>;

/// A value built from files, rebuilt when they change.
pub struct Watched<T> {
    /// For the log: "the auth file", "the TLS files".
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Build<T>,
    /// The value in force and the contents it was built from.
    state: RwLock<(Arc<T>, Vec<Vec<u8>>)>,
    /// The last problem logged, so a problem that persists is logged once, not every second.
    problem: Mutex<Option<Problem>>,
}

/// Why new contents are not in force.
#[derive(Clone, PartialEq, Eq)]
enum Problem {
    Unreadable(String),
    /// These contents did not build.
    Refused(Vec<Vec<u8>>),
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("what", &self.what).field("paths", &self.paths).finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Reads `paths` and builds the value; fails (with the file or the reason) when either fails.
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let contents = read_all(&paths)?;
        let value = build(&contents)?;
        Ok(Watched {
            what,
            paths,
            build: Box::new(build),
            state: RwLock::new((Arc::new(value), contents)),
            problem: Mutex::new(None),
        })
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner).0.clone()
    }

    /// Reads the files again and puts a value built from them in force if they changed and it
    /// builds; returns whether a new value is in force.
    pub fn reload(&self) -> bool {
        let what = self.what;
        let contents = match read_all(&self.paths) {
            Ok(contents) => contents,
            Err(e) => {
                let error = format!("{e:#}");
                if self.first_time(Problem::Unreadable(error.clone())) {
                    tracing::warn!(what, %error, "cannot read the files; keeping what is in force");
                }
                return false;
            }
        };
        if self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner).1 == contents {
            *lock(&self.problem) = None;
            return false;
        }
        if lock(&self.problem).as_ref() == Some(&Problem::Refused(contents.clone())) {
            return false;
        }
        match (self.build)(&contents) {
            Ok(value) => {
                *self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner) = (Arc::new(value), contents);
                *lock(&self.problem) = None;
                tracing::info!(what, "the files changed; the new contents are in force");
                true
            }
            Err(e) => {
                let error = format!("{e:#}");
                *lock(&self.problem) = Some(Problem::Refused(contents));
                tracing::error!(what, %error, "the files changed but cannot be used; keeping what is in force");
                false
            }
        }
    }

    /// Records `problem`; whether it differs from the last one recorded (and so is to be logged).
    fn first_time(&self, problem: Problem) -> bool {
        let mut last = lock(&self.problem);
        let new = last.as_ref() != Some(&problem);
        *last = Some(problem);
        new
    }

    /// Re-reads the files every `every`, for the process's life.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let watched = self.clone();
            // File reads block: off the async threads.
            let _ = tokio::task::spawn_blocking(move || watched.reload()).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_put_in_force_only_when_it_builds() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "2").unwrap();
        // The value: the sum of the numbers in the files; a file that is not a number does not build.
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = builds.clone();
        let sum = move |contents: &[Vec<u8>]| -> anyhow::Result<u32> {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            contents.iter().map(|c| Ok(std::str::from_utf8(c)?.trim().parse::<u32>()?)).sum()
        };
        let built = || builds.load(std::sync::atomic::Ordering::Relaxed);
        let watched = Watched::load("the test files", vec![a.clone(), b.clone()], sum.clone()).unwrap();
        assert_eq!(*watched.current(), 3);
        assert!(!watched.reload(), "unchanged: nothing built");
        std::fs::write(&b, "5").unwrap();
        assert!(watched.reload());
        assert_eq!(*watched.current(), 6);
        std::fs::write(&a, "half-written").unwrap();
        assert!(!watched.reload());
        assert_eq!(*watched.current(), 6, "the last good value stays in force");
        let before = built();
        assert!(!watched.reload());
        assert_eq!(built(), before, "refused contents are not built (nor logged) again");
        std::fs::remove_file(&a).unwrap();
        assert!(!watched.reload());
        assert_eq!(*watched.current(), 6);
        let e = Watched::load("the test files", vec![a.clone(), b], sum).unwrap_err();
        assert!(format!("{e:#}").contains(&a.display().to_string()), "{e:#}");
    }
}
