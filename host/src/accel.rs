//! Choosing QEMU's accelerator (placeholder until the KVM probe lands).

use anyhow::Result;

use crate::qemu::Accel;

#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

pub fn resolve(choice: AccelChoice) -> Result<Accel> {
    Ok(match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Auto | AccelChoice::Tcg => Accel::Tcg,
    })
}
