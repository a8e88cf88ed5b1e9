//! A PostgreSQL server of a test's own (`initdb`, `pg_ctl`), which it may stop and start
//! without touching the machine's shared one.

use std::process::{Command, Stdio};

/// A PostgreSQL server of the test's own, in a temporary directory (run as `postgres` when the
/// test runs as root, which PostgreSQL refuses).
pub struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl OwnPostgres {
    pub fn start() -> Option<OwnPostgres> {
        let bin = ["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("initdb").exists())?;
        let dir = tempfile::tempdir().ok()?;
        let port = super::free_port();
        let pg = OwnPostgres { dir, bin, port };
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            Command::new("chown").args(["-R", "postgres"]).arg(pg.dir.path()).status().ok()?;
            // The temporary directory's parent must let postgres in.
        }
        let data = pg.dir.path().join("data");
        pg.run(&["initdb", "-A", "trust", "-U", "postgres", "-D", data.to_str()?]).then_some(())?;
        pg.ctl("start").then_some(pg)
    }

    fn run(&self, args: &[&str]) -> bool {
        let program = self.bin.join(args[0]);
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    pub fn ctl(&self, action: &str) -> bool {
        let data = self.dir.path().join("data");
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let log = self.dir.path().join("log");
        self.run(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap(),
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-m",
            "fast",
            action,
        ])
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.ctl("stop");
    }
}
