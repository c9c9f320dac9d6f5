//! A panic in background work (a reload, a pull-secret copy) is a bug, and
//! must cost only the one piece of work it hit. Left to unwind, it would end
//! the task and leave its bookkeeping behind: reloads stopped for good, or a
//! copy that later pods wait on and nobody ever makes. Caught here, it
//! becomes an error the caller reports and counts like any other.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

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
