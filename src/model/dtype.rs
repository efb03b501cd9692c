//! Element types and their decoding to f32.

use half::{bf16, f16};

/// Element type of a tensor. Floating types are analysed as f32; the rest are listed only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    /// A dtype prunescope does not decode (fp8, complex, …), with its safetensors name and
    /// element size in bits when known.
    Other {
        name: String,
        bits: Option<usize>,
    },
}

impl DType {
    /// Parses a safetensors dtype string.
    pub fn from_safetensors(s: &str) -> DType {
        match s {
            "BOOL" => DType::Bool,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "I16" => DType::I16,
            "U16" => DType::U16,
            "I32" => DType::I32,
            "U32" => DType::U32,
            "I64" => DType::I64,
            "U64" => DType::U64,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            other => {
                let bits = match other {
                    "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => Some(8),
                    "F6_E2M3" | "F6_E3M2" => Some(6),
                    "F4" => Some(4),
                    "C64" => Some(64),
                    _ => None,
                };
                DType::Other {
                    name: other.to_string(),
                    bits,
                }
            }
        }
    }

    pub fn safetensors_name(&self) -> &str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::Other { name, .. } => name,
        }
    }

    /// Element size in bits, when known.
    pub fn bits(&self) -> Option<usize> {
        Some(match self {
            DType::Bool | DType::U8 | DType::I8 => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::I64 | DType::U64 | DType::F64 => 64,
            DType::Other { bits, .. } => return *bits,
        })
    }

    /// Whole bytes per element, for dtypes that are byte-addressable.
    pub fn size_bytes(&self) -> Option<usize> {
        self.bits().filter(|b| b % 8 == 0).map(|b| b / 8)
    }

    pub fn is_float(&self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// Decodes `out.len()` elements starting at element `start` of `bytes`.
    pub(crate) fn decode_f32(&self, bytes: &[u8], start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            DType::F32 => {
                let src = &bytes[start * 4..(start + n) * 4];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                let src = &bytes[start * 2..(start + n) * 2];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                let src = &bytes[start * 2..(start + n) * 2];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F64 => {
                let src = &bytes[start * 8..(start + n) * 8];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(8)) {
                    let a: [u8; 8] = c.try_into().unwrap_or([0; 8]);
                    *o = f64::from_le_bytes(a) as f32;
                }
            }
            _ => panic!(
                "decode_f32 called on non-float dtype {}",
                self.safetensors_name()
            ),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}
