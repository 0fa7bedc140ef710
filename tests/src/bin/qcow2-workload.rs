//! Crash-test workload: open an image read-write through `vmdisk_image::open` and write to
//! it forever (seeded random writes, zero writes, discards, reads, occasional flushes) until
//! killed. Prints `ready` on stdout once the image is open.
//!
//! usage: qcow2-workload IMAGE SEED CLUSTER_SIZE

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;

use tests::{error_chain, Op, Rng};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: qcow2-workload IMAGE SEED CLUSTER_SIZE");
        std::process::exit(2);
    }
    let path = PathBuf::from(&args[1]);
    let seed: u64 = args[2].parse().expect("SEED is a number");
    let cluster: u64 = args[3].parse().expect("CLUSTER_SIZE is a number");
    let opts = vmdisk_image::OpenOptions {
        read_only: false,
        ..Default::default()
    };
    let img = match vmdisk_image::open(&path, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("open {}: {}", path.display(), error_chain(&e));
            std::process::exit(1);
        }
    };
    let dev = img.dev();
    let size = dev.len();
    println!("ready");
    std::io::stdout().flush().ok();
    let mut rng = Rng::new(seed);
    let mut buf = Vec::new();
    for i in 0u64.. {
        let op = Op::random(&mut rng, size, cluster);
        let r = match &op {
            Op::Write { off, len, seed } => dev.write_all_at(&Op::write_data(*len, *seed), *off),
            Op::Zero {
                off,
                len,
                may_unmap,
            } => dev.write_zeroes(*off, *len, *may_unmap),
            Op::Discard { off, len } => dev.discard(*off, *len),
            Op::Flush => dev.flush(),
            Op::Verify { off, len } => {
                buf.resize(*len as usize, 0);
                dev.read_exact_at(&mut buf, *off)
            }
        };
        if let Err(e) = r {
            eprintln!("op #{i} {op:?} failed: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}
