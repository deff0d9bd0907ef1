use anyhow::{Result, bail};

use crate::BenchKernelsArgs;

pub fn run(_args: &BenchKernelsArgs) -> Result<()> {
    bail!("the CPU kernel benchmark is not implemented yet")
}
