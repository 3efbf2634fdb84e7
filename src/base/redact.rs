//! Keeps the `user:password@` of URLs out of logs and error messages: camera
//! URLs carry credentials, and config errors quote the line they are on.

/// `url` without its user info. The user info ends at the authority's *last*
/// `@` (a password may hold `@`); a URL written without a scheme is read as
/// starting with its authority.
pub fn url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `text` with the user info of every `scheme://user:pw@host` in it hidden.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends where a URL's path, query or fragment starts, or
        // where the quoted value or the word ends.
        let end = tail.find(['/', '?', '#', '"', '\'', ' ', '\n', '\t']).unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_hidden_with_or_without_a_scheme() {
        assert_eq!(url("http://admin:secret@10.0.0.5/mjpg"), "http://***@10.0.0.5/mjpg");
        assert_eq!(url("http://10.0.0.5/a@b"), "http://10.0.0.5/a@b");
        assert_eq!(url("http://admin:p@ss@10.0.0.5/m?x=@"), "http://***@10.0.0.5/m?x=@");
        assert_eq!(url("admin:s3cret@10.0.0.5/mjpg"), "***@10.0.0.5/mjpg");
        assert_eq!(url("10.0.0.5/mjpg"), "10.0.0.5/mjpg");
    }

    #[test]
    fn every_url_in_a_text_is_redacted() {
        let line = r#"3 | source = { kind = "http-mjpeg", url = "http://u:p@w@cam/m", b = "rtsp://x:y@h" }"#;
        let shown = text(line);
        assert!(!shown.contains("u:p") && !shown.contains("x:y"), "{shown}");
        assert_eq!(shown, r#"3 | source = { kind = "http-mjpeg", url = "http://***@cam/m", b = "rtsp://***@h" }"#);
        assert_eq!(text("no urls here"), "no urls here");
    }
}
