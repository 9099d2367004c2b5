//! Real servers for the remote-cache tests, started on 127.0.0.1 and killed on drop: moto's S3
//! server and nginx with WebDAV (both installed by `scripts/setup-test-servers.sh`). A test is
//! skipped, with the reason printed, only when the server's binary is missing; a server that is
//! installed but fails to start fails the test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const S3_KEY_ID: &str = "wdro-test-key-id";
pub const S3_SECRET: &str = "wdro-test-secret-never-printed";
pub const DAV_USER: &str = "alice";
pub const DAV_PASSWORD: &str = "dav-password-never-printed";

/// Skips the calling test (with the reason on stderr) when `$found` is `Err`.
#[macro_export]
macro_rules! require_server {
    ($found:expr) => {
        match $found {
            Ok(s) => s,
            Err(reason) => {
                eprintln!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before listening: {st}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{what} did not listen on port {port} within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn user_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
        .join("wdro")
}

/// A raw HTTP/1.1 request; returns the status code. For setting up and corrupting test data
/// behind wdro's back.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// moto's S3 server with one bucket.
pub struct Moto {
    _child: Killed,
    pub port: u16,
    pub bucket: String,
    /// The Python of moto's environment (it has boto3, for signed writes behind wdro's back).
    python: PathBuf,
}

impl Moto {
    pub fn start() -> Result<Moto, String> {
        let bin = std::env::var_os("WDRO_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| user_cache().join("test-venv/bin/moto_server"));
        if !bin.exists() {
            return Err(format!(
                "moto_server not found at {} (run scripts/setup-test-servers.sh, or set WDRO_MOTO_SERVER)",
                bin.display()
            ));
        }
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        wait_for_port(port, &mut child, "moto_server");
        let bucket = "wdro-team".to_string();
        let st = http(port, "PUT", &format!("/{bucket}"), &[], b"");
        assert_eq!(st, 200, "creating the test bucket");
        let python = bin.with_file_name("python");
        Ok(Moto { _child: Killed(child), port, bucket, python })
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The AWS environment a wdro process needs for this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
        ]
    }

    /// Overwrites an object behind wdro's back, with boto3 from moto's own environment (moto
    /// refuses unsigned overwrites).
    pub fn put_raw(&self, key: &str, body: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("body");
        std::fs::write(&f, body).unwrap();
        let script = "import sys, boto3\n\
c = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='k', aws_secret_access_key='s', region_name='us-east-1')\n\
c.put_object(Bucket=sys.argv[2], Key=sys.argv[3], Body=open(sys.argv[4], 'rb').read())\n";
        let out = Command::new(&self.python)
            .args(["-c", script, &format!("http://127.0.0.1:{}", self.port), &self.bucket, key])
            .arg(&f)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.python.display()));
        assert!(out.status.success(), "boto3 put_object: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// nginx serving a WebDAV directory behind Basic auth.
pub struct Nginx {
    _child: Killed,
    pub port: u16,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start() -> Result<Nginx, String> {
        let bin = std::env::var_os("WDRO_NGINX").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
        if !bin.exists() {
            return Err(format!(
                "nginx not found at {} (run scripts/setup-test-servers.sh as root, or set WDRO_NGINX)",
                bin.display()
            ));
        }
        let dav_ext = Path::new("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so");
        let dir = tempfile::Builder::new().prefix("wdro-nginx-").tempdir().unwrap();
        let d = dir.path();
        let root = d.join("dav");
        for sub in ["dav", "tmp", "logs"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("htpasswd"), format!("{DAV_USER}:{{PLAIN}}{DAV_PASSWORD}\n")).unwrap();
        let port = free_port();
        let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
        let conf = format!(
            r#"{load}
{user}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 128; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    client_max_body_size 0;
    location / {{
      auth_basic "wdro";
      auth_basic_user_file {d}/htpasswd;
      dav_methods PUT DELETE MKCOL COPY MOVE;
      {propfind}
      create_full_put_path on;
      dav_access user:rw group:rw all:r;
    }}
  }}
}}
"#,
            load = if dav_ext.exists() { format!("load_module {};", dav_ext.display()) } else { String::new() },
            user = if is_root { "user root;" } else { "" },
            propfind = if dav_ext.exists() { "dav_ext_methods PROPFIND OPTIONS;" } else { "" },
            d = d.display(),
            root = root.display(),
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let mut child = Command::new(&bin)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("logs/error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        wait_for_port(port, &mut child, "nginx");
        Ok(Nginx { _child: Killed(child), port, root, _dir: dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{DAV_USER}:{DAV_PASSWORD}@127.0.0.1:{}/{path}", self.port)
    }
}
