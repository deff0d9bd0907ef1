//! What a device can hold: the largest single buffer (one allocation, bound whole to a kernel)
//! and, when the runtime reports it, its memory.
//!
//! Uploads check a tensor against these limits before allocating it. Past them, a CubeCL
//! runtime does not return an error at the call: the allocation fails later on the device's
//! thread, the handle is left without memory, and the next use of it fails far from the cause
//! (burn's matmul autotune then panics with "Memory page 0 doesn't exist"). A check that names
//! the tensor and the limit up front is the only clean report.

use std::fmt;

use thiserror::Error;

/// The limits a tensor is checked against. `None`: no limit is known (host memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Bytes of the largest buffer: on wgpu the device's maximum storage-buffer binding size
    /// (cubecl allocates no larger page); on CUDA cubecl's largest page.
    pub max_buffer_bytes: Option<u64>,
    /// Bytes of device memory, if the runtime reports them (cubecl 0.10's wgpu and CUDA
    /// runtimes do not; tests and callers that know may set it).
    pub memory_bytes: Option<u64>,
}

/// A tensor, or a set of tensors, that does not fit the device.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DeviceLimitError {
    #[error(
        "`{tensor}` needs one device buffer of {}, more than this device's largest buffer, {} \
         (its maximum storage-buffer binding / allocation size)",
        Bytes(*bytes),
        Bytes(*limit)
    )]
    BufferTooLarge {
        tensor: String,
        bytes: u64,
        limit: u64,
    },
    #[error("{what} needs {} of device memory, more than this device's {}", Bytes(*bytes), Bytes(*limit))]
    OutOfMemory {
        what: String,
        bytes: u64,
        limit: u64,
    },
}

impl DeviceLimitError {
    /// The same error with the tensor (or the set) renamed by `name`, which gets the current
    /// name: a caller that knows where the tensor comes from (a checkpoint's module) names it.
    pub fn renamed(self, name: impl FnOnce(&str) -> String) -> Self {
        match self {
            Self::BufferTooLarge {
                tensor,
                bytes,
                limit,
            } => Self::BufferTooLarge {
                tensor: name(&tensor),
                bytes,
                limit,
            },
            Self::OutOfMemory { what, bytes, limit } => Self::OutOfMemory {
                what: name(&what),
                bytes,
                limit,
            },
        }
    }
}

impl DeviceLimits {
    /// No limit known: the host backends, whose tensors live in host memory.
    pub const NONE: Self = Self {
        max_buffer_bytes: None,
        memory_bytes: None,
    };

    /// Checks that one buffer of `bytes` for `tensor` fits.
    pub fn check_buffer(&self, tensor: &str, bytes: u64) -> Result<(), DeviceLimitError> {
        match self.max_buffer_bytes {
            Some(limit) if bytes > limit => Err(DeviceLimitError::BufferTooLarge {
                tensor: tensor.to_string(),
                bytes,
                limit,
            }),
            _ => Ok(()),
        }
    }

    /// Checks that each of `buffers` (name, bytes) fits one buffer, then that together they
    /// fit the device's memory (when known): what `what` needs at once.
    pub fn check_all(&self, what: &str, buffers: &[(&str, u64)]) -> Result<(), DeviceLimitError> {
        for &(tensor, bytes) in buffers {
            self.check_buffer(tensor, bytes)?;
        }
        let total = buffers.iter().map(|&(_, b)| b).sum::<u64>();
        match self.memory_bytes {
            Some(limit) if total > limit => Err(DeviceLimitError::OutOfMemory {
                what: what.to_string(),
                bytes: total,
                limit,
            }),
            _ => Ok(()),
        }
    }
}

/// `n` bytes, with MiB for reading.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes ({:.1} MiB)", self.0, self.0 as f64 / 1048576.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_buffer_past_the_limit_is_refused_by_name() {
        let limits = DeviceLimits {
            max_buffer_bytes: Some(128 * MIB),
            memory_bytes: None,
        };
        assert_eq!(limits.check_buffer("w", 128 * MIB), Ok(()));
        let e = limits.check_buffer("w", 128 * MIB + 1).unwrap_err();
        assert_eq!(
            e,
            DeviceLimitError::BufferTooLarge {
                tensor: "w".into(),
                bytes: 128 * MIB + 1,
                limit: 128 * MIB
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("`w`") && msg.contains("134217728 bytes (128.0 MiB)"),
            "{msg}"
        );
        assert_eq!(DeviceLimits::NONE.check_buffer("w", u64::MAX), Ok(()));
    }

    #[test]
    fn buffers_that_fit_alone_can_exceed_the_memory_together() {
        let limits = DeviceLimits {
            max_buffer_bytes: Some(100),
            memory_bytes: Some(150),
        };
        assert_eq!(limits.check_all("layer", &[("a", 100), ("b", 50)]), Ok(()));
        let e = limits.check_all("layer", &[("a", 100), ("b", 51)]);
        assert!(
            matches!(
                e,
                Err(DeviceLimitError::OutOfMemory {
                    bytes: 151,
                    limit: 150,
                    ..
                })
            ),
            "{e:?}"
        );
        // The single-buffer limit is checked first, and names the buffer.
        let e = limits
            .check_all("layer", &[("a", 10), ("b", 101)])
            .unwrap_err();
        assert_eq!(
            e.renamed(|t| format!("m.{t}")),
            DeviceLimitError::BufferTooLarge {
                tensor: "m.b".into(),
                bytes: 101,
                limit: 100
            }
        );
    }
}
