//! An error with its causes, for logs and the command line: each cause is
//! appended unless the message already says it (many messages embed their
//! cause so that a plain `{e}` reads well on its own).

use std::error::Error;

/// `e: cause: cause's cause ...`, without repeating what a message already holds.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("MQTT publisher")]
        Bare(#[source] Inner),
        #[error("outbox /x: {0}")]
        Says(#[source] std::io::Error),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("password file /p")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn causes_are_appended_once() {
        let denied = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        assert_eq!(chain(&Outer::Bare(Inner(denied()))), "MQTT publisher: password file /p: denied");
        assert_eq!(chain(&Outer::Says(denied())), "outbox /x: denied");
    }
}
