//! HTTP calls of the tests and the benchmark (the mock's `/stats`, Prometheus' query API,
//! the Pushgateway's `/metrics`), made with reqwest, the client the fleet itself uses.
//!
//! Each call runs reqwest's async client on a current-thread runtime of its own, not its
//! blocking client: that one needs a cargo feature the fleet's crates do not enable, and
//! enabling it here alone would compile them twice (once for the tests, once with the
//! binaries [`crate::bin`] builds). A caller already inside a tokio runtime (the benchmark
//! reads `/stats` from async code) gets the call made on a thread of its own, since a
//! runtime cannot block inside another; the caller's thread waits meanwhile.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

/// How long one call may take, answer included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET url` with `query` pairs added to it; the answer's JSON body. An error unless the
/// answer is a 2xx with a JSON body.
pub fn get_json(url: &str, query: &[(&str, &str)]) -> anyhow::Result<Value> {
    let body = call(reqwest::Method::GET, url, query, None)?;
    serde_json::from_str(&body).with_context(|| format!("{url} answered no JSON"))
}

/// `GET url`; the answer's body as text. An error unless the answer is a 2xx.
pub fn get_text(url: &str) -> anyhow::Result<String> {
    call(reqwest::Method::GET, url, &[], None)
}

/// `PUT url` with a JSON body. An error unless the answer is a 2xx.
pub fn put_json(url: &str, body: &Value) -> anyhow::Result<()> {
    call(reqwest::Method::PUT, url, &[], Some(body)).map(drop)
}

/// One request; the body of its 2xx answer. A failure answer's error holds the start of
/// its body (Prometheus says there why it refused a query).
fn call(method: reqwest::Method, url: &str, query: &[(&str, &str)], json: Option<&Value>) -> anyhow::Result<String> {
    let what = format!("{method} {url}");
    block_on(async {
        // Every address here is the local stack's: a proxy from the environment must not
        // carry loopback calls.
        let client = reqwest::Client::builder().timeout(TIMEOUT).no_proxy().build()?;
        let mut req = client.request(method, url).query(query);
        if let Some(json) = json {
            req = req.json(json);
        }
        let res = req.send().await?;
        let status = res.status();
        let body = res.text().await?;
        anyhow::ensure!(status.is_success(), "answered HTTP {status}: {}", body.chars().take(500).collect::<String>());
        Ok(body)
    })
    .with_context(|| what)
}

/// Runs `fut` to completion on a runtime of its own, on a thread of its own when the
/// caller is inside a runtime already (blocking on a runtime from one panics).
fn block_on<T: Send>(fut: impl Future<Output = anyhow::Result<T>> + Send) -> anyhow::Result<T> {
    let run = || crate::runtime()?.block_on(fut);
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| s.spawn(run).join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    use super::*;

    /// A server on a loopback port that answers each of `answers` to one request, in turn;
    /// returns its URL.
    fn serve(answers: &'static [(&'static str, &'static str)]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for (&(status, body), stream) in answers.iter().zip(listener.incoming()) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(answer.as_bytes()).unwrap();
            }
        });
        url
    }

    #[test]
    fn sync_and_async_callers_alike_get_the_answer() {
        let url = serve(&[("200 OK", r#"{"n":1}"#), ("200 OK", r#"{"n":2}"#)]);
        assert_eq!(get_json(&url, &[]).unwrap()["n"], 1);
        // As the benchmark calls it: from a task of a runtime.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let v = rt.block_on(async { get_json(&url, &[("q", "x")]) }).unwrap();
        assert_eq!(v["n"], 2);
    }

    #[test]
    fn a_failure_answer_is_an_error_that_quotes_its_body() {
        let url = serve(&[("400 Bad Request", r#"{"error":"parse error at char 3"}"#)]);
        let e = format!("{:#}", get_text(&url).unwrap_err());
        assert!(e.contains("400") && e.contains("parse error at char 3") && e.contains(&url), "{e}");
    }
}
