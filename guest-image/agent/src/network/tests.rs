//! Tests of `ConfigureNetwork`: the refusal, error classes, the files, and
//! (as root) the whole apply in a throwaway network namespace, read back
//! with iproute2 as an independent witness.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use serde_json::Value;

use super::*;

const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05];

fn address(address: &str, prefix_len: u32) -> pb::IpAddress {
    pb::IpAddress {
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn route(destination: &str, gateway: &str) -> pb::Route {
    pb::Route {
        destination: destination.into(),
        gateway: gateway.into(),
        ..Default::default()
    }
}

/// eth0 with MTU 1400, an IPv4 /24 and an IPv6 /64; an on-link route, a
/// route through a gateway that only the on-link route reaches (listed
/// first, so it works only if on-link routes go first), and both default
/// routes.
fn request() -> pb::ConfigureNetworkRequest {
    pb::ConfigureNetworkRequest {
        interfaces: vec![pb::NetInterface {
            name: "eth0".into(),
            mac: MAC.to_vec(),
            mtu: 1400,
            addresses: vec![address("10.88.0.5", 24), address("fd00:88::5", 64)],
            ..Default::default()
        }],
        routes: vec![
            route("10.200.0.0/16", "10.99.0.1"),
            route("10.99.0.0/16", ""),
            route("", "10.88.0.1"),
            route("", "fd00:88::1"),
        ],
        hosts: "127.0.0.1 localhost\n10.88.0.5 pod\n".into(),
        resolv_conf: "nameserver 10.88.0.1\nsearch svc.cluster.local\n".into(),
        ..Default::default()
    }
}

#[test]
fn refuses_outside_the_guest_init_before_anything_else() {
    // A valid request and a malformed one: both refused, nothing applied
    // (this test runs on the host, often as root: a bug here would rename
    // the host's NIC).
    let mut malformed = request();
    malformed.interfaces.clear();
    for req in [request(), malformed] {
        let err = configure_network(false, &req).unwrap_err();
        assert!(matches!(err, NetworkError::NotGuestInit), "{err:?}");
        assert!(!err.is_invalid_request());
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }
}

#[test]
fn error_classes() {
    let mut req = request();
    req.interfaces[0].mtu = 1;
    let err = NetworkConfig::try_from_request(&req).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        NetworkError::NoNic(vec!["lo".into()]).kind(),
        ErrorKind::FailedPrecondition
    );
    assert_eq!(
        NetworkError::SeveralNics(vec!["eth0".into(), "eth1".into()]).kind(),
        ErrorKind::FailedPrecondition
    );
    let failed = NetworkError::SetLink {
        link: "eth0".into(),
        change: LinkChange::Mtu(1400),
        source: RtnlError::Kernel {
            errno: libc::EINVAL,
            message: Some("MTU too large".into()),
        },
    };
    assert_eq!(failed.kind(), ErrorKind::Internal);
    let text = skiff_agent_proto::error_chain(&failed);
    assert_eq!(
        text,
        "link eth0: cannot set its MTU to 1400: Invalid argument (os error 22) \
         (kernel: MTU too large)"
    );
}

#[test]
fn files_are_replaced_whole_and_etc_is_created() {
    let root = tempfile::tempdir().unwrap();
    let config = NetworkConfig::try_from_request(&request()).unwrap();
    // No etc/ yet.
    config.write_files(root.path()).unwrap();
    let hosts = root.path().join(HOSTS_PATH);
    let resolv = root.path().join(RESOLV_CONF_PATH);
    assert_eq!(std::fs::read_to_string(&hosts).unwrap(), request().hosts);
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        request().resolv_conf
    );
    for file in [&hosts, &resolv] {
        assert_eq!(std::fs::metadata(file).unwrap().mode() & 0o7777, 0o644);
    }
    let etc = root.path().join("etc");
    assert_eq!(std::fs::metadata(&etc).unwrap().mode() & 0o7777, 0o755);

    // Over the old files, with a leftover temporary file; empty fields
    // leave a file alone.
    std::fs::write(etc.join("hosts.skiff-new"), "junk").unwrap();
    let mut req = request();
    req.hosts = "10.88.0.6 other\n".into();
    req.resolv_conf.clear();
    let config = NetworkConfig::try_from_request(&req).unwrap();
    config.write_files(root.path()).unwrap();
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "10.88.0.6 other\n"
    );
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        request().resolv_conf
    );
    let mut names: Vec<_> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["hosts", "resolv.conf"]);
}

#[test]
fn file_errors_name_the_file() {
    let root = tempfile::tempdir().unwrap();
    // etc is a file: neither the directory nor the files can be made.
    std::fs::write(root.path().join("etc"), "").unwrap();
    let config = NetworkConfig::try_from_request(&request()).unwrap();
    match config.write_files(root.path()).unwrap_err() {
        NetworkError::WriteFile { path, .. } => {
            assert!(path.starts_with(root.path().join("etc")), "{path:?}")
        }
        other => panic!("{other:?}"),
    }
}

/// Why a root-only test cannot run here, if it cannot.
fn netns_unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for a network namespace)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2's `ip` to create links and read them back".into());
    }
    None
}

/// Runs `test` on a new thread in a new, empty network namespace, which
/// goes away with the thread; commands it spawns (`ip`) run in that
/// namespace too. The host's own links are never touched. Returns `None`
/// (and prints why) when the namespace cannot be made.
pub(super) fn in_throwaway_netns<T: Send>(test: impl FnOnce() -> T + Send) -> Option<T> {
    if let Some(reason) = netns_unavailable() {
        eprintln!("skipped: {reason}");
        return None;
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Err(errno) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                    eprintln!("skipped: cannot unshare a network namespace: {errno}");
                    return None;
                }
                Some(test())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `ip <args>` (in the calling thread's namespace); its stdout, or
/// its stderr as the error.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").args(args).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ip_json(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let text = ip(&all).unwrap_or_else(|err| panic!("ip {args:?}: {err}"));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("ip {args:?}: {err}: {text}"))
}

/// Adds an Ethernet link with nothing behind it: `dummy`, or where the
/// kernel has no dummy driver a persistent tap (no carrier, which changes
/// nothing here). `Err` says why neither works.
fn add_fake_nic(name: &str) -> Result<(), String> {
    let mut errors = Vec::new();
    for args in [
        &["link", "add", name, "type", "dummy"][..],
        &["tuntap", "add", "dev", name, "mode", "tap"],
    ] {
        match ip(args) {
            Ok(_) => return Ok(()),
            Err(err) => errors.push(format!("ip {}: {}", args.join(" "), err.trim())),
        }
    }
    Err(errors.join("; "))
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link["flags"].as_array().unwrap().iter().any(|f| f == flag)
}

/// The routes of `family` (`-4`, `-6`) as "dst via gateway dev scope".
fn routes(family: &str) -> Vec<String> {
    ip_json(&[family, "route", "show", "table", "main"])
        .iter()
        .map(|r| {
            let field = |name: &str| r[name].as_str().unwrap_or("-").to_owned();
            format!(
                "{} via {} dev {} scope {}",
                field("dst"),
                field("gateway"),
                field("dev"),
                field("scope")
            )
        })
        .collect()
}

/// Reads the namespace back and checks it holds what [`request`] asks,
/// with MAC `mac`.
fn assert_configured(mac: &str) {
    let lo = &ip_json(&["link", "show", "dev", "lo"])[0];
    assert!(has_flag(lo, "UP"), "lo is not up: {lo}");

    let links = ip_json(&["link", "show"]);
    let names: Vec<_> = links
        .iter()
        .map(|l| l["ifname"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lo", "eth0"]);
    let eth0 = &links[1];
    assert!(has_flag(eth0, "UP"), "{eth0}");
    assert_eq!(eth0["mtu"], 1400);
    assert_eq!(eth0["address"], mac);

    let addresses = &ip_json(&["addr", "show", "dev", "eth0"])[0]["addr_info"];
    let find = |local: &str| {
        addresses
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["local"] == local)
            .unwrap_or_else(|| panic!("no {local} in {addresses}"))
            .clone()
    };
    let v4 = find("10.88.0.5");
    assert_eq!(
        (v4["family"].as_str(), v4["prefixlen"].as_u64()),
        (Some("inet"), Some(24))
    );
    assert_eq!(v4["broadcast"], "10.88.0.255");
    assert_eq!(v4["scope"], "global");
    let v6 = find("fd00:88::5");
    assert_eq!(
        (v6["family"].as_str(), v6["prefixlen"].as_u64()),
        (Some("inet6"), Some(64))
    );
    assert_eq!(v6["scope"], "global");
    assert!(v6.get("tentative").is_none(), "DAD was not skipped: {v6}");

    let v4_routes = routes("-4");
    for expected in [
        "default via 10.88.0.1 dev eth0 scope -",
        "10.88.0.0/24 via - dev eth0 scope link",
        "10.99.0.0/16 via - dev eth0 scope link",
        "10.200.0.0/16 via 10.99.0.1 dev eth0 scope -",
    ] {
        assert!(
            v4_routes.iter().any(|r| r == expected),
            "no {expected:?} in {v4_routes:#?}"
        );
    }
    assert_eq!(v4_routes.len(), 4, "{v4_routes:#?}");
    let v6_routes = routes("-6");
    for expected in [
        "default via fd00:88::1 dev eth0 scope -",
        "fd00:88::/64 via - dev eth0 scope -",
    ] {
        assert!(
            v6_routes.iter().any(|r| r == expected),
            "no {expected:?} in {v6_routes:#?}"
        );
    }
}

#[test]
fn applies_a_request_in_a_throwaway_netns_twice() {
    let root = tempfile::tempdir().unwrap();
    let ran = in_throwaway_netns(|| {
        if let Err(why) = add_fake_nic("d0") {
            eprintln!("skipped: cannot add a dummy Ethernet link: {why}");
            return;
        }
        // Already up, MTU 1500, its own random MAC.
        ip(&["link", "set", "d0", "up"]).unwrap();
        let config = NetworkConfig::try_from_request(&request()).unwrap();
        config.apply(root.path()).unwrap();
        assert_configured("02:42:0a:58:00:05");

        // Again: nothing fails (addresses and routes that exist are fine),
        // and the link, whose name and MAC are right, is not taken down:
        // that would drop an IPv6 address the request does not have.
        ip(&["addr", "add", "fd00:99::9/64", "dev", "eth0", "nodad"]).unwrap();
        config.apply(root.path()).unwrap();
        assert_configured("02:42:0a:58:00:05");
        let v6 = ip(&["-6", "addr", "show", "dev", "eth0"]).unwrap();
        assert!(v6.contains("fd00:99::9/64"), "the link went down: {v6}");

        // A new MAC (a clone of a template VM): the link goes down for it,
        // which drops its IPv6 addresses and routes; all come back.
        let mut req = request();
        req.interfaces[0].mac[5] = 6;
        let config = NetworkConfig::try_from_request(&req).unwrap();
        config.apply(root.path()).unwrap();
        assert_configured("02:42:0a:58:00:06");
        let v6 = ip(&["-6", "addr", "show", "dev", "eth0"]).unwrap();
        assert!(
            !v6.contains("fd00:99::9/64"),
            "the link did not go down: {v6}"
        );
    });
    if ran.is_none() {
        return;
    }
    let etc = root.path().join("etc");
    assert_eq!(
        std::fs::read_to_string(etc.join("hosts")).unwrap(),
        request().hosts
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("resolv.conf")).unwrap(),
        request().resolv_conf
    );
}

#[test]
fn a_guest_without_exactly_one_nic_is_refused_but_lo_comes_up() {
    let root = tempfile::tempdir().unwrap();
    in_throwaway_netns(|| {
        let config = NetworkConfig::try_from_request(&request()).unwrap();
        // Only lo (down, as in any new namespace).
        let err = config.apply(root.path()).unwrap_err();
        assert!(
            matches!(&err, NetworkError::NoNic(links) if links == &["lo"]),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(has_flag(&ip_json(&["link", "show", "dev", "lo"])[0], "UP"));

        if let Err(why) = add_fake_nic("d0").and_then(|()| add_fake_nic("d1")) {
            eprintln!("skipped the two-link half: cannot add dummy Ethernet links: {why}");
            return;
        }
        let err = config.apply(root.path()).unwrap_err();
        assert!(
            matches!(&err, NetworkError::SeveralNics(nics) if nics == &["d0", "d1"]),
            "{err:?}"
        );
        // Neither was touched.
        let names: Vec<_> = ip_json(&["link", "show"])
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["lo", "d0", "d1"]);
    });
    // The files are written only after the network: none here.
    assert!(!root.path().join("etc").exists());
}
