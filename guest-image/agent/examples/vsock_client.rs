//! Talks to an agent in a micro-VM through the VMM's hybrid vsock socket:
//! connects to the unix socket, sends `CONNECT <port>`, waits for `OK`, then
//! speaks ttrpc over the stream. For trying the guest image by hand (see
//! guest-image/README.md); no test boots a VM.
//!
//! ```text
//! vsock_client --uds /tmp/v.sock [--port 1024] [--wait-secs 300]
//!              [--rootfs /dev/vda] [--destroy]
//! ```
//!
//! Calls Health and Version; with `--rootfs`, runs a busybox container whose
//! root is that guest path (e.g. the virtio-blk disk) and prints its output;
//! with `--destroy`, calls DestroySandbox (the agent then resets the VM).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skiff_agent_proto::agent as pb;
use skiff_agent_proto::agent_ttrpc::AgentClient;

const USAGE: &str = "usage: vsock_client --uds PATH [--port 1024] [--wait-secs 300] \
[--rootfs GUEST_PATH] [--destroy]";

struct Args {
    uds: PathBuf,
    port: u32,
    wait: Duration,
    rootfs: Option<String>,
    destroy: bool,
}

fn parse_args() -> Result<Args> {
    let mut uds = None;
    let mut port = skiff_agent_proto::AGENT_VSOCK_PORT;
    let mut wait = Duration::from_secs(300);
    let mut rootfs = None;
    let mut destroy = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--uds" => uds = Some(PathBuf::from(value()?)),
            "--port" => port = value()?.parse()?,
            "--wait-secs" => wait = Duration::from_secs(value()?.parse()?),
            "--rootfs" => rootfs = Some(value()?),
            "--destroy" => destroy = true,
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    Ok(Args {
        uds: uds.context(USAGE)?,
        port,
        wait,
        rootfs,
        destroy,
    })
}

/// One hybrid-vsock handshake: `CONNECT <port>\n` → `OK <host_port>\n`.
fn try_connect(args: &Args) -> Result<(UnixStream, String)> {
    let mut stream = UnixStream::connect(&args.uds)
        .with_context(|| format!("cannot connect to {:?}", args.uds))?;
    stream.write_all(format!("CONNECT {}\n", args.port).as_bytes())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Read byte by byte: everything after the newline is ttrpc's.
    let mut reader = BufReader::with_capacity(1, stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        bail!("the muxer answered {line:?}");
    }
    stream.set_read_timeout(None)?;
    Ok((stream, line.trim_end().to_owned()))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let start = Instant::now();
    let (stream, ok) = loop {
        match try_connect(&args) {
            Ok(connected) => break connected,
            Err(err) if start.elapsed() < args.wait => {
                eprintln!("[{:6.1}s] not yet: {err:#}", start.elapsed().as_secs_f64());
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(err) => return Err(err.context("the agent did not answer in time")),
        }
    };
    println!(
        "[{:6.1}s] CONNECT {} -> {ok}",
        start.elapsed().as_secs_f64(),
        args.port
    );
    let client = AgentClient::new(ttrpc::Client::new(stream.into_raw_fd())?);
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);

    let t = Instant::now();
    let health = client.health(ctx(), &pb::Empty::new())?;
    println!(
        "Health: {} ({:.1} ms)",
        health.status,
        t.elapsed().as_secs_f64() * 1e3
    );
    let version = client.version(ctx(), &pb::Empty::new())?;
    println!(
        "Version: agent {} protocol {}",
        version.agent_version, version.protocol_version
    );

    if let Some(rootfs) = &args.rootfs {
        run_container(&client, rootfs, &ctx)?;
    }
    if args.destroy {
        client.destroy_sandbox(ctx(), &pb::Empty::new())?;
        println!("DestroySandbox: ok (the VM resets now)");
    }
    Ok(())
}

fn run_container(
    client: &AgentClient,
    rootfs: &str,
    ctx: &dyn Fn() -> ttrpc::context::Context,
) -> Result<()> {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec
        .process()
        .clone()
        .context("default spec has a process")?;
    process.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "echo hello from $(hostname) on $(uname -r); cat /etc/from-disk 2>/dev/null; true".into(),
    ]));
    process.set_env(Some(vec!["PATH=/bin".into(), "HOME=/root".into()]));
    spec.set_process(Some(process));
    let t = Instant::now();
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = "hello".into();
    req.spec_json = serde_json::to_vec(&spec)?;
    req.rootfs = rootfs.into();
    client.create_container(ctx(), &req)?;
    println!(
        "CreateContainer: ok ({:.0} ms)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut id = pb::ContainerRequest::new();
    id.container_id = "hello".into();
    client.start_container(ctx(), &id)?;
    let mut out = Vec::new();
    loop {
        let mut read = pb::ReadStreamRequest::new();
        read.container_id = "hello".into();
        let resp = client.read_stdout(ctx(), &read)?;
        if resp.eof {
            break;
        }
        out.extend_from_slice(&resp.data);
    }
    let mut wait = pb::ProcessRequest::new();
    wait.container_id = "hello".into();
    let status = client.wait_process(ctx(), &wait)?;
    print!("container stdout:\n{}", String::from_utf8_lossy(&out));
    println!(
        "container exit status {} (create to exit {:.0} ms)",
        status.exit_status,
        t.elapsed().as_secs_f64() * 1e3
    );
    client.remove_container(ctx(), &id)?;
    println!("RemoveContainer: ok");
    Ok(())
}
