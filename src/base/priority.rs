//! A lower CPU priority for work that must yield to the frame path: a shadow
//! model's inference thread, and the thread that builds its session (ONNX
//! Runtime's intra-op threads are created there and inherit its priority).

/// The nice value of that work: the scheduler gives a nice-0 thread about
/// nine times the CPU of a nice-10 one when both want it.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority (Linux: nice is per thread, and the
/// threads it creates inherit it). It cannot be raised again without
/// privileges: call it only on a thread of its own. Failure is logged only:
/// the work runs, at normal priority.
pub fn lower_this_thread() {
    let tid = rustix::thread::gettid();
    // Absolute, not relative: a thread already nicer is left as it is.
    if rustix::process::getpriority_process(Some(tid)).is_ok_and(|now| now >= BACKGROUND_NICE) {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(Some(tid), BACKGROUND_NICE) {
        tracing::warn!(error = %e, "cannot lower this thread's priority: the shadow model runs at normal priority");
    }
}

/// `f` on a thread of its own at the lower priority (its result back).
pub fn in_background<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            lower_this_thread();
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_thread_runs_niced_and_the_caller_does_not() {
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("own priority");
        let theirs =
            in_background(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("priority"));
        assert_eq!(theirs, mine.max(BACKGROUND_NICE));
        let again = rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("own priority");
        assert_eq!(again, mine, "the caller's priority is unchanged");
    }
}
