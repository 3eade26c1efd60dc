//! Loopback networking: free ports for the services a test starts, and
//! plain HTTP/1.1 requests to satwatch's endpoints.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("loopback has free ports")
        .local_addr()
        .unwrap()
        .port()
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, "", Duration::from_secs(5))
}

/// A plain HTTP/1.1 POST with an empty body and, when given, a bearer token.
pub fn http_post(addr: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\nContent-Length: 0\r\n"))
        .unwrap_or_else(|| "Content-Length: 0\r\n".into());
    http_request(addr, "POST", path, &auth, Duration::from_secs(30))
}

/// One request with no body (`headers` are whole `Name: value\r\n` lines);
/// the status and body, or `None` if nothing answers in `timeout`.
fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
