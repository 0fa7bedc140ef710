//! vmdisk-layout (being written).
