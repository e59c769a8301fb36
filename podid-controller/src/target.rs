//! Assignment targets: the VM or VM scale set behind a node, from its
//! `spec.providerID`.
//!
//! A scale set's identities apply to all its instances, so every node of one
//! scale set maps to the same target.

use std::fmt;

use k8s_openapi::api::core::v1::Node;

/// Whether a target is a single VM or a scale set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// `Microsoft.Compute/virtualMachines`.
    VirtualMachine,
    /// `Microsoft.Compute/virtualMachineScaleSets`.
    ScaleSet,
}

impl TargetKind {
    /// The ARM resource type segment.
    pub fn resource_type(self) -> &'static str {
        match self {
            TargetKind::VirtualMachine => "virtualMachines",
            TargetKind::ScaleSet => "virtualMachineScaleSets",
        }
    }

    /// Short label used in metrics and logs (`vm`, `vmss`).
    pub fn label(self) -> &'static str {
        match self {
            TargetKind::VirtualMachine => "vm",
            TargetKind::ScaleSet => "vmss",
        }
    }
}

/// One VM or scale set. Ordering and equality are case-insensitive, as ARM
/// resource IDs are.
#[derive(Clone, Debug)]
pub struct Target {
    /// VM or scale set.
    pub kind: TargetKind,
    /// Subscription ID.
    pub subscription: String,
    /// Resource group, as spelled in the provider ID.
    pub resource_group: String,
    /// VM or scale set name.
    pub name: String,
    key: String,
}

impl Target {
    /// A target from its parts.
    pub fn new(kind: TargetKind, subscription: &str, resource_group: &str, name: &str) -> Self {
        let key = format!(
            "/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/microsoft.compute/{}/{name}",
            kind.resource_type()
        )
        .to_ascii_lowercase();
        Target {
            kind,
            subscription: subscription.to_string(),
            resource_group: resource_group.to_string(),
            name: name.to_string(),
            key,
        }
    }

    /// Parses an Azure provider ID:
    /// `azure:///subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/VM` or
    /// `…/virtualMachineScaleSets/SS/virtualMachines/INSTANCE`.
    pub fn from_provider_id(provider_id: &str) -> Option<Self> {
        let path = provider_id.strip_prefix("azure://")?;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let eq = |i: usize, want: &str| parts.get(i).is_some_and(|p| p.eq_ignore_ascii_case(want));
        if !(eq(0, "subscriptions") && eq(2, "resourceGroups") && eq(4, "providers")) {
            return None;
        }
        if !eq(5, "Microsoft.Compute") {
            return None;
        }
        let subscription = parts.get(1)?;
        let resource_group = parts.get(3)?;
        let name = parts.get(7)?;
        if eq(6, "virtualMachineScaleSets") {
            Some(Target::new(
                TargetKind::ScaleSet,
                subscription,
                resource_group,
                name,
            ))
        } else if eq(6, "virtualMachines") && parts.len() == 8 {
            Some(Target::new(
                TargetKind::VirtualMachine,
                subscription,
                resource_group,
                name,
            ))
        } else {
            None
        }
    }

    /// The target of a node, if its provider ID names one.
    pub fn of_node(node: &Node) -> Option<Self> {
        node.spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(Target::from_provider_id)
    }

    /// The lower-cased ARM resource ID, used as the key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Target {}

impl std::hash::Hash for Target {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl PartialOrd for Target {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Target {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.kind.label(),
            self.resource_group,
            self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_set_instances_share_one_target() {
        let a = Target::from_provider_id(
            "azure:///subscriptions/sub/resourceGroups/MC_rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-pool-1/virtualMachines/0",
        )
        .unwrap();
        let b = Target::from_provider_id(
            "azure:///subscriptions/sub/resourcegroups/mc_rg/providers/Microsoft.Compute/virtualMachineScaleSets/AKS-POOL-1/virtualMachines/7",
        )
        .unwrap();
        assert_eq!(a.kind, TargetKind::ScaleSet);
        assert_eq!(a, b);
        assert_eq!(a.name, "aks-pool-1");
        assert_eq!(a.resource_group, "MC_rg");
    }

    #[test]
    fn plain_vms_are_their_own_target() {
        let vm = Target::from_provider_id(
            "azure:///subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/node-0",
        )
        .unwrap();
        assert_eq!(vm.kind, TargetKind::VirtualMachine);
        assert_eq!(vm.name, "node-0");
        assert_eq!(
            vm.key(),
            "/subscriptions/sub/resourcegroups/rg/providers/microsoft.compute/virtualmachines/node-0"
        );
    }

    #[test]
    fn foreign_or_malformed_provider_ids_are_rejected() {
        for id in [
            "",
            "aws:///us-east-1a/i-0123",
            "azure:///subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualMachines/x",
            "azure:///subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines",
            "azure:///subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/a/b",
            "kind://docker/kind/kind-control-plane",
        ] {
            assert!(Target::from_provider_id(id).is_none(), "{id}");
        }
    }
}
