//! This process as named on the leases and in-flight keys it holds in the store, and whether the
//! holder named on one is still running: `<pid>:<start time>` (the start time from
//! `/proc/<pid>/stat`, so a reused pid does not pass for the process that held the lease).

/// This process's name on its leases.
pub fn current() -> String {
    static CURRENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CURRENT
        .get_or_init(|| {
            let pid = std::process::id();
            format!("{pid}:{}", start_time(pid).unwrap_or_default())
        })
        .clone()
}

/// Whether the process named `holder` still runs. An empty or unreadable name (a lease of an
/// earlier version) counts as gone.
pub fn alive(holder: &str) -> bool {
    let Some((pid, started)) = holder.split_once(':') else { return false };
    let Ok(pid) = pid.parse::<u32>() else { return false };
    match start_time(pid) {
        Some(now) => now.to_string() == started,
        // No /proc (not Linux): fall back to asking whether the pid exists.
        None if !std::path::Path::new("/proc/self/stat").exists() => {
            // SAFETY: kill(2) with signal 0 only checks for existence and permission.
            unsafe { libc::kill(pid as i32, 0) == 0 }
        }
        None => false,
    }
}

/// The name of the running process `pid` (tests and tools), if it runs.
pub fn name_of(pid: u32) -> Option<String> {
    start_time(pid).map(|t| format!("{pid}:{t}"))
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_others_are_not() {
        assert!(alive(&current()));
        let pid = std::process::id();
        assert!(!alive(&format!("{pid}:1")), "same pid, other start time: a reused pid");
        assert!(!alive(""));
        assert!(!alive("garbage"));
        assert!(!alive("4194304:1"), "beyond pid_max");
    }

    #[test]
    fn a_finished_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let name = format!("{pid}:{}", start_time(pid).unwrap_or_default());
        child.wait().unwrap();
        assert!(!alive(&name));
    }
}
