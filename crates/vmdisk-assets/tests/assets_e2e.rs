//! End to end over the real pinned packages: download (or reuse from the cache) and verify
//! every package of the committed lock, unpack the kernel, extract the bootable vmlinux, compute
//! the module load order, and the library closure of the guest's dynamic programs.
//!
//! The first run downloads ~90 MB into the cache (`$VMDISK_CACHE`, else ~/.cache/vmdisk);
//! later runs only re-hash. Offline machines can point `VMDISK_DEB_DIR` at a folder of the
//! pinned .debs.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use vmdisk_assets::assets::{Cache, Lock, LockedPackage, Role};
use vmdisk_assets::{elf, kernel, Arch};

fn setup() -> (Cache, Lock) {
    let lock = Lock::builtin().expect("the committed lock parses");
    let cache = Cache::new(Cache::default_root().expect("a cache folder"));
    (cache, lock)
}

fn kernel_package(lock: &Lock) -> &LockedPackage {
    lock.packages
        .iter()
        .find(|p| p.name.starts_with("linux-image-") && p.arch == "amd64")
        .expect("the lock pins an amd64 kernel")
}

#[test]
fn every_locked_package_downloads_and_matches_its_sha256() {
    let (cache, lock) = setup();
    for p in &lock.packages {
        let path = cache.deb(p).unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
        assert_eq!(fs::metadata(&path).unwrap().len(), p.size, "{}", p.name);
        let control_version = vmdisk_assets::deb::control_field(&path, "Version")
            .unwrap()
            .unwrap();
        assert_eq!(control_version, p.version, "{}", p.name);
    }
    assert!(lock.packages.iter().any(|p| p.role == Role::Host));
}

#[test]
fn x86_64_kernel_boot_image_and_module_order() {
    let (cache, lock) = setup();
    let kpkg = kernel_package(&lock);
    let root = cache.unpacked(kpkg).unwrap();
    let release = kernel::kernel_release(&root).unwrap();
    assert!(kpkg.name.ends_with(&release), "{} vs {release}", kpkg.name);

    let vmlinuz = fs::read(root.join(format!("boot/vmlinuz-{release}"))).unwrap();
    let t = std::time::Instant::now();
    let image = kernel::boot_image(Arch::X86_64, &vmlinuz).unwrap();
    let info = elf::inspect(&image).unwrap();
    assert_eq!(elf::machine_name(info.machine), "x86-64");
    assert!(info.class64);
    eprintln!(
        "vmlinux: {} bytes from a {}-byte bzImage in {:?}",
        image.len(),
        vmlinuz.len(),
        t.elapsed()
    );

    let modroot = kernel::modules_dir(&root).unwrap();
    let wanted = [
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "ext4",
        "9pnet_virtio",
        "9p",
        "overlay",
        "nbd",
    ];
    let t = std::time::Instant::now();
    let order = kernel::load_order(&modroot, &wanted).unwrap();
    eprintln!("load order ({:?}):", t.elapsed());
    let name_of = |p: &PathBuf| {
        let f = p.file_name().unwrap().to_string_lossy();
        kernel::normalize_module_name(f.trim_end_matches(".ko"))
    };
    let pos: HashMap<String, usize> = order
        .iter()
        .enumerate()
        .map(|(i, p)| (name_of(p), i))
        .collect();
    assert_eq!(pos.len(), order.len(), "no module twice");
    for (i, p) in order.iter().enumerate() {
        eprintln!("  {}", p.display());
        let info = kernel::modinfo(&fs::read(modroot.join(p)).unwrap()).unwrap();
        for d in &info.depends {
            // Dependencies not in the order are built in.
            if let Some(&j) = pos.get(d) {
                assert!(j < i, "{d} must load before {}", name_of(p));
            }
        }
    }
    for w in wanted {
        assert!(pos.contains_key(w), "{w} is loaded");
    }
    assert!(pos["crc32c_generic"] < pos["ext4"], "ext4's softdep crc32c");
    assert!(pos["virtio_ring"] < pos["virtio_pci"]);
    assert!(pos["failover"] < pos["net_failover"] && pos["net_failover"] < pos["virtio_net"]);
    assert!(pos["9pnet"] < pos["9pnet_virtio"] && pos["netfs"] < pos["9p"]);
    // Deterministic.
    assert_eq!(kernel::load_order(&modroot, &wanted).unwrap(), order);
}

#[test]
fn library_closure_of_the_guest_programs() {
    let (cache, lock) = setup();
    let names: Vec<&str> = lock
        .packages
        .iter()
        .filter(|p| {
            p.role == Role::Guest && p.arch == "amd64" && !p.name.starts_with("linux-image-")
        })
        .map(|p| p.name.as_str())
        .collect();
    let sysroot = cache
        .clone()
        .with_lock(lock.clone())
        .sysroot(Arch::X86_64, &names)
        .unwrap();
    let programs = [
        PathBuf::from("usr/sbin/dropbear"),
        PathBuf::from("sbin/nbd-client"),
    ];
    let closure = elf::library_closure(&sysroot, Arch::X86_64, &programs).unwrap();
    eprintln!("closure:");
    for p in &closure {
        let kind = if sysroot
            .join(p)
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
        {
            format!(" -> {}", fs::read_link(sysroot.join(p)).unwrap().display())
        } else {
            String::new()
        };
        eprintln!("  {}{kind}", p.display());
    }
    let has = |name: &str| closure.iter().any(|p| p.file_name().unwrap() == name);
    for lib in [
        "ld-linux-x86-64.so.2",
        "libc.so.6",
        "libtomcrypt.so.1",
        "libtommath.so.1",
        "libz.so.1",
        "libcrypt.so.1",
        "libgnutls.so.30",
        "libnl-3.so.200",
        "libnl-genl-3.so.200",
        "libnettle.so.8",
        "libhogweed.so.6",
        "libgmp.so.10",
        "libp11-kit.so.0",
        "libffi.so.8",
    ] {
        assert!(has(lib), "{lib} is in the closure");
    }
    assert!(closure.contains(&PathBuf::from("lib64/ld-linux-x86-64.so.2")));
    // Copying exactly these paths gives a tree where every program's libraries resolve.
    let copy = tempfile::tempdir().unwrap();
    for p in programs.iter().chain(&closure) {
        let (src, dst) = (sysroot.join(p), copy.path().join(p));
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        if src.symlink_metadata().unwrap().file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
    assert_eq!(
        elf::library_closure(copy.path(), Arch::X86_64, &programs).unwrap(),
        closure
    );
}
