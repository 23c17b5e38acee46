//! A real HTTP/1.1 server on 127.0.0.1 for the download tests, and generated CIFAR-10 archives.
//! Shared with the `train` and `convert` tests (included there by path). Nothing here reaches
//! beyond the loopback interface.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cifar::{Split, TEST_FILE, TRAIN_FILES};
use md5::{Digest, Md5};

/// What the server answers to every request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `200 OK` with the body and its `Content-Length`.
    Body(Vec<u8>),
    /// `200 OK` announcing the whole body's length, then only its first `n` bytes, then the
    /// connection is closed.
    Cut(Vec<u8>, usize),
    /// `200 OK` without `Content-Length` (the body ends when the connection closes): the first
    /// `n` bytes of the body.
    CutUnannounced(Vec<u8>, usize),
    /// An HTTP error status with a short text body.
    Status(u16),
}

/// A server answering every request with one [`Reply`], until the test process ends.
pub struct Server {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Server {
    /// Binds 127.0.0.1 on a free port and serves `reply` from a thread.
    pub fn start(reply: Reply) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                // A client that hangs up early is its own business.
                let _ = answer(stream, &reply);
            }
        });
        Server { addr, requests }
    }

    /// The URL of `path` (e.g. `"/cifar-10-binary.tar.gz"`) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Number of connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A URL on 127.0.0.1 where nothing listens: a port that was just bound and released.
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/cifar-10-binary.tar.gz")
}

fn answer(mut stream: TcpStream, reply: &Reply) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Read the request head (a GET has no body).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nConnection: close\r\n";
    match reply {
        Reply::Body(body) => {
            write!(stream, "{ok}Content-Length: {}\r\n\r\n", body.len())?;
            stream.write_all(body)?;
        }
        Reply::Cut(body, n) => {
            write!(stream, "{ok}Content-Length: {}\r\n\r\n", body.len())?;
            stream.write_all(&body[..*n])?;
        }
        Reply::CutUnannounced(body, n) => {
            write!(stream, "{ok}\r\n")?;
            stream.write_all(&body[..*n])?;
        }
        Reply::Status(code) => {
            let text = format!("status {code}\n");
            write!(
                stream,
                "HTTP/1.1 {code} Oops\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )?;
        }
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// A gzip-compressed tar of `entries` (path, contents), each a regular file, preceded by a
/// directory entry for every `dirs` path.
pub fn tar_gz(dirs: &[&str], entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        tar.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, &data[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// The files of a CIFAR-10 binary archive holding `train[i]` in the `i`-th training file and
/// `test` in the test file, under `cifar-10-batches-bin/` like the official one.
pub fn dataset_entries(train: &[Split; 5], test: &Split) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = TRAIN_FILES
        .iter()
        .zip(train)
        .chain([(&TEST_FILE, test)])
        .map(|(f, s)| (format!("cifar-10-batches-bin/{f}"), cifar::encode_records(s)))
        .collect();
    out.push((
        "cifar-10-batches-bin/batches.meta.txt".into(),
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n".to_vec(),
    ));
    out
}

/// [`dataset_entries`] as a `.tar.gz`.
pub fn dataset_archive(train: &[Split; 5], test: &Split) -> Vec<u8> {
    let entries = dataset_entries(train, test);
    let refs: Vec<(&str, Vec<u8>)> = entries.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    tar_gz(&["cifar-10-batches-bin/"], &refs)
}

/// The MD5 of `bytes`, as 32 lowercase hex digits.
pub fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
