//! The TCP services the `tcp-flag` scenario deploys (servers of the
//! `localservice` provider plugin), seen from outside: found by their
//! command line in /proc, asked for their answer, killed.

use std::{collections::BTreeSet, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream};

/// argv[0] of every server the provider starts.
pub const SERVER_BINARY: &str = "pulumi-resource-localservice";

/// Every live server: (pid, port), from its command line
/// (`pulumi-resource-localservice serve --port <port> [--owner <urn>]`).
pub fn servers() -> Vec<(u32, u16)> {
    super::processes()
        .into_iter()
        .filter_map(|(pid, args)| match &args[..] {
            [program, serve, flag, port, rest @ ..]
                if program.ends_with(SERVER_BINARY)
                    && serve == "serve"
                    && flag == "--port"
                    && matches!(rest, [] | [_, _]) =>
            {
                port.parse().ok().map(|port| (pid, port))
            }
            _ => None,
        })
        .collect()
}

/// The stack (instance identity) a server was started for: the stack name
/// in the resource URN of its `--owner` argument, when it has one.
pub fn owner_stack(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let i = args.iter().position(|a| a == "--owner")?;
    let urn = args.get(i + 1)?;
    // urn:pulumi:<stack>::<project>::<type>::<name>
    let stack = urn.strip_prefix("urn:pulumi:")?.split("::").next()?;
    Some(stack.to_owned())
}

/// Live server processes for `port`.
pub fn server_pids(port: u16) -> Vec<u32> {
    servers()
        .into_iter()
        .filter(|(_, p)| *p == port)
        .map(|(pid, _)| pid)
        .collect()
}

/// The port of `nc 127.0.0.1 <port>`; `None` for any other form.
pub fn try_port_of(connection_info: &str) -> Option<u16> {
    match connection_info.split_whitespace().collect::<Vec<_>>()[..] {
        ["nc", "127.0.0.1", port] => port.parse().ok(),
        _ => None,
    }
}

/// The port of `nc 127.0.0.1 <port>`.
pub fn port_of(connection_info: &str) -> u16 {
    try_port_of(connection_info).unwrap_or_else(|| {
        panic!("connection info {connection_info:?} is not `nc 127.0.0.1 <port>`")
    })
}

/// The line the service on `port` answers with.
pub async fn read_answer(port: u16) -> std::io::Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer within 5 s"))??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Waits until `port` refuses connections.
pub async fn wait_refused(port: u16) -> bool {
    for _ in 0..100 {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    false
}

pub fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -KILL {pid}");
}

/// Kills, when dropped (also on a failure), any server still listening on
/// the ports it watches, so that a failed test leaves no process.
#[derive(Default)]
pub struct Reaper(Vec<u16>);

impl Reaper {
    pub fn watch(&mut self, port: u16) {
        self.0.push(port);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for port in &self.0 {
            for pid in server_pids(*port) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// The servers started since it was made (a test alone in its binary: no
/// other test's servers start meanwhile); kills them when dropped.
pub struct NewServers {
    before: BTreeSet<u32>,
}

impl NewServers {
    pub fn since_now() -> Self {
        Self {
            before: servers().into_iter().map(|(pid, _)| pid).collect(),
        }
    }

    /// The servers started since this was made: (pid, port).
    pub fn started(&self) -> Vec<(u32, u16)> {
        servers()
            .into_iter()
            .filter(|(pid, _)| !self.before.contains(pid))
            .collect()
    }
}

impl Drop for NewServers {
    fn drop(&mut self) {
        for (pid, _) in self.started() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}
