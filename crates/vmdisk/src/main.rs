//! The `vmdisk` binary: parse the command line and run it (all logic lives in the
//! `vmdisk` library target and in `vmdisk-image`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    vmdisk::main()
}
