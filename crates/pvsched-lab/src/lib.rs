//! Lab: boots real Linux guests under QEMU and compares scheduling configurations side by side.
