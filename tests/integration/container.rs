//! The container image as it runs, without a container engine: deploy/Dockerfile's command
//! line, environment and files (read from the Dockerfile itself), the stripped binary it ships,
//! a non-root user, a read-only configuration directory and a writable data directory, reached
//! on a non-loopback address. And `causeway check --offline` on the cluster configuration with
//! none of its secrets set, as a pipeline runs it before promotion.

use crate::common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// What deploy/Dockerfile's final stage says.
struct Image {
    env: BTreeMap<String, String>,
    /// ENTRYPOINT then CMD.
    command: Vec<String>,
    healthcheck: Vec<String>,
    user: String,
    /// (repository path, path in the image) of the final stage's configuration copies.
    copies: Vec<(String, String)>,
}

fn json_array(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not a JSON array: {text}: {e}"))
}

fn read_dockerfile() -> Image {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let last_stage = &text[text.rfind("\nFROM ").expect("a final stage")..];
    let mut image = Image {
        env: BTreeMap::new(),
        command: Vec::new(),
        healthcheck: Vec::new(),
        user: String::new(),
        copies: Vec::new(),
    };
    let (mut entrypoint, mut cmd) = (Vec::new(), Vec::new());
    for line in last_stage.lines() {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV K=V");
                image.env.insert(k.to_string(), v.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = json_array(rest);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            cmd = json_array(rest);
        } else if let Some(rest) = line.strip_prefix("USER ") {
            image.user = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("HEALTHCHECK ") {
            image.healthcheck = json_array(&rest[rest.find("CMD ").unwrap() + 4..]);
        } else if let Some(rest) = line.strip_prefix("COPY ").filter(|r| !r.starts_with("--from")) {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            image.copies.push((parts[0].to_string(), parts[1].to_string()));
        }
    }
    image.command = entrypoint.into_iter().chain(cmd).collect();
    image
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            copy_tree(&path, &to.join(path.file_name().unwrap()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Read-only for everyone, owned by whoever runs the test (root in CI): 0555 directories, 0444 files.
fn make_read_only(path: &Path) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            make_read_only(&entry.unwrap().path());
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o555)).unwrap();
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
}

/// An IPv4 address of this machine that is not loopback.
fn non_loopback_address() -> Option<String> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(String::from)
}

const NOBODY: u32 = 65534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_shipped_non_root_with_read_only_configuration_on_a_non_loopback_address() {
    let image = read_dockerfile();
    assert_eq!(image.command, ["causeway", "serve", "-c", "/etc/causeway"]);
    assert_eq!(image.healthcheck, ["causeway", "health"]);
    assert!(!image.user.is_empty() && image.user != "root", "the image runs without root");
    let Some(address) = non_loopback_address() else {
        common::missing_service(
            "a non-loopback IPv4 address",
            "the image listens on 0.0.0.0 and is reached from outside loopback: give the machine one",
        );
        return;
    };

    // A root the unprivileged user can traverse.
    let root = tempfile::Builder::new().prefix("causeway-image").tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let in_root = |image_path: &str| root.path().join(image_path.trim_start_matches('/'));

    // The binary the image ships: stripped, its debug information apart.
    let bin_dir = in_root("usr/local/bin");
    let split =
        Command::new(repo("scripts/split-debuginfo")).arg(common::binary()).arg(&bin_dir).status().unwrap();
    assert!(split.success());
    let shipped = bin_dir.join("causeway");
    let (full, stripped) =
        (std::fs::metadata(common::binary()).unwrap().len(), std::fs::metadata(&shipped).unwrap().len());
    assert!(stripped * 3 < full, "stripped {stripped} bytes of {full}");
    assert!(bin_dir.join("causeway.debug").exists());
    let link = Command::new("objdump").args(["-s", "-j", ".gnu_debuglink"]).arg(&shipped).output().unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("causeway.debug"),
        "the executable names its debug file"
    );
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The configuration the image copies, read-only; the data directory writable by the user.
    for (from, to) in image.copies.iter().filter(|(_, to)| to.starts_with("/etc/causeway")) {
        copy_tree(&repo(from), &in_root(to));
    }
    let config = in_root("etc/causeway");
    make_read_only(&config);
    std::fs::set_permissions(in_root("etc"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = in_root(image.env["CAUSEWAY_DATA_DIR"].as_str());
    std::fs::create_dir_all(&data).unwrap();
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
    for dir in [in_root("var"), in_root("var/lib"), in_root("usr"), in_root("usr/local")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // The image's environment, its paths under this root and its ports free ones (the host
    // part, 0.0.0.0, as the image says). The embedded sandbox gets a free port too.
    let mut env = image.env.clone();
    let (proxy, admin, metrics, sandbox) =
        (common::free_port(), common::free_port(), common::free_port(), common::free_port());
    for (key, port) in [
        ("CAUSEWAY_PROXY_LISTEN", proxy),
        ("CAUSEWAY_ADMIN_LISTEN", admin),
        ("CAUSEWAY_METRICS_LISTEN", metrics),
    ] {
        let host = env[key].rsplit_once(':').unwrap().0.to_string();
        assert_eq!(host, "0.0.0.0", "{key} listens on all interfaces");
        env.insert(key.into(), format!("{host}:{port}"));
    }
    env.insert("CAUSEWAY_DATA_DIR".into(), data.display().to_string());
    env.insert("CAUSEWAY_ADMIN_ADDRESS".into(), format!("127.0.0.1:{admin}"));
    env.insert("CAUSEWAY_SANDBOX_LISTEN".into(), format!("127.0.0.1:{sandbox}"));
    env.insert("CAUSEWAY_BC_URL".into(), format!("http://127.0.0.1:{sandbox}"));
    let command: Vec<String> = image
        .command
        .iter()
        .map(|a| if a.starts_with("/etc/causeway") { config.display().to_string() } else { a.clone() })
        .collect();
    let as_user = |program: &Path, args: &[String]| {
        let mut c = if as_root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", &NOBODY.to_string(), "--regid", &NOBODY.to_string(), "--clear-groups", "--"])
                .arg(program);
            c
        } else {
            Command::new(program)
        };
        c.args(args).env_clear().env("PATH", "/usr/bin:/bin").envs(&env).current_dir("/");
        c
    };
    let log = root.path().join("gateway.log");
    let mut gateway = as_user(&shipped, &command[1..])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(root.path().join("gateway.err")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let logs = || {
        format!(
            "{}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(root.path().join("gateway.err")).unwrap_or_default()
        )
    };

    // HEALTHCHECK, as the image runs it, until it passes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = as_user(&shipped, &image.healthcheck[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            break;
        }
        assert!(gateway.try_wait().unwrap().is_none(), "the gateway exited:\n{}", logs());
        assert!(Instant::now() < deadline, "the health check never passed:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    common::install_tls_provider();
    let resp = reqwest::Client::new()
        .get(format!("http://{address}:{proxy}/erp/v2/customers?$top=1"))
        .header("x-api-key", "demo-erp-read-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", logs());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 1);
    let ready = reqwest::get(format!("http://{address}:{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);

    // The store is in the data directory, owned by the user; nothing was written to the
    // configuration.
    let db = data.join("causeway.db");
    assert!(db.exists(), "{}", logs());
    if as_root {
        assert_eq!(std::fs::metadata(&db).unwrap().uid(), NOBODY);
    }
    let mut written = Vec::new();
    let mut stack = vec![config.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if !repo("").join(path.strip_prefix(&config).unwrap()).exists() {
                written.push(path);
            }
        }
    }
    assert!(written.is_empty(), "the gateway wrote into its configuration: {written:?}");

    unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while gateway.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the gateway");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the temporary directory go.
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(root.path()).status();
}

#[test]
fn check_offline_passes_the_cluster_configuration_with_no_secret_set_and_the_strict_check_names_them() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&repo("deploy/cluster/causeway.yaml"), &dir.path().join("causeway.yaml"));
    copy_tree(&repo("routes"), &dir.path().join("routes"));
    copy_tree(&repo("policies"), &dir.path().join("policies"));
    let run = |args: &[&str]| {
        let out =
            Command::new(common::binary()).args(args).arg("-c").arg(dir.path()).env_clear().output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let secrets = ["CAUSEWAY_BC_URL", "CAUSEWAY_BC_TOKEN", "CAUSEWAY_DATABASE_URL", "CAUSEWAY_REDIS_URL"];
    let (ok, err) = run(&["check", "--offline"]);
    assert!(ok, "{err}");
    for name in secrets {
        assert!(err.contains(&format!("warning: environment variable {name} is not set")), "{name}: {err}");
    }
    let (ok, err) = run(&["check"]);
    assert!(!ok);
    for name in secrets {
        assert!(err.contains(&format!("environment variable {name} is not set; export it")), "{name}: {err}");
    }
    assert!(err.contains("4 problem(s) found"), "{err}");
}
