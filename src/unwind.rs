//! A panic in background work (a reload, a pull-secret copy) is a bug, and
//! must cost only the one piece of work it hit. Left to unwind, it would end
//! the task and leave its bookkeeping behind: reloads stopped for good, or a
//! copy that later pods wait on and nobody ever makes. Caught here, it
//! becomes an error the caller reports and counts like any other.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::FutureExt as _;

/// `work()`, or the panic's message if it panicked.
pub fn catching<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    // Unwind safety: callers drop or overwrite whatever `work` touched
    // before using it again (it reads files and returns a new value).
    std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(|payload| message(&*payload))
}

/// `work`'s output, or the panic's message if polling it panicked.
pub async fn catching_async<F: Future>(work: F) -> Result<F::Output, String> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|payload| message(&*payload))
}

// A lock is poisoned when a panic, caught above, unwound while it was
// held. Refusing it from then on would turn off whatever it serves until a
// restart (the pull-secret cache: every pod told its Secret is unknown), so
// callers take the guard anyway. Each use states why its data stay usable:
// single map operations that a panic cannot leave half done, or a cache the
// watches and the resync write again.

/// `mutex`'s guard, poisoned or not.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `rwlock`'s read guard, poisoned or not.
pub fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock.read().unwrap_or_else(PoisonError::into_inner)
}

/// `rwlock`'s write guard, poisoned or not.
pub fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock.write().unwrap_or_else(PoisonError::into_inner)
}

/// What `panic!` was given, when it was text.
fn message(payload: &(dyn Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    match text {
        Some(text) => format!("panicked (a bug): {text}"),
        None => "panicked (a bug)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(catching(|| 7), Ok(7));
        let literal = catching(|| -> u8 { panic!("literal") });
        assert_eq!(literal, Err("panicked (a bug): literal".to_owned()));
        let formatted = catching(|| -> u8 { panic!("formatted {}", 42) });
        assert_eq!(formatted, Err("panicked (a bug): formatted 42".to_owned()));
        let other = catching(|| -> u8 { std::panic::panic_any(42_u32) });
        assert_eq!(other, Err("panicked (a bug)".to_owned()));
    }

    #[test]
    fn a_lock_poisoned_by_a_panic_still_gives_its_data() {
        let mutex = Mutex::new(vec![1]);
        let rwlock = RwLock::new(vec![1]);
        std::thread::scope(|scope| {
            let poisoned = scope
                .spawn(|| {
                    let _held = mutex.lock().unwrap();
                    let _written = rwlock.write().unwrap();
                    panic!("while holding both");
                })
                .join();
            assert!(poisoned.is_err());
        });
        assert!(mutex.is_poisoned() && rwlock.is_poisoned());
        lock(&mutex).push(2);
        write(&rwlock).push(2);
        assert_eq!(*lock(&mutex), [1, 2]);
        assert_eq!(*read(&rwlock), [1, 2]);
    }

    #[tokio::test]
    async fn a_panic_while_polling_becomes_its_message() {
        assert_eq!(catching_async(async { 7 }).await, Ok(7));
        let panicked = catching_async(async {
            tokio::task::yield_now().await;
            if true {
                panic!("after a yield");
            }
            7
        })
        .await;
        assert_eq!(panicked, Err("panicked (a bug): after a yield".to_owned()));
    }
}
