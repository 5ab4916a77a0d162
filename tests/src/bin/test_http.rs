//! `ironroot-test-http`: the HTTP service of the QEMU tier's `ext` module (tests/tests/
//! vm_runtime.rs), so the agent's `--health-http` probe meets a real server in the guest.
//! `ironroot-test-http PORT VERSION STATUS` listens on 127.0.0.1:PORT, says its version on
//! stdout, and answers every request with STATUS (`200`, `503`, …) and its version as the body.
//! Built by `cargo build --workspace` with the host's glibc, which the node's newer one runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

fn answer(stream: TcpStream, status: u16, version: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    // The request line and headers, up to the blank line (a bounded read: 64 lines).
    for _ in 0..64 {
        let mut line = String::new();
        if reader.by_ref().take(8192).read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    let body = format!("web version={version}\n");
    let reason = if status == 200 { "OK" } else { "Test Status" };
    let mut stream = stream;
    write!(stream, "HTTP/1.0 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, version, status] = &args[..] else {
        eprintln!("usage: ironroot-test-http PORT VERSION STATUS");
        std::process::exit(2);
    };
    let (Ok(port), Ok(status)) = (port.parse::<u16>(), status.parse::<u16>()) else {
        eprintln!("ironroot-test-http: PORT and STATUS must be numbers");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ironroot-test-http: listening on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("WEB version={version} listening on 127.0.0.1:{port}, answering {status}");
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if let Err(e) = answer(s, status, version) {
                    eprintln!("ironroot-test-http: {e}");
                }
            }
            Err(e) => eprintln!("ironroot-test-http: accept: {e}"),
        }
    }
}
