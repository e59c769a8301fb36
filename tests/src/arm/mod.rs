//! Emulated Azure Resource Manager (VMs and VM scale sets). Being written.
