//! Ctrl-C, SIGTERM and SIGHUP for commands that write files.
//!
//! [`cancel_on_interrupt`] blocks the three signals in the calling thread (and so in every
//! thread it starts later) and hands them to one thread that waits for them with `sigwait`:
//! the first raises the returned [`Cancel`], the operation stops at its next safe point and
//! unwinds, removing its temporary output; a second one, when the operation has not finished
//! unwinding, removes every registered temporary output and exits at once with 128 + signal —
//! except while an in-place edit is still open (commit, rebase, snapshot, check -r, passwd):
//! exiting would leave that file half-changed, so the second signal waits for the rollback and
//! only a third exits at once.
//! Commands that do not poll a [`Cancel`] never call this and keep the default behaviour.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmdisk_block::Cancel;

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

static CANCEL: OnceLock<Cancel> = OnceLock::new();
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signal that raised the cancel flag, if one did.
pub fn interrupted_by() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set it is given; sigaddset adds valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The process's cancel flag, raised by the first interrupt. Call it before starting threads.
pub fn cancel_on_interrupt() -> Cancel {
    CANCEL
        .get_or_init(|| {
            let cancel = Cancel::new();
            let set = signal_set();
            // SAFETY: `set` is a valid, initialised signal set; a null old-set is allowed.
            let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
            if rc != 0 {
                // Signals keep their default action: no cleanup, but nothing worse than today.
                return Cancel::never();
            }
            let flag = cancel.clone();
            let spawned = std::thread::Builder::new()
                .name("vmdisk-signals".into())
                .spawn(move || wait_for_signals(set, flag));
            if spawned.is_err() {
                // SAFETY: as above; unblocking restores the default behaviour.
                unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
                return Cancel::never();
            }
            cancel
        })
        .clone()
}

fn wait_for_signals(set: libc::sigset_t, cancel: Cancel) {
    let mut seen = 0;
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        seen += 1;
        if seen == 1 {
            SIGNAL.store(sig, Ordering::SeqCst);
            eprintln!(
                "vmdisk: interrupted; stopping and removing partial output (again to exit now)"
            );
            cancel.cancel();
        } else {
            // An in-place edit being rolled back would be left half-restored by an exit now:
            // the second signal waits for it, a third one exits anyway.
            let edits = vmdisk_block::cancel::pending_edits();
            if seen == 2 && !edits.is_empty() {
                let names: Vec<String> = edits.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "vmdisk: still putting {} back as it was; please wait (a third signal stops \
                     at once and leaves it half-restored)",
                    names.join(", ")
                );
                continue;
            }
            for p in vmdisk_block::remove_registered_temps() {
                eprintln!("vmdisk: removed {}", p.display());
            }
            std::process::exit(128 + sig);
        }
    }
}
