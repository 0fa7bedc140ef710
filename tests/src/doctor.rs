//! What `vmdisk doctor builder --json` reports for a good builder, shared by the tests that
//! run it against a local sshd and against the aarch64 test VM.

use serde_json::Value;

/// Every check a run with one machine reports (list-level checks, then machine 0's).
pub const CHECK_IDS: &[&str] = &[
    "machines-parse",
    "builders-disabled",
    "duplicate-machines",
    "ssh-config",
    "host-resolves",
    "port-open",
    "ssh-banner",
    "host-key",
    "key-file",
    "key-readable",
    "auth",
    "remote-nix",
    "systems",
    "features",
];

/// Every id of [`CHECK_IDS`] is reported, and each report of it passed; `context` is printed
/// with a failure (an sshd log, a console).
#[track_caller]
pub fn assert_every_check_passes(v: &Value, context: &dyn Fn() -> String) {
    let all: Vec<&Value> = v["checks"]
        .as_array()
        .expect("list checks")
        .iter()
        .chain(
            v["machines"][0]["checks"]
                .as_array()
                .expect("machine checks"),
        )
        .collect();
    for id in CHECK_IDS {
        let c: Vec<_> = all.iter().filter(|c| c["id"] == *id).collect();
        assert!(!c.is_empty(), "no `{id}` check: {v:#}");
        for c in c {
            assert_eq!(c["verdict"], "pass", "{c:#}\n{}", context());
        }
    }
}
