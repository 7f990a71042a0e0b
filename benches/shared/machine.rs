//! The machine a bench ran on, for the first line of its results: cores, CPU model,
//! memory, and the versions of etcd, HAProxy and Portolan measured.

/// `2 cores (…), 23 GiB; etcd Version: …; HAProxy version …; portolan …`.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
        / 1024;
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    format!(
        "{cores} cores ({model}), {mem} GiB; {}; {}; portolan {}",
        version("etcd", "--version"),
        version("haproxy", "-v"),
        env!("CARGO_PKG_VERSION")
    )
}
